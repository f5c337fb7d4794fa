"""Pieces shared by bench/forward.py and bench/train_step.py: timing, host description, the two-process
driver that runs each framework in its own child of the calling script, and results-file appends."""
from __future__ import annotations

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
    """The command as run, for a results entry: `python SCRIPT ARGS`."""
    return ("python " + script + " " + " ".join(argv if argv is not None else sys.argv[1:])).strip()


def append_entry(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write("\n" + text)
