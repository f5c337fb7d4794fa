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
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import entry_head, peer_main, time_calls  # noqa: E402

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
    first, median = time_calls(lambda: forward(state, ids_BT).block_until_ready(), args.iters, args.warmup)
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

    first, median = time_calls(run, args.iters, args.warmup)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    return dict(framework="transformers", version=f"{transformers.__version__} (torch {torch.__version__})",
                backend=dev, device=name, threads=torch.get_num_threads(), first_s=first, median_s=median,
                tokens_per_s=args.batch * args.seq / median, params=sum(p.numel() for p in model.parameters()))


def markdown(args, jx: dict, pt: dict, command: str, load: float) -> str:
    ratio = jx["tokens_per_s"] / pt["tokens_per_s"]
    shapes = (f"batch {args.batch}, seq {args.seq}, {args.layers} layers of hidden 3072 / 32 heads / ffn 8192, "
              f"vocab 32064 ({jx['params'] / 1e6:.0f}M parameters), {_dtype(args)}, full logits")
    return "\n".join([
        *entry_head("forward", args.device, jx, pt, shapes, command, load),
        "| framework | first call (s) | median forward (s) | tokens/s |",
        "|---|---|---|---|",
        f"| phi3_jax (jit) | {jx['first_s']:.2f} | {jx['median_s']:.3f} | {jx['tokens_per_s']:.0f} |",
        f"| transformers Phi3ForCausalLM (sdpa) | {pt['first_s']:.2f} | {pt['median_s']:.3f} | {pt['tokens_per_s']:.0f} |",
        "",
        f"phi3_jax / transformers: **{ratio:.2f}x** tokens/s.",
        "",
    ])


def main(argv=None) -> int:
    return peer_main(__file__, argv, parse_args(argv), bench_jax, bench_torch, markdown)

if __name__ == "__main__":
    sys.exit(main())
