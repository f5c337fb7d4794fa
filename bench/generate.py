"""Sampling throughput with a KV cache: phi3_jax.generate against transformers' generate() (Phi3ForCausalLM).

Both sides do the same work: a batch of random prompts, prefilled in one pass, then `--new` greedy tokens
a row against a KV cache, from random weights of the same shapes (no early stop: every row generates
all its tokens). A call's time covers prefill and decode; tokens/s counts the generated tokens. Each
framework runs in its own child process so neither one's threads or memory disturb the other.

    python bench/generate.py                    # CPU: float32, hidden 512, 8 layers, batch 4, prompt 64, 64 new
    python bench/generate.py --device gpu       # bf16, phi-3-mini width (3072 / ffn 8192 / 32 heads), 4 layers,
                                                # batch 8, prompt 512, 256 new
    python bench/generate.py --append bench/RESULTS.md

The JAX side samples from float32 master weights with bf16 compute on a GPU (a trained checkpoint as
`phi3_jax.generate` gets it); torch holds its weights in the compute dtype.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import entry_head, peer_main, time_calls  # noqa: E402

GPU_SHAPE = dict(vocab_size=32064, hidden_size=3072, num_heads=32, num_kv_heads=32, intermediate_size=8192,
                 num_layers=4, batch=8, prompt=512, new=256)
CPU_SHAPE = dict(vocab_size=2048, hidden_size=512, num_heads=8, num_kv_heads=8, intermediate_size=1376,
                 num_layers=8, batch=4, prompt=64, new=64)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--batch", type=int, help="override the shape's batch")
    p.add_argument("--prompt", type=int, help="override the shape's prompt length")
    p.add_argument("--new", type=int, help="override the shape's number of new tokens a row")
    p.add_argument("--iters", type=int, default=3, help="timed calls per framework (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first")
    p.add_argument("--only", choices=("jax", "torch"), help="run one framework and print its JSON result")
    p.add_argument("--append", metavar="FILE", help="append a markdown entry with the figures to FILE")
    return p.parse_args(argv)


def shape(args) -> dict:
    s = dict(GPU_SHAPE if args.device == "gpu" else CPU_SHAPE)
    for k in ("batch", "prompt", "new"):
        if getattr(args, k):
            s[k] = getattr(args, k)
    return s


def _prompts(s: dict):
    import numpy as np

    return np.random.RandomState(0).randint(1, s["vocab_size"], (s["batch"], s["prompt"])).astype(np.int32)


def _dtype(args) -> str:
    return "bfloat16" if args.device == "gpu" else "float32"


def bench_jax(args) -> dict:
    os.environ.setdefault("JAX_PLATFORMS", "cuda" if args.device == "gpu" else "cpu")
    import jax

    from phi3_jax.generate import generate_batch
    from phi3_jax.model import ModelConfig, init_model

    s = shape(args)
    cfg = ModelConfig(family="phi3", vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                      num_layers=s["num_layers"], num_heads=s["num_heads"], num_kv_heads=s["num_kv_heads"],
                      head_dim=s["hidden_size"] // s["num_heads"], intermediate_size=s["intermediate_size"],
                      max_position_embeddings=4096, original_max_position_embeddings=4096, param_dtype="float32",
                      dtype=_dtype(args))
    model = init_model(cfg)
    prompts = _prompts(s).tolist()
    out = []

    def run():
        out[:] = generate_batch(model, prompts, s["new"])

    first, median = time_calls(run, args.iters, args.warmup)
    assert [len(o) for o in out] == [s["new"]] * s["batch"], "phi3_jax stopped early"
    return dict(framework="phi3_jax", version=jax.__version__, backend=jax.default_backend(),
                device=str(jax.devices()[0].device_kind), first_s=first, median_s=median,
                tokens_per_s=s["batch"] * s["new"] / median, params=cfg.param_count())


def bench_torch(args) -> dict:
    import torch
    import transformers
    from transformers import Phi3Config, Phi3ForCausalLM

    s = shape(args)
    torch.manual_seed(0)
    dev = "cuda" if args.device == "gpu" else "cpu"
    hf = Phi3Config(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                    num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"],
                    num_key_value_heads=s["num_kv_heads"], max_position_embeddings=4096,
                    original_max_position_embeddings=4096, sliding_window=None, pad_token_id=0, eos_token_id=None,
                    bos_token_id=None)
    tdtype = torch.bfloat16 if args.device == "gpu" else torch.float32
    model = Phi3ForCausalLM._from_config(hf, dtype=tdtype, attn_implementation="sdpa").to(dev).eval()
    ids = torch.as_tensor(_prompts(s), device=dev)
    out = []

    def run():
        with torch.inference_mode():
            out[:] = [model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=s["new"],
                                     min_new_tokens=s["new"], do_sample=False, pad_token_id=0)]
        if dev == "cuda":
            torch.cuda.synchronize()

    first, median = time_calls(run, args.iters, args.warmup)
    assert tuple(out[0].shape) == (s["batch"], s["prompt"] + s["new"]), "transformers stopped early"
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    return dict(framework="transformers", version=f"{transformers.__version__} (torch {torch.__version__})",
                backend=dev, device=name, threads=torch.get_num_threads(), first_s=first, median_s=median,
                tokens_per_s=s["batch"] * s["new"] / median, params=sum(p.numel() for p in model.parameters()))


def markdown(args, jx: dict, pt: dict, command: str, load: float) -> str:
    s = shape(args)
    ratio = jx["tokens_per_s"] / pt["tokens_per_s"]
    shapes = (f"batch {s['batch']}, prompt {s['prompt']}, {s['new']} new tokens a row (greedy), "
              f"{s['num_layers']} layers of hidden {s['hidden_size']} / {s['num_heads']} heads / ffn "
              f"{s['intermediate_size']}, vocab {s['vocab_size']} ({jx['params'] / 1e6:.0f}M parameters), "
              f"{_dtype(args)} compute")
    return "\n".join([
        *entry_head("sampling", args.device, jx, pt, shapes, command, load),
        "| framework | first call (s) | median call (s) | new tokens/s |",
        "|---|---|---|---|",
        f"| phi3_jax.generate (one jit: prefill + lax.scan over tokens) | {jx['first_s']:.2f} | {jx['median_s']:.3f} | "
        f"{jx['tokens_per_s']:.0f} |",
        f"| transformers Phi3ForCausalLM.generate (sdpa, dynamic cache) | {pt['first_s']:.2f} | {pt['median_s']:.3f} | "
        f"{pt['tokens_per_s']:.0f} |",
        "",
        f"phi3_jax / transformers: **{ratio:.2f}x** generated tokens/s.",
        "",
    ])


def main(argv=None) -> int:
    return peer_main(__file__, argv, parse_args(argv), bench_jax, bench_torch, markdown)


if __name__ == "__main__":
    sys.exit(main())
