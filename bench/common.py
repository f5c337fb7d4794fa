"""Pieces shared by bench/forward.py and bench/train_step.py: timing, host description, the two-process
driver that runs each framework in its own child of the calling script, and results-file appends."""
from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

FRAMEWORKS = ("jax", "torch")
RESULT_PREFIX = "RESULT "


def time_calls(fn: Callable[[], object], iters: int, warmup: int) -> tuple[float, float]:
    """(first call seconds incl. compilation, median seconds of `iters` timed calls after `warmup` untimed)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def time_in_flight(dispatch: Callable[[], object], read: Callable[[object], object], iters: int,
                   warmup: int) -> float:
    """Median seconds per step over `iters` steps run the way a training loop runs them: `dispatch()` starts
    a step and returns its (not yet computed) loss, and `read(loss)` waits for it only after the next step
    has been dispatched, as phi3_jax.train reads each step's metrics. The device then never idles while the
    host dispatches, so the time between two reads is the device's time for one step. Call after the
    first (compiling) step."""
    for _ in range(warmup):
        read(dispatch())
    pending = dispatch()
    following = dispatch()
    read(pending)
    ends = [time.perf_counter()]
    pending = following
    for _ in range(iters):
        following = dispatch()
        read(pending)
        ends.append(time.perf_counter())
        pending = following
    read(pending)
    return statistics.median(b - a for a, b in zip(ends, ends[1:]))


def time_ms(fn: Callable, *args, iters: int, repeats: int = 5) -> float:
    """Median over `repeats` of the mean time of `iters` back-to-back calls of a JAX function (dispatch
    overlaps compute), after one call to compile and warm up."""
    import jax

    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) * 1e3 / iters)
    return statistics.median(samples)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or 'unknown CPU'}, {os.cpu_count()} cores"


def print_result(result: dict) -> None:
    """`--only FW` mode: the one line the parent parses."""
    print(RESULT_PREFIX + json.dumps(result))


def _default_line(r: dict) -> str:
    return (f"{r['framework']:13s} {r['backend']:4s} first {r['first_s']:7.2f}s  median {r['median_s']:.4f}s  "
            f"{r['tokens_per_s']:10.1f} tokens/s")


def run_frameworks(script_path: str, passthrough: list[str],
                   describe: Callable[[dict], str] = _default_line) -> dict | None:
    """Runs `script_path --only FW *passthrough` for each framework in its own process (no shared thread
    pools, memory freed in between), prints `describe(result)` per framework and the tokens/s ratio.

    Returns {"jax": result, "torch": result}, or None after printing the failing child's stderr.
    """
    results = {}
    for fw in FRAMEWORKS:
        proc = subprocess.run([sys.executable, os.path.abspath(script_path), "--only", fw, *passthrough],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stderr[-3000:])
            print(f"error: the {fw} benchmark failed (exit {proc.returncode})", file=sys.stderr)
            return None
        results[fw] = json.loads(lines[-1][len(RESULT_PREFIX):])
        print(describe(results[fw]))
    print(f"ratio phi3_jax / transformers: {results['jax']['tokens_per_s'] / results['torch']['tokens_per_s']:.2f}x")
    return results


def command_line(script: str, argv: list[str] | None) -> str:
    """The command as run, for a results entry: `[XLA_FLAGS=...] python SCRIPT ARGS` (XLA's flags change
    what is measured, so an entry names them)."""
    flags = os.environ.get("XLA_FLAGS", "").strip()
    prefix = f"XLA_FLAGS='{flags}' " if flags else ""
    return (prefix + "python " + script + " " + " ".join(argv if argv is not None else sys.argv[1:])).strip()


def run_and_append(script_path: str, argv: list[str] | None, append: str | None,
                   entry: Callable[[dict, dict, str, float], str], describe: Callable[[dict], str] = _default_line) -> int:
    """The parent side of a two-framework benchmark: runs each framework's child with this command's own
    flags (less --append), then appends `entry(jax_result, torch_result, command, load)` to `append`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    child = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--append":
            skip = True
        elif not a.startswith("--append="):
            child.append(a)
    load = os.getloadavg()[0]
    results = run_frameworks(script_path, child, describe)
    if results is None:
        return 1
    if append:
        script = "bench/" + os.path.basename(script_path)
        append_entry(append, entry(results["jax"], results["torch"], command_line(script, argv), load))
    return 0


def peer_main(script_path: str, argv: list[str] | None, args, bench_jax: Callable, bench_torch: Callable,
              markdown: Callable, describe: Callable[[dict], str] = _default_line) -> int:
    """A peer benchmark's entry point: with `--only jax|torch` one framework runs in this process and prints
    its result; otherwise each runs in its own child and `--append` gets `markdown(args, jax, torch, command,
    load)`."""
    if args.only:
        print_result(bench_jax(args) if args.only == "jax" else bench_torch(args))
        return 0
    return run_and_append(script_path, argv, args.append, functools.partial(markdown, args), describe=describe)


