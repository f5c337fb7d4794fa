"""Prints a model's config, parameters per part and FLOPs per token, without allocating the weights.

    python -m phi3_jax.model.show --preset phi-3-mini-4k [--seq-len 4096]
    python -m phi3_jax.model.show --hf-dir DIR        # config.json of a Hugging Face folder
    python -m phi3_jax.model.show --ckpt PATH         # phi3_jax checkpoint or training workdir

The per-part counts of `ModelConfig.param_counts` (the formula MFU and model cards use) are checked
against the shapes the decoder really creates (`jax.eval_shape`); a difference exits with status 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from phi3_jax.model.config import ModelConfig

PARTS = ("embedding", "attention", "mlp", "norms", "lm_head")


def _part(path: tuple[str, ...]) -> str:
    """Which part of ModelConfig.param_counts a parameter path belongs to."""
    if path[0] == "embed_tokens":
        return "embedding"
    if path[0] == "lm_head":
        return "lm_head"
    if path[0] == "norm" or any(p.endswith("layernorm") for p in path):
        return "norms"
    if "self_attn" in path:
        return "attention"
    if "mlp" in path:
        return "mlp"
    return "other"


def counts_from_shapes(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per part, summed over the shapes of the abstract model (nothing allocated)."""
    from flax import nnx

    from phi3_jax.checkpoint import flatten
    from phi3_jax.model.decoder import abstract_model

    counts = dict.fromkeys(PARTS, 0)
    for path, leaf in flatten(nnx.state(abstract_model(cfg), nnx.Param).to_pure_dict()).items():
        part = _part(path)
        size = 1
        for n in leaf.shape:
            size *= n
        counts[part] = counts.get(part, 0) + size
    counts["total"] = sum(v for k, v in counts.items() if k != "total")
    return counts


def _fmt(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit}"
    return f"{n:g}"


def report(cfg: ModelConfig, seq_len: int, name: str) -> tuple[str, bool]:
    """The printed report and whether the formula and the shapes agree."""
    lines = [f"model: {name}", "config:"]
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    for key, value in cfg.to_dict().items():
        if isinstance(value, tuple) and len(value) > 8:
            value = f"({len(value)} values: {value[0]:g} .. {value[-1]:g})"
        mark = "" if defaults.get(key) == getattr(cfg, key) else "  *"
        lines.append(f"  {key:32s} {value}{mark}")
    formula, shapes = cfg.param_counts(), counts_from_shapes(cfg)
    ok = all(formula.get(k, 0) == shapes.get(k, 0) for k in set(formula) | set(shapes))
    lines.append("parameters:            formula        eval_shape")
    for key in list(PARTS) + [k for k in shapes if k not in PARTS and k != "total"] + ["total"]:
        f, s = formula.get(key, 0), shapes.get(key, 0)
        lines.append(f"  {key:12s} {f:>16,d} {s:>16,d}  {_fmt(s):>9s}{'' if f == s else '  MISMATCH'}")
    train = cfg.flops_per_token(seq_len)
    lines.append(f"FLOPs per token at seq_len {seq_len}: training {_fmt(train)} (= 3 x forward), "
                 f"forward {_fmt(train / 3)}; 6N = {_fmt(6 * formula['total'])}")
    return "\n".join(lines), ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phi3_jax.model.show", description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a preset name (phi3_jax.model.presets.PRESETS)")
    src.add_argument("--hf-dir", help="a Hugging Face folder (its config.json is read)")
    src.add_argument("--ckpt", help="a phi3_jax checkpoint or training workdir (its config is read)")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: "
                        "min(4096, max_position_embeddings))")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from phi3_jax.convert.hf_weights import CheckpointError
    from phi3_jax.model.config import ConfigError

    try:
        if args.preset:
            from phi3_jax.model.presets import get_preset

            cfg, name = get_preset(args.preset), args.preset
        elif args.hf_dir:
            from phi3_jax.convert.hf import read_hf_config

            cfg, name = read_hf_config(args.hf_dir), args.hf_dir
        else:
            from phi3_jax.checkpoint import read_config

            cfg, name = read_config(args.ckpt), args.ckpt
        if args.seq_len is not None and args.seq_len <= 0:
            raise ConfigError(f"--seq-len={args.seq_len} must be positive")
    except (ConfigError, CheckpointError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    text, ok = report(cfg, args.seq_len or min(4096, cfg.max_position_embeddings), name)
    print(text)
    if not ok:
        print("error: ModelConfig.param_counts disagrees with the decoder's shapes", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
