"""Block-sparse attention speed at phi-3-small geometry against cuDNN dense causal and the reference.

    python bench/attention.py                       # GPU: kernel, cuDNN, reference at 4k/8k/16k/32k
    python bench/attention.py --seqs 8192 --out bench/RESULTS.md   # also append the table there
    python bench/attention.py --flex-seqs 8192,16384   # also torch FlexAttention with the same block mask

Geometry: batch 1, 32 query heads, 8 kv heads, head_dim 128, bf16, the released phi-3-small layout.
TFLOP/s count the work each method must do: 4 * head_dim * (visible query-key pairs) * heads for the
forward (two matmuls) and 3.5x that for forward+backward (five more matmuls in the backward); visible
pairs are the layout's for the block-sparse methods and all causal pairs for cuDNN. "vs cuDNN" is cuDNN's
time divided by the method's time (> 1 is faster). Decode rows give the KV-cache bytes one new token reads
in one sparse layer against a dense layer.

Before timing, the GPU kernel's output and gradients are checked on fresh random inputs: against the
float32 reference where it fits in memory (`--check-seqs`), and at every timed length the separate-dq
(default) and fused-dq backward paths against each other (two independent dq computations), every value
finite.
FlexAttention (`--flex-seqs`) runs in a child process (torch and JAX do not share the GPU's memory pool),
compiled with torch.compile, on a BlockMask built from the same `Layout.block_mask`.

On a machine without a GPU it runs a tiny configuration of the reference only (a smoke test).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import time_ms  # noqa: E402
from pallas_kernels.blocksparse import api  # noqa: E402
from pallas_kernels.blocksparse.layout import Layout  # noqa: E402

BATCH, HEADS, KV_HEADS, DIM = 1, 32, 8, 128
TARGETS_8K = {"fwd": 0.45, "fwd+bwd": 1.6}  # ms on an H100


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


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if not np.isfinite(got).all():
        return float("nan")
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _random_inputs(seq: int, seed: int):
    key = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(key[0], (BATCH, seq, HEADS, DIM), jnp.bfloat16)
    k = jax.random.normal(key[1], (BATCH, seq, KV_HEADS, DIM), jnp.bfloat16)
    v = jax.random.normal(key[2], (BATCH, seq, KV_HEADS, DIM), jnp.bfloat16)
    do = jax.random.normal(key[3], (BATCH, seq, HEADS, DIM), jnp.bfloat16)
    return q, k, v, do


def check_gpu(args, layout: Layout) -> list[tuple]:
    """(seq, comparison, rel err of out, dq, dk, dv): max |got - want| / max |want| per tensor."""
    rows = []
    fused = jax.jit(_fwd_bwd(_attention_fns(layout, "gpu", fuse_dq=True)))
    separate = jax.jit(_fwd_bwd(_attention_fns(layout, "gpu", fuse_dq=False)))
    reference = jax.jit(_fwd_bwd(_attention_fns(layout, "reference")))
    for seq in sorted(set(args.check_seqs) | set(args.seqs)):
        q, k, v, do = _random_inputs(seq, seed=seq)  # fresh inputs, not the timed ones
        try:
            got = fused(q, k, v, do)
            flat = [got[0], *got[1]]
            other = separate(q, k, v, do)
            other = [other[0], *other[1]]
            if seq in args.check_seqs:
                want = reference(*(x.astype(jnp.float32) for x in (q, k, v, do)))
                want = [want[0], *want[1]]
                for what, got_ in (("separate-dq", other), ("fused-dq", flat)):
                    rows.append((seq, f"{what} kernel vs float32 reference",
                                 *(_rel_err(g, w) for g, w in zip(got_, want))))
                    print(_format_check(rows[-1]), flush=True)
                del want
            rows.append((seq, "fused-dq vs separate-dq kernel", *(_rel_err(g, w) for g, w in zip(flat, other))))
            print(_format_check(rows[-1]), flush=True)
        except Exception as e:  # report and go on to timing: the table shows which lengths failed
            print(f"check at {seq} failed: {type(e).__name__}: {str(e)[:2000]}", flush=True)
            rows.append((seq, f"failed: {type(e).__name__}", *([float("nan")] * 4)))
    return rows


def _format_check(row) -> str:
    seq, what, *errs = row
    return f"| {seq} | {what} | " + " | ".join(f"{e:.1e}" for e in errs) + " |"


def flex_rows(args, layout: Layout) -> list[tuple]:
    """torch FlexAttention timings from a child process: [(seq, pass, ms)]."""
    cmd = [sys.executable, __file__, "--flex-child", ",".join(map(str, args.flex_seqs))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                              timeout=args.flex_timeout)
    except subprocess.TimeoutExpired:
        print(f"FlexAttention did not finish in {args.flex_timeout} s; its rows are left out", flush=True)
        return []
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FLEX ")]
    if proc.returncode or not lines:
        print(f"FlexAttention failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
        return []
    return [tuple(json.loads(ln[5:])) for ln in lines]


def flex_child(seqs: list[int]) -> None:
    """Runs in its own process: torch FlexAttention on the layout's block mask, bf16, causal."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    layout = Layout()
    attend = torch.compile(flex_attention)
    torch.manual_seed(0)
    for seq in seqs:
        nb = layout.num_blocks(seq)
        blocks = torch.from_numpy(np.array(layout.block_mask(nb))).cuda()  # a writable copy
        bs = layout.block_size

        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & blocks[h, q_idx // bs, kv_idx // bs]

        mask = create_block_mask(mask_mod, 1, HEADS, seq, seq, device="cuda")
        q = torch.randn(BATCH, HEADS, seq, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(BATCH, KV_HEADS, seq, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(BATCH, KV_HEADS, seq, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn(BATCH, HEADS, seq, DIM, device="cuda", dtype=torch.bfloat16)
        fwd = lambda: attend(q, k, v, block_mask=mask, enable_gqa=True)  # noqa: E731

        def fwd_bwd():
            torch.autograd.grad(fwd(), (q, k, v), do)

        iters = max(3, int(2e5 // seq))
        for pass_, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            fn()
            torch.cuda.synchronize()
            samples = []
            for _ in range(5):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    fn()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end) / iters)
            print("FLEX " + json.dumps([seq, pass_, statistics.median(samples)]), flush=True)


def run_gpu(args, layout: Layout) -> list[tuple]:
    rows = []
    for seq in args.seqs:
        q, k, v, do = _random_inputs(seq, seed=0)
        sparse_pairs, causal_pairs = _pairs(layout, seq)
        methods = {"cuDNN dense causal": (_cudnn, causal_pairs)}
        if args.backend == "gpu":
            methods["gpu kernel"] = (_attention_fns(layout, "gpu"), sparse_pairs)
            methods["gpu kernel, fused dq"] = (_attention_fns(layout, "gpu", fuse_dq=True), sparse_pairs)
        elif args.backend != "reference":
            methods[f"{args.backend} kernel"] = (_attention_fns(layout, args.backend), sparse_pairs)
        methods["reference"] = (_attention_fns(layout, "reference"), sparse_pairs)
        flex = {p: ms for s, p, ms in args.flex_results if s == seq}
        iters = max(3, int(2e5 // seq))
        for pass_ in ("fwd", "fwd+bwd"):
            base = None
            for name, (fwd, pairs) in methods.items():
                if pass_ == "fwd" and name.endswith("fused dq"):
                    continue
                if name == "reference" and not _fits_reference(seq, pass_):
                    rows.append((seq, pass_, name, None, None, None))
                    continue
                fn = jax.jit(fwd if pass_ == "fwd" else _fwd_bwd(fwd))
                inputs = (q, k, v) if pass_ == "fwd" else (q, k, v, do)
                try:
                    ms = time_ms(fn, *inputs, iters=iters if name != "reference" else 3)
                except Exception as e:  # keep the other rows: one failing method should not hide the rest
                    print(f"{name} {pass_} at {seq} failed: {type(e).__name__}: {str(e)[:500]}", flush=True)
                    rows.append((seq, pass_, name, "failed", None, None))
                    continue
                base = ms if base is None else base
                rows.append((seq, pass_, name, ms, _flops(pairs, pass_) / ms / 1e9, base / ms))
                print(_format_row(rows[-1]), flush=True)
            if pass_ in flex and base is not None:
                rows.append((seq, pass_, "torch FlexAttention, same block mask", flex[pass_],
                             _flops(sparse_pairs, pass_) / flex[pass_] / 1e9, base / flex[pass_]))
                print(_format_row(rows[-1]), flush=True)
    return rows


def _format_row(row) -> str:
    seq, pass_, name, ms, tflops, ratio = row
    if ms is None:
        return f"| {seq} | {pass_} | {name} | skipped (does not fit in memory) | | |"
    if ms == "failed":
        return f"| {seq} | {pass_} | {name} | failed (see log) | | |"
    return f"| {seq} | {pass_} | {name} | {ms:.3f} | {tflops:.0f} | {ratio:.2f}x |"


def table(rows, checks, decode, card: str, torch_version: str | None) -> str:
    lines = [
        f"### Block-sparse attention, phi-3-small geometry ({card})",
        "",
        f"- date {datetime.date.today().isoformat()}, jax {jax.__version__}"
        + (f", torch {torch_version}" if torch_version else "") + f", card {card}",
        f"- command: `python {shlex.join(sys.argv)}`",
        f"- batch {BATCH}, {HEADS} q heads, {KV_HEADS} kv heads, head_dim {DIM}, bf16; targets at 8192 on an "
        f"H100: fwd <= {TARGETS_8K['fwd']} ms, fwd+bwd <= {TARGETS_8K['fwd+bwd']} ms",
        "",
        "| seq | pass | method | ms | TFLOP/s | vs cuDNN |",
        "|---|---|---|---|---|---|",
        *(_format_row(r) for r in rows),
        "",
        "| seq | correctness check (fresh random inputs) | out | dq | dk | dv |",
        "|---|---|---|---|---|---|",
        *(_format_check(r) for r in checks),
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
    ms = time_ms(fn, q, kv, kv, q, iters=2, repeats=2)
    print(f"smoke (reference, seq 512, 4 heads, {jax.devices()[0].platform}): fwd+bwd {ms:.1f} ms")
    print("GPU numbers need a GPU (Hopper: H100/H200); nothing was appended to any results file.")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="gpu", choices=api.BACKENDS, help="kernel backend to time")
    parser.add_argument("--seqs", default="4096,8192,16384,32768",
                        type=lambda s: [int(x) for x in s.split(",")], help="comma-separated lengths")
    parser.add_argument("--check-seqs", default="4096", type=lambda s: [int(x) for x in s.split(",") if x],
                        help="lengths at which the kernel is checked against the float32 reference")
    parser.add_argument("--flex-seqs", default="", type=lambda s: [int(x) for x in s.split(",") if x],
                        help="lengths at which torch FlexAttention is timed too (needs torch with CUDA)")
    parser.add_argument("--flex-timeout", type=float, default=300, help="seconds allowed for the FlexAttention child")
    parser.add_argument("--flex-child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="append the markdown table to this file")
    args = parser.parse_args(argv)
    if args.flex_child:
        flex_child([int(x) for x in args.flex_child.split(",")])
        return
    layout = Layout()
    decode = decode_rows(layout, args.seqs)
    if jax.default_backend() != "gpu":
        for s, sp, one, de in decode:
            print(f"decode seq {s}: a token reads {sp:,} of {de:,} dense KV bytes in a sparse layer "
                  f"({sp / de:.3f}; one q head's blocks alone {one / de:.3f})")
        smoke()
        return
    card = jax.devices()[0].device_kind
    args.flex_results = flex_rows(args, layout) if args.flex_seqs else []
    torch_version = None
    if args.flex_results:
        import importlib.metadata
        torch_version = importlib.metadata.version("torch")
    checks = check_gpu(args, layout) if args.backend == "gpu" else []
    print("| seq | pass | method | ms | TFLOP/s | vs cuDNN |")
    rows = run_gpu(args, layout)
    text = table(rows, checks, decode, card, torch_version)
    print(text)
    if args.out is not None:
        with open(args.out, "a") as f:
            f.write("\n" + text)
        print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
