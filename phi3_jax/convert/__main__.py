"""Command line: move weights between Hugging Face folders and phi3_jax checkpoints.

    python -m phi3_jax.convert import-hf --hf-dir DIR --out CKPT [--dtype bfloat16] [--force]
    python -m phi3_jax.convert export-hf --ckpt CKPT --out DIR [--dtype bfloat16] [--max-shard-size 5GB]
        [--tokenizer none|KIND[:PATH]] [--force]

export-hf writes the tokenizer the checkpoint was trained with (its saved config names it) as tokenizer.json
and tokenizer_config.json, chat template included (`phi3_jax.convert.hf_tokenizer`), and lists its stop
tokens in generation_config.json; a checkpoint with no training config gets none unless --tokenizer names one.
import-hf keeps the folder's tokenizer.json and tokenizer_config.json beside the checkpoint, so generate and
a later export-hf use them.

A mistake the user can fix (bad config, missing tensor, existing output) prints one line on stderr and
exits with status 2; nothing is written.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB, 500MB or 1048576")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m phi3_jax.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    dtypes = ("float32", "bfloat16", "float16")

    imp = sub.add_parser("import-hf", help="Hugging Face folder (config.json + safetensors) -> phi3_jax checkpoint")
    imp.add_argument("--hf-dir", required=True, help="folder with config.json and model.safetensors or shards")
    imp.add_argument("--out", required=True, help="checkpoint directory to create")
    imp.add_argument("--dtype", choices=dtypes, help="parameter dtype to store (default: config.json's)")
    imp.add_argument("--force", action="store_true", help="replace --out if it exists")

    exp = sub.add_parser("export-hf", help="phi3_jax checkpoint or training workdir -> Hugging Face folder")
    exp.add_argument("--ckpt", required=True, help="checkpoint directory, step folder or training workdir")
    exp.add_argument("--out", required=True, help="Hugging Face folder to create")
    exp.add_argument("--dtype", choices=dtypes, help="tensor dtype to write (default: the checkpoint's)")
    exp.add_argument("--max-shard-size", type=parse_size, default="5GB",
                     help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    exp.add_argument("--tokenizer", metavar="SPEC",
                     help="KIND or KIND:PATH (byte, sentencepiece, hf, tiktoken) to write, or none (default: the one "
                          "the checkpoint was trained with)")
    exp.add_argument("--force", action="store_true", help="replace --out if it exists")
    return parser


def import_hf(args) -> str:
    from phi3_jax.checkpoint import save_model, unflatten
    from phi3_jax.convert.hf import prepare_out_dir, read_hf

    from phi3_jax.convert.hf_tokenizer import TOKENIZER_CONFIG_NAME, TOKENIZER_NAME, read_hf_tokenizer

    prepare_out_dir(args.out, args.force, source=args.hf_dir)  # fail before reading gigabytes
    hf_dir = Path(args.hf_dir)
    files = {}
    if (hf_dir / TOKENIZER_NAME).is_file():  # kept beside the weights, for generate and export-hf
        read_hf_tokenizer(hf_dir)  # one that does not load fails now, not when sampling
        files = {n: (hf_dir / n).read_bytes() for n in (TOKENIZER_NAME, TOKENIZER_CONFIG_NAME) if (hf_dir / n).is_file()}
    cfg, flat = read_hf(args.hf_dir, args.dtype)
    out = save_model(args.out, cfg, unflatten(flat), force=args.force, files=files)
    return (f"wrote {out} ({cfg.param_count():,} parameters, {cfg.param_dtype}; "
            f"{'with' if files else 'no'} tokenizer.json)")


def export_hf(args) -> str:
    import jax
    import numpy as np

    from phi3_jax.checkpoint import flatten, read_config, restore_params
    from phi3_jax.convert.hf import prepare_out_dir, write_hf

    prepare_out_dir(args.out, args.force, source=args.ckpt)
    cfg = read_config(args.ckpt)
    tok, files = export_tokenizer(args.ckpt, args.tokenizer, cfg)  # before reading the weights: fails fast
    flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten(restore_params(args.ckpt, cfg)).items()}
    out = write_hf(args.out, cfg, flat, dtype=args.dtype, max_shard_bytes=args.max_shard_size, force=args.force,
                   files=files, stop_ids=tok.stop_ids if tok is not None else ())
    what = (f"{tok.kind} tokenizer, chat template {tok.chat_template!r}" if tok is not None else
            "no tokenizer" + ("" if args.tokenizer == "none" else " (none recorded; --tokenizer KIND[:PATH] adds one)"))
    return f"wrote {out} ({cfg.param_count():,} parameters, {args.dtype or cfg.param_dtype}; {what})"


def export_tokenizer(ckpt, spec: str | None, cfg):
    """(tokenizer, {file name: text}) that export-hf writes: `spec`'s tokenizer (None: the recorded one, if
    any; "none": no tokenizer)."""
    from phi3_jax.convert.hf_tokenizer import hf_tokenizer_files
    from phi3_jax.data.errors import DataError
    from phi3_jax.generate import recorded_tokenizer, tokenizer_for

    tok = None if spec == "none" else tokenizer_for(ckpt, spec) if spec else recorded_tokenizer(ckpt)
    if tok is None:
        return None, {}
    files = hf_tokenizer_files(tok, cfg.max_position_embeddings)
    if max(tok.special_tokens.values()) >= cfg.vocab_size:
        raise DataError(f"the {tok.kind} tokenizer has ids up to {max(tok.special_tokens.values())}, the model "
                        f"{cfg.vocab_size} rows: pass the --tokenizer the model was trained with")
    return tok, files


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # conversion needs no accelerator
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax warns before our own message says it better
    from phi3_jax.convert.hf_weights import CheckpointError
    from phi3_jax.data.errors import DataError
    from phi3_jax.model.config import ConfigError

    try:
        msg = (import_hf if args.command == "import-hf" else export_hf)(args)
    except (ConfigError, CheckpointError, DataError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(msg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