# The step's kernel forms a benchmark can pick (`--form NAME=VALUE`): the module constant each one sets and
# the tuple of its values there.
FORMS = {"logsumexp": ("phi3_jax.ops.cross_entropy", "LOGSUMEXP", "LOGSUMEXP_FORMS"),
         "swiglu_backward": ("phi3_jax.model.layers", "SWIGLU_BACKWARD", "SWIGLU_BACKWARD_FORMS"),
         "rms_norm_forward": ("phi3_jax.model.layers", "RMS_NORM_FORWARD", "RMS_NORM_FORWARD_FORMS"),
         "rms_norm_backward": ("phi3_jax.model.layers", "RMS_NORM_BACKWARD", "RMS_NORM_BACKWARD_FORMS")}


def apply_forms(pairs: list[str] | None) -> dict[str, str]:
    """Sets the module constants that `--form NAME=VALUE` names (before anything is traced); returns them."""
    import importlib

    chosen = {}
    for pair in pairs or ():
        name, _, value = pair.partition("=")
        if name not in FORMS:
            raise SystemExit(f"--form {pair}: NAME must be one of {sorted(FORMS)}")
        module, attr, allowed = FORMS[name]
        mod = importlib.import_module(module)
        if value not in getattr(mod, allowed):
            raise SystemExit(f"--form {pair}: VALUE must be one of {getattr(mod, allowed)}")
        setattr(mod, attr, value)
        chosen[name] = value
    return chosen


def entry_head(title: str, device: str, jx: dict, pt: dict, shapes: str, command: str, load: float) -> list[str]:
    """The opening lines of a peer benchmark's bench/RESULTS.md entry: title, device and date, card, shapes,
    versions, command, host load."""
    card = cpu_name() if device == "cpu" else jx["device"]
    return [f"## {title}, {device}, {datetime.date.today().isoformat()}", "", f"- card: {card}", f"- shapes: {shapes}",
            f"- versions: jax {jx['version']}; transformers {pt['version']}", f"- command: `{command}`",
            f"- host load average at start (1 min): {load:.1f} (other processes share these cores)", ""]


def append_entry(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write("\n" + text)


def _op_kind(name: str, args: dict) -> str:
    """Matmul, attention or other (elementwise, reductions, copies), from a trace event's kernel or op name."""
    text = " ".join([name, *map(str, args.values())]).lower()
    if any(k in text for k in ("fmha", "cudnn", "flash", "attention")):
        return "attention"
    if any(k in text for k in ("gemm", "cublas", "nvjet", "cutlass", "xmma", "matmul", "dot", "wgmma")):
        return "matmul"
    return "other"


def profile_calls(fn: Callable[[], object], calls: int, log_dir: str, top: int = 25) -> str:
    """Runs `fn` `calls` times under the JAX profiler and returns a table of the device's busiest ops.

    Reads the Perfetto trace JAX writes (no TensorBoard needed): complete events of the accelerator's
    processes, summed by op name, per call. On a CPU, where XLA runs on host threads, those threads count.
    """
    import collections
    import gzip
    import glob

    import jax

    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(calls):
            fn()
    path = max(glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "perfetto_trace.json.gz")))
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    meta = [e for e in events if e.get("ph") == "M"]
    procs = {e["pid"]: e["args"]["name"] for e in meta if e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e.get("name") == "thread_name"}
    device = {pid for pid, name in procs.items() if "/device:" in name}

    def counted(e):
        if device:
            return e["pid"] in device
        return "XLA" in threads.get((e["pid"], e["tid"]), "") and "Execute" not in e["name"]

    totals, kinds = collections.Counter(), collections.Counter()
    first, last = float("inf"), 0.0
    for e in events:
        if e.get("ph") == "X" and counted(e):
            ms = e.get("dur", 0.0) / 1e3 / calls  # microseconds -> ms per call
            totals[e["name"]] += ms
            kinds[_op_kind(e["name"], e.get("args", {}))] += ms
            first, last = min(first, e["ts"]), max(last, e["ts"] + e.get("dur", 0.0))
    busy = sum(totals.values())
    span = (last - first) / 1e3 / calls if totals else 0.0
    lines = [f"device busy {busy:.2f} ms per call over {len(totals)} op names ({'device' if device else 'host XLA'} "
             f"events of {path}); first to last event {span:.2f} ms per call",
             "by kind: " + ", ".join(f"{k} {ms:.2f} ms ({100 * ms / busy:.1f}%)" for k, ms in kinds.most_common()),
             "| op | ms per call | share |", "|---|---|---|"]
    lines += [f"| {name[:90]} | {ms:.3f} | {100 * ms / busy:.1f}% |" for name, ms in totals.most_common(top)]
    return "\n".join(lines)
