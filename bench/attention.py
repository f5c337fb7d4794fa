"""Block-sparse attention speed at phi-3-small geometry against cuDNN dense causal and the reference.

    python bench/attention.py                       # GPU: kernel, cuDNN, reference at 4k/8k/16k/32k
    python bench/attention.py --seqs 8192 --out bench/RESULTS.md   # also append the table there

Geometry: batch 1, 32 query heads, 8 kv heads, head_dim 128, bf16, the released phi-3-small layout.
TFLOP/s count the work each method must do: 4 * head_dim * (visible query-key pairs) * heads for the
forward (two matmuls) and 3.5x that for forward+backward (five more matmuls in the backward); visible
pairs are the layout's for the block-sparse methods and all causal pairs for cuDNN. "vs cuDNN" is cuDNN's
time divided by the method's time (> 1 is faster). Decode rows give the KV-cache bytes one new token reads
in one sparse layer against a dense layer.

On a machine without a GPU it runs a tiny configuration of the reference only (a smoke test).
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels.blocksparse import api  # noqa: E402
from pallas_kernels.blocksparse.layout import Layout  # noqa: E402

BATCH, HEADS, KV_HEADS, DIM = 1, 32, 8, 128
TARGETS_8K = {"fwd": 0.45, "fwd+bwd": 1.6}  # ms on an H100


def _time_ms(fn, *args, iters: int, repeats: int = 5) -> float:
    """Median over `repeats` of the mean time of `iters` back-to-back calls (dispatch overlaps compute)."""
    jax.block_until_ready(fn(*args))  # compile and warm up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) * 1e3 / iters)
    return statistics.median(samples)


def _attention_fns(layout: Layout, backend: str, **options):
    def fwd(q, k, v):
        return api.blocksparse_attention(q, k, v, layout=layout, backend=backend, **options)

    return fwd


def _cudnn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn", is_causal=True)


def _fwd_bwd(fwd):
    def run(q, k, v, do):
        out, vjp = jax.vjp(fwd, q, k, v)
        return out, vjp(do)

    return run


def _pairs(layout: Layout, seq: int) -> tuple[float, float]:
    """(visible pairs summed over heads for the layout, causal pairs summed over heads)."""
    causal = seq * (seq + 1) / 2
    return float(layout.density(seq).sum() * causal), HEADS * causal


def _flops(pairs: float, pass_: str) -> float:
    fwd = 4.0 * DIM * pairs
    return fwd if pass_ == "fwd" else 3.5 * fwd


def _fits_reference(seq: int, pass_: str) -> bool:
    """The reference materializes [heads, seq, seq] fp32 scores, probabilities and masks."""
    copies = 4 if pass_ == "fwd" else 8
    need = HEADS * seq * seq * 4 * copies
    stats = jax.devices()[0].memory_stats() or {}
    return need < 0.8 * stats.get("bytes_limit", 64 << 30)


def decode_rows(layout: Layout, seqs) -> list[tuple]:
    """KV-cache bytes the token at position seq - 1 reads in a sparse layer vs a dense one (bf16)."""
    rows = []
    group = HEADS // KV_HEADS
    for seq in seqs:
        nb = layout.num_blocks(seq)
        reads_NB = np.asarray(layout.key_block_mask(jnp.int32(seq - 1), nb))
        # A decode kernel that serves a GQA group together reads the union of its heads' blocks.
        union_KB = reads_NB.reshape(KV_HEADS, group, nb).any(axis=1)
        per_block = 2 * layout.block_size * DIM * 2  # K and V, bf16
        sparse = int(union_KB.sum()) * per_block
        one_head = int(reads_NB.sum(axis=1).mean() * KV_HEADS) * per_block  # if heads shared no blocks
        dense = 2 * seq * KV_HEADS * DIM * 2
        rows.append((seq, sparse, one_head, dense))
    return rows


def run_gpu(args, layout: Layout) -> list[tuple]:
    rows = []
    key = jax.random.split(jax.random.key(0), 4)
    for seq in args.seqs:
        q = jax.random.normal(key[0], (BATCH, seq, HEADS, DIM), jnp.bfloat16)
        k = jax.random.normal(key[1], (BATCH, seq, KV_HEADS, DIM), jnp.bfloat16)
        v = jax.random.normal(key[2], (BATCH, seq, KV_HEADS, DIM), jnp.bfloat16)
        do = jax.random.normal(key[3], (BATCH, seq, HEADS, DIM), jnp.bfloat16)
        sparse_pairs, causal_pairs = _pairs(layout, seq)
        methods = {"cuDNN dense causal": (_cudnn, causal_pairs)}
        if args.backend == "gpu":
            methods["gpu kernel"] = (_attention_fns(layout, "gpu", fuse_dq=True), sparse_pairs)
            methods["gpu kernel, separate dq"] = (_attention_fns(layout, "gpu", fuse_dq=False), sparse_pairs)
        elif args.backend != "reference":
            methods[f"{args.backend} kernel"] = (_attention_fns(layout, args.backend), sparse_pairs)
        methods["reference"] = (_attention_fns(layout, "reference"), sparse_pairs)
        iters = max(3, int(2e5 // seq))
        for pass_ in ("fwd", "fwd+bwd"):
            base = None
            for name, (fwd, pairs) in methods.items():
                if pass_ == "fwd" and name.endswith("separate dq"):
                    continue
                if name == "reference" and not _fits_reference(seq, pass_):
                    rows.append((seq, pass_, name, None, None, None))
                    continue
                fn = jax.jit(fwd if pass_ == "fwd" else _fwd_bwd(fwd))
                inputs = (q, k, v) if pass_ == "fwd" else (q, k, v, do)
                try:
                    ms = _time_ms(fn, *inputs, iters=iters if name != "reference" else 3)
                except Exception as e:  # keep the other rows: one failing method should not hide the rest
                    print(f"{name} {pass_} at {seq} failed: {type(e).__name__}: {str(e)[:500]}", flush=True)
                    rows.append((seq, pass_, name, "failed", None, None))
                    continue
                base = ms if base is None else base
                rows.append((seq, pass_, name, ms, _flops(pairs, pass_) / ms / 1e9, base / ms))
                print(_format_row(rows[-1]), flush=True)
    return rows


def _format_row(row) -> str:
    seq, pass_, name, ms, tflops, ratio = row
    if ms is None:
        return f"| {seq} | {pass_} | {name} | skipped (does not fit in memory) | | |"
    if ms == "failed":
        return f"| {seq} | {pass_} | {name} | failed (see log) | | |"
    return f"| {seq} | {pass_} | {name} | {ms:.3f} | {tflops:.0f} | {ratio:.2f}x |"


def table(rows, decode, card: str) -> str:
    lines = [
        f"### Block-sparse attention, phi-3-small geometry ({card})",
        "",
        f"- date {datetime.date.today().isoformat()}, jax {jax.__version__}, card {card}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- batch {BATCH}, {HEADS} q heads, {KV_HEADS} kv heads, head_dim {DIM}, bf16; targets at 8192 on an "
        f"H100: fwd <= {TARGETS_8K['fwd']} ms, fwd+bwd <= {TARGETS_8K['fwd+bwd']} ms",
        "",
        "| seq | pass | method | ms | TFLOP/s | vs cuDNN |",
        "|---|---|---|---|---|---|",
        *(_format_row(r) for r in rows),
        "",
        "| seq | decode: KV bytes a token reads, sparse layer | dense layer | ratio | ratio for one q head |",
        "|---|---|---|---|---|",
        *(f"| {s} | {sp:,} | {de:,} | {sp / de:.3f} | {one / de:.3f} |" for s, sp, one, de in decode),
        "",
    ]
    return "\n".join(lines)


def smoke() -> None:
    """No GPU: a tiny reference run so the script itself stays tested."""
    layout = Layout(num_heads=4)
    q = jnp.ones((1, 512, 4, 64), jnp.bfloat16)
    kv = jnp.ones((1, 512, 2, 64), jnp.bfloat16)
    fn = jax.jit(_fwd_bwd(_attention_fns(layout, "reference")))
    ms = _time_ms(fn, q, kv, kv, q, iters=2, repeats=2)
    print(f"smoke (reference, seq 512, 4 heads, {jax.devices()[0].platform}): fwd+bwd {ms:.1f} ms")
    print("GPU numbers need a GPU (Hopper: H100/H200); nothing was appended to any results file.")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="gpu", choices=api.BACKENDS, help="kernel backend to time")
    parser.add_argument("--seqs", default="4096,8192,16384,32768",
                        type=lambda s: [int(x) for x in s.split(",")], help="comma-separated lengths")
    parser.add_argument("--out", type=Path, default=None, help="append the markdown table to this file")
    args = parser.parse_args(argv)
    layout = Layout()
    decode = decode_rows(layout, args.seqs)
    if jax.default_backend() != "gpu":
        for s, sp, one, de in decode:
            print(f"decode seq {s}: a token reads {sp:,} of {de:,} dense KV bytes in a sparse layer "
                  f"({sp / de:.3f}; one q head's blocks alone {one / de:.3f})")
        smoke()
        return
    card = jax.devices()[0].device_kind
    print("| seq | pass | method | ms | TFLOP/s | vs cuDNN |")
    rows = run_gpu(args, layout)
    text = table(rows, decode, card)
    print(text)
    if args.out is not None:
        with open(args.out, "a") as f:
            f.write("\n" + text)
        print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
