"""Forward throughput of a phi-3-mini-width decoder: phi3_jax against transformers' Phi3ForCausalLM.

Both run the same shapes and dtype (hidden 3072, 32 heads of 96, ffn 8192, vocab 32064, `--layers` deep),
random weights, full logits, in one invocation: JAX first (jit, timed after warm-up), then torch in a
child process so neither framework's threads or memory disturb the other.

    python bench/forward.py                                  # CPU: float32, batch 1, seq 512, 2 layers
    python bench/forward.py --device gpu --batch 8 --seq 2048 --layers 4   # bf16, cuDNN / SDPA attention
    python bench/forward.py --append bench/RESULTS.md        # also append a results entry
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

WIDTH = dict(vocab_size=32064, hidden_size=3072, num_heads=32, num_kv_heads=32, head_dim=96, intermediate_size=8192)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--iters", type=int, default=5, help="timed forward passes per framework (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes after compilation")
    p.add_argument("--only", choices=("jax", "torch"), help="run one framework and print its JSON result")
    p.add_argument("--append", metavar="FILE", help="append a markdown entry with the figures to FILE")
    return p.parse_args(argv)


def _dtype(args) -> str:
    return "bfloat16" if args.device == "gpu" else "float32"


def _time(fn, iters: int, warmup: int) -> tuple[float, float]:
    """(first call seconds incl. compilation, median seconds of the timed calls)."""
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


def bench_jax(args) -> dict:
    os.environ.setdefault("JAX_PLATFORMS", "cuda" if args.device == "gpu" else "cpu")
    import jax
    import numpy as np
    from flax import nnx

    from phi3_jax.model import ModelConfig, init_model

    dtype = _dtype(args)
    cfg = ModelConfig(family="phi3", num_layers=args.layers, max_position_embeddings=max(4096, args.seq),
                      original_max_position_embeddings=max(4096, args.seq), param_dtype=dtype, dtype=dtype,
                      attention_impl="cudnn" if args.device == "gpu" else "xla", **WIDTH)
    graphdef, state = nnx.split(init_model(cfg))
    forward = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids))
    ids_BT = jax.device_put(np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq), np.int32))
    first, median = _time(lambda: forward(state, ids_BT).block_until_ready(), args.iters, args.warmup)
    return dict(framework="phi3_jax", version=jax.__version__, backend=jax.default_backend(),
                device=str(jax.devices()[0].device_kind), first_s=first, median_s=median,
                tokens_per_s=args.batch * args.seq / median, params=cfg.param_count())


def bench_torch(args) -> dict:
    import torch
    import transformers
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    dev = "cuda" if args.device == "gpu" else "cpu"
    tdtype = torch.bfloat16 if args.device == "gpu" else torch.float32
    hf = Phi3Config(vocab_size=WIDTH["vocab_size"], hidden_size=WIDTH["hidden_size"],
                    intermediate_size=WIDTH["intermediate_size"], num_hidden_layers=args.layers,
                    num_attention_heads=WIDTH["num_heads"], num_key_value_heads=WIDTH["num_kv_heads"],
                    max_position_embeddings=max(4096, args.seq), original_max_position_embeddings=max(4096, args.seq),
                    sliding_window=None, pad_token_id=0)
    model = Phi3ForCausalLM._from_config(hf, dtype=tdtype, attn_implementation="sdpa").to(dev).eval()
    ids = torch.randint(0, WIDTH["vocab_size"], (args.batch, args.seq), device=dev)

    def run():
        with torch.inference_mode():
            model(ids, use_cache=False).logits
        if dev == "cuda":
            torch.cuda.synchronize()

    first, median = _time(run, args.iters, args.warmup)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    return dict(framework="transformers", version=f"{transformers.__version__} (torch {torch.__version__})",
                backend=dev, device=name, threads=torch.get_num_threads(), first_s=first, median_s=median,
                tokens_per_s=args.batch * args.seq / median, params=sum(p.numel() for p in model.parameters()))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or 'unknown CPU'}, {os.cpu_count()} cores"


def markdown(args, jx: dict, pt: dict, command: str, load: float) -> str:
    card = cpu_name() if args.device == "cpu" else jx["device"]
    ratio = jx["tokens_per_s"] / pt["tokens_per_s"]
    return "\n".join([
        f"## forward, {args.device}, {datetime.date.today().isoformat()}",
        "",
        f"- card: {card}",
        f"- shapes: batch {args.batch}, seq {args.seq}, {args.layers} layers of hidden 3072 / 32 heads / ffn 8192, "
        f"vocab 32064 ({jx['params'] / 1e6:.0f}M parameters), {_dtype(args)}, full logits",
        f"- versions: jax {jx['version']}; transformers {pt['version']}",
        f"- command: `{command}`",
        f"- host load average at start (1 min): {load:.1f} (other processes share these cores)",
        "",
        "| framework | first call (s) | median forward (s) | tokens/s |",
        "|---|---|---|---|",
        f"| phi3_jax (jit) | {jx['first_s']:.2f} | {jx['median_s']:.3f} | {jx['tokens_per_s']:.0f} |",
        f"| transformers Phi3ForCausalLM (sdpa) | {pt['first_s']:.2f} | {pt['median_s']:.3f} | {pt['tokens_per_s']:.0f} |",
        "",
        f"phi3_jax / transformers: **{ratio:.2f}x** tokens/s.",
        "",
    ])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.only:
        result = bench_jax(args) if args.only == "jax" else bench_torch(args)
        print("RESULT " + json.dumps(result))
        return 0
    passthrough = ["--device", args.device, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--layers", str(args.layers), "--iters", str(args.iters), "--warmup", str(args.warmup)]
    load = os.getloadavg()[0]
    results = {}
    for fw in ("jax", "torch"):  # one process each: no shared thread pools, memory freed in between
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--only", fw, *passthrough],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stderr[-3000:])
            print(f"error: the {fw} benchmark failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        results[fw] = json.loads(lines[-1][len("RESULT "):])
        r = results[fw]
        print(f"{r['framework']:13s} {r['backend']:4s} first {r['first_s']:7.2f}s  median {r['median_s']:.4f}s  "
              f"{r['tokens_per_s']:10.1f} tokens/s")
    print(f"ratio phi3_jax / transformers: {results['jax']['tokens_per_s'] / results['torch']['tokens_per_s']:.2f}x")
    if args.append:
        command = "python bench/forward.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.append, "a") as f:
            f.write("\n" + markdown(args, results["jax"], results["torch"], command.strip(), load))
    return 0


if __name__ == "__main__":
    sys.exit(main())
