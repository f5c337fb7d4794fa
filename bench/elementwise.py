"""The train step's memory-bound kernels in alternative forms, timed on one device: the leads of the H100
account in bench/RESULTS.md ("where the step goes").

- logsumexp of the loss over [B, T, V] bf16 logits: one read (a variadic running max / sum-exp reduce),
  two plain reductions (the max, then the sum of exp), and the Pallas Triton kernel
  (`phi3_jax.ops.rowwise`); phi3_jax.ops.cross_entropy takes the first off a CPU, the second on one
  (`cross_entropy.LOGSUMEXP` picks another).
- the loss's row pass, the logsumexp and the logits gradient (softmax - onehot) * scale: XLA's (either
  logsumexp, then a gradient pass) against the Pallas Triton kernel that makes both from one program per
  row (`row_xent_grad`, what `cross_entropy.LOGSUMEXP = "kernel"` runs in the train step).
- SwiGLU backward, d [gate | up] from [gate | up] and d out: one pass over the whole width (phi3_jax's
  `layers.swiglu`), autodiff of split + silu * up (XLA's own assembly), the two halves computed apart and
  concatenated (one kernel on a GPU, XLA's concatenate emitter: a loop per half), and the halves as
  separate outputs (what a gate_up projection taking its gradient in halves would need), and the Pallas
  Triton kernel (`layers.SWIGLU_BACKWARD` picks the model's form).
- RMSNorm forward over [B, T, hidden]: XLA's (a sum-of-squares pass, then the scaling) against the Pallas
  Triton kernel that loads each row once (`layers.RMS_NORM_FORWARD`); and the same with the residual add
  before it (h = x + a, then the norm of h; in the train step XLA folds that add into the matmul making
  `a`, after copying x, so this group times the kernel's side alone). The norm's backward pass with the
  residual stream's gradient added: XLA's two passes against the kernel that loads each row once
  (`layers.RMS_NORM_BACKWARD`) at several rows per program.

Off a GPU the Pallas kernels run in their interpreter: slow, and timed only to check them.

    python bench/elementwise.py --device gpu          # phi-3-mini's shapes: batch 4 x 4096, vocab 32064, ffn 8192,
                                                      # hidden 3072
    python bench/elementwise.py --append bench/RESULTS.md

Each form is checked against the first of its group before it is timed. GB/s counts the bytes the op
must move at least (its inputs once, its outputs once), so forms that move more show a lower rate.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_entry, command_line, cpu_name, time_ms  # noqa: E402

GPU_SHAPE = dict(batch=4, seq=4096, vocab=32064, ffn=8192, hidden=3072)
CPU_SHAPE = dict(batch=2, seq=128, vocab=2048, ffn=688, hidden=256)


def logsumexp_forms():
    import jax.numpy as jnp

    from phi3_jax.ops import cross_entropy
    from phi3_jax.ops.rowwise import row_logsumexp

    def form(name):
        return lambda l_BTV: cross_entropy._logsumexp(l_BTV.astype(jnp.float32), name)

    def kernel(block, num_warps):
        return lambda l_BTV: row_logsumexp(l_BTV, block=block, num_warps=num_warps)

    return {"one read (phi3_jax off a CPU)": form("one_read"), "two reductions (phi3_jax on a CPU)": form("two_reductions"),
            "Pallas Triton kernel (block 4096, 8 warps: its default)": kernel(4096, 8),
            "Pallas Triton kernel (block 2048, 4 warps)": kernel(2048, 4),
            "Pallas Triton kernel (block 8192, 8 warps)": kernel(8192, 8),
            "Pallas Triton kernel (block 32768: a phi-3 row at once, 32 warps)": kernel(32768, 32)}


def loss_rows_forms():
    import jax.numpy as jnp

    from phi3_jax.ops import cross_entropy
    from phi3_jax.ops.rowwise import row_xent_grad

    def xla(form):
        def rows(l_BTV, t_BT, c_BT):  # cross_entropy's XLA path: the logsumexp, then the gradient pass
            logits_BTV = l_BTV.astype(jnp.float32)
            lse_BT = cross_entropy._logsumexp(logits_BTV, form)
            return lse_BT, cross_entropy.dlogits(logits_BTV, lse_BT, t_BT, c_BT).astype(l_BTV.dtype)

        return rows

    def kernel(block, num_warps):
        return lambda l, t, c: row_xent_grad(l, t, c, block=block, num_warps=num_warps)

    return {"XLA, one-read logsumexp (phi3_jax off a CPU)": xla("one_read"),
            "XLA, two-reduction logsumexp": xla("two_reductions"),
            "Pallas Triton kernel (block 4096, 8 warps: its default)": kernel(4096, 8),
            "Pallas Triton kernel (block 2048, 4 warps)": kernel(2048, 4),
            # the whole row in one block: the gradient pass re-reads it from L1 / L2, not memory
            "Pallas Triton kernel (block 16384, 16 warps)": kernel(16384, 16),
            "Pallas Triton kernel (block 32768: a phi-3 row at once, 32 warps)": kernel(32768, 32)}


def rms_norm_forms():
    from phi3_jax.model import layers
    from phi3_jax.ops import rowwise

    return {"XLA (phi3_jax's default)": lambda x, s: layers.plain_rms_norm(x, s, 1e-5),
            "Pallas Triton kernel (8 warps: its default)": lambda x, s: rowwise.rms_norm(x, s, 1e-5)[0],
            "Pallas Triton kernel (4 warps)": lambda x, s: rowwise.rms_norm(x, s, 1e-5, num_warps=4)[0]}


def add_rms_norm_forms():
    from phi3_jax.model import layers
    from phi3_jax.ops import rowwise

    def xla(x, a, s):
        h = x + a
        return h, layers.plain_rms_norm(h, s, 1e-5)

    return {"XLA (phi3_jax's default: the add, then the norm)": xla,
            "Pallas Triton kernel (8 warps: its default)": lambda x, a, s: rowwise.add_rms_norm(x, a, s, 1e-5)[:2],
            "Pallas Triton kernel (4 warps)": lambda x, a, s: rowwise.add_rms_norm(x, a, s, 1e-5, num_warps=4)[:2]}


def rms_norm_backward_forms():
    import jax.numpy as jnp

    from phi3_jax.model import layers
    from phi3_jax.ops import rowwise

    def xla(x, r, s, dy, dres):
        return layers._rms_norm_grads((x, s, r), dy, dres)  # in the default form (RMS_NORM_BACKWARD "xla")

    def kernel(rows, num_warps=8):
        def grads(x, r, s, dy, dres):
            dx, ds_GD = rowwise.rms_norm_backward(x, r, s, dy, dres, rows=rows, num_warps=num_warps)
            return dx, jnp.sum(ds_GD, axis=0).astype(s.dtype)

        return grads

    return {"XLA (phi3_jax's default: the rows' dot products, then dx and d scale)": xla,
            "Pallas Triton kernel (32 rows a program, 8 warps: its default)": kernel(32),
            "Pallas Triton kernel (16 rows a program)": kernel(16),
            "Pallas Triton kernel (64 rows a program)": kernel(64),
            "Pallas Triton kernel (32 rows a program, 4 warps)": kernel(32, 4)}


def swiglu_backward_forms():
    import jax
    import jax.numpy as jnp

    from phi3_jax.model import layers
    from phi3_jax.ops.rowwise import swiglu_backward

    def autodiff(z_BTF, dh_BTI):
        return jax.vjp(lambda z: layers.plain_swiglu(z.astype(jnp.float32)).astype(z.dtype), z_BTF)[1](dh_BTI)[0]

    def one_pass(z_BTF, dh_BTI):
        return layers._swiglu_bwd(z_BTF, dh_BTI)[0]

    def kernel(block, num_warps):
        return lambda z, dh: swiglu_backward(z, dh, block=block, num_warps=num_warps)

    def concatenated(z_BTF, dh_BTI):  # XLA:GPU's concatenate emitter: one loop per half
        return jnp.concatenate(layers.swiglu_backward_halves(z_BTF, dh_BTI), axis=-1)

    return {"one pass over gate and up (phi3_jax)": one_pass,
            "autodiff of split": autodiff,
            "halves, concatenated": concatenated,
            "halves, not concatenated": layers.swiglu_backward_halves,
            "Pallas Triton kernel (block 1024, 4 warps: its default)": kernel(1024, 4),
            "Pallas Triton kernel (block 2048, 8 warps)": kernel(2048, 8),
            "Pallas Triton kernel (block 512, 4 warps)": kernel(512, 4)}


def run(shape: dict, iters: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    B, T, V, I, D = shape["batch"], shape["seq"], shape["vocab"], shape["ffn"], shape["hidden"]
    k1, k2, k3, k4, k5, k6 = jax.random.split(jax.random.key(0), 6)
    logits = (3 * jax.random.normal(k1, (B, T, V), jnp.float32)).astype(jnp.bfloat16)
    targets = jax.random.randint(k4, (B, T), 0, V)
    scale = jnp.full((B, T), 1.0 / (B * T), jnp.float32)
    x = jax.random.normal(k5, (B, T, D), jnp.float32).astype(jnp.bfloat16)
    a = jax.random.normal(k1, (B, T, D), jnp.float32).astype(jnp.bfloat16)
    d_res = jax.random.normal(k6, (B, T, D), jnp.float32).astype(jnp.bfloat16)
    x32 = x.astype(jnp.float32)
    inv_norm = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-5)
    norm_scale = jnp.linspace(0.5, 1.5, D, dtype=jnp.float32).astype(jnp.bfloat16)
    z = jax.random.normal(k2, (B, T, 2 * I), jnp.float32).astype(jnp.bfloat16)
    dh = jax.random.normal(k3, (B, T, I), jnp.float32).astype(jnp.bfloat16)
    groups = [("logsumexp", logsumexp_forms(), (logits,), logits.nbytes + B * T * 4),
              ("loss rows (logsumexp + logits gradient)", loss_rows_forms(), (logits, targets, scale),
               2 * logits.nbytes + B * T * 16),
              ("SwiGLU backward", swiglu_backward_forms(), (z, dh), 2 * z.nbytes + dh.nbytes),
              ("RMSNorm forward", rms_norm_forms(), (x, norm_scale), 2 * x.nbytes),
              ("residual add + RMSNorm forward", add_rms_norm_forms(), (x, a, norm_scale), 4 * x.nbytes),
              ("RMSNorm backward (with the residual's gradient)", rms_norm_backward_forms(),
               (x, inv_norm, norm_scale, a, d_res), 4 * x.nbytes)]
    rows = []
    def relative(a, b):
        return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))

    for op, forms, args, min_bytes in groups:
        first = None
        for name, fn in forms.items():
            fn = jax.jit(fn)
            outs = [np.asarray(o, np.float32) for o in jax.tree.leaves(fn(*args))]
            first = outs if first is None else first
            # Output by output where the forms return the same ones (the loss rows' logsumexp and gradient
            # differ in scale), else their concatenation (the SwiGLU halves against the whole width).
            pairs = (zip(outs, first) if len(outs) == len(first) else
                     [(np.concatenate(outs, axis=-1), np.concatenate(first, axis=-1))])
            diff = max(relative(a, b) for a, b in pairs)
            # bf16 outputs: one rounding apart; float32 logsumexp: summation order
            if not all(np.all(np.isfinite(o)) for o in outs) or diff > 1e-2:
                raise SystemExit(f"{op}: {name} differs from {next(iter(forms))} (max relative {diff:.2e})")
            ms = time_ms(fn, *args, iters=iters)
            rows.append(dict(op=op, form=name, ms=ms, gbps=min_bytes / ms / 1e6, diff=diff))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| op | form | ms | GB/s (least bytes) | max relative difference to the first form |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['form']} | {r['ms']:.3f} | {r['gbps']:.0f} | {r['diff']:.1e} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--iters", type=int, default=20, help="back-to-back calls per timing (median of 5)")
    p.add_argument("--append", metavar="FILE", help="append a markdown entry with the table to FILE")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cuda" if args.device == "gpu" else "cpu")
    import jax

    shape = GPU_SHAPE if args.device == "gpu" else CPU_SHAPE
    rows = run(shape, args.iters)
    text = table(rows)
    print(text)
    if args.append:
        card = jax.devices()[0].device_kind if args.device == "gpu" else cpu_name()
        append_entry(args.append, "\n".join([
            f"## elementwise kernels, {args.device}, {datetime.date.today().isoformat()}", "",
            f"- card: {card}",
            f"- shapes: batch {shape['batch']} x {shape['seq']}, vocab {shape['vocab']}, ffn {shape['ffn']}, "
            f"hidden {shape['hidden']}, bf16",
            f"- versions: jax {jax.__version__}",
            f"- command: `{command_line('bench/elementwise.py', argv)}`", "", text, ""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
