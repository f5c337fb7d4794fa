"""Kernel bodies of the TPU block-sparse attention (forward, dq, dk/dv); tpu.py builds the calls.

One grid step handles one non-empty (query tile, key tile) pair taken from a scalar-prefetched schedule
(schedule.py). FULL tiles skip the layout mask; PARTIAL tiles rebuild it from token positions.
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.blocksparse import schedule
from pallas_kernels.blocksparse.layout import FULL, PARTIAL, Layout

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
NT_DIMS = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T
NN_DIMS = (((1,), (0,)), ((), ()))
LANES = 128


def mxu_dot(a, b, dims=NN_DIMS):
    """float32-accumulating matmul with an explicit precision: the global jax_default_matmul_precision
    must not reach Mosaic (it rejects HIGHEST on bfloat16 operands); float32 keeps full precision."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class Config:
    """Static parameters of one attention call (hashable: it is a custom_vjp nondiff argument)."""

    layout: Layout
    block_q: int
    block_k: int
    group: int  # query heads per kv head
    sm_scale: float
    has_segments: bool
    interpret: object = False


def default_tiles(layout: Layout, seq_len: int, block_q=None, block_k=None) -> tuple[int, int]:
    """Key tiles: the smallest multiple of the layout block and of the 128 lanes, so the 64-token vertical
    blocks waste little compute. Query tiles: 512 tokens (per-step overhead dominates smaller tiles, and a
    taller tile only widens the local window's union by a few blocks). Both shrink to short sequences."""
    B = layout.block_size
    base_k = B * LANES // math.gcd(B, LANES)
    base_q = base_k * max(1, 512 // base_k)
    short = -(-seq_len // B) * B
    return (block_q or min(base_q, short)), (block_k or min(base_k, short))


# ---- in-kernel masks ---------------------------------------------------------------------------------


def _div(x, d: int):
    return lax.shift_right_logical(x, d.bit_length() - 1) if d & (d - 1) == 0 else lax.div(x, d)


def _mod(x, d: int):
    return x & (d - 1) if d & (d - 1) == 0 else lax.rem(x, d)


def layout_mask(layout: Layout, head, q_pos, k_pos):
    """Token rule of spec §5.2 on non-negative int32 positions (broadcast together)."""
    qb, kb = _div(q_pos, layout.block_size), _div(k_pos, layout.block_size)
    offset = _mod(head * layout.head_step + 1, layout.vert_stride)
    vertical = _mod(kb + offset, layout.vert_stride) == 0
    return (k_pos <= q_pos) & (((qb - kb) < layout.local_blocks) | vertical)


def _tile_mask(cfg: Config, head, q_tile, k_tile, shape, q_axis: int, apply_layout: bool, seg_q, seg_k):
    """bool mask of one tile, or None when nothing is masked. q_axis is 0 for [bq, bk] scores, 1 for [bk, bq]."""
    mask = None
    if apply_layout:
        q_pos = q_tile * cfg.block_q + lax.broadcasted_iota(jnp.int32, shape, q_axis)
        k_pos = k_tile * cfg.block_k + lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
        mask = layout_mask(cfg.layout, head, q_pos, k_pos)
    if seg_q is not None:
        same = seg_q == seg_k
        mask = same if mask is None else mask & same
    return mask


def _column(row_1Q):
    """[1, n] -> [n, 1] through a 2-D transpose (supported for 32-bit values on every TPU)."""
    return jnp.transpose(jnp.broadcast_to(row_1Q, (8, row_1Q.shape[1])))[:, :1]


def _row(col_Q1):
    return jnp.transpose(jnp.broadcast_to(col_Q1, (col_Q1.shape[0], LANES)))[:1, :]


def _run_by_kind(kind, body):
    """Dispatches one schedule step: FULL without the layout mask, PARTIAL with it, EMPTY not at all."""
    pl.when(kind == FULL)(lambda: body(False))
    pl.when(kind == PARTIAL)(lambda: body(True))


# ---- kernels -----------------------------------------------------------------------------------------


def fwd_kernel(sched_ref, pattern_ref, q_ref, k_ref, v_ref, *refs, cfg: Config, width: int):
    if cfg.has_segments:
        seg_q_ref, seg_k_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
    else:
        (o_ref, lse_ref, m_ref, l_ref, acc_ref), seg_q_ref, seg_k_ref = refs, None, None
    head, step = pl.program_id(1), pl.program_id(2)
    q_tile, k_tile, kind, first, last, _ = schedule.decode(sched_ref[pattern_ref[head] * width + step])

    @pl.when(first == 1)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def body(apply_layout: bool):
        v_KD = v_ref[...]
        s_QK = mxu_dot(q_ref[...], k_ref[...], NT_DIMS)
        s_QK = s_QK * cfg.sm_scale
        seg_q = seg_q_ref[...] if seg_q_ref is not None else None
        seg_k = seg_k_ref[...] if seg_k_ref is not None else None
        mask = _tile_mask(cfg, head, q_tile, k_tile, s_QK.shape, 0, apply_layout, seg_q, seg_k)
        if mask is not None:
            s_QK = jnp.where(mask, s_QK, MASK_VALUE)
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(s_QK, axis=1, keepdims=True))
        p_QK = jnp.exp(s_QK - m_new)
        if mask is not None:
            # Rows with nothing allowed yet sit at MASK_VALUE, where exp() of a masked entry is 1.
            p_QK = jnp.where(mask, p_QK, 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p_QK, axis=1, keepdims=True)
        pv = mxu_dot(p_QK.astype(v_KD.dtype), v_KD)
        acc_ref[...] = alpha * acc_ref[...] + pv
        m_ref[...] = m_new

    _run_by_kind(kind, body)

    @pl.when(last == 1)
    def _finish():
        l_Q1 = l_ref[...]
        alive = l_Q1 > 0.0
        o_ref[...] = jnp.where(alive, acc_ref[...] / jnp.where(alive, l_Q1, 1.0), 0.0).astype(o_ref.dtype)
        # +inf makes the backward's exp(s - lse) exactly 0 on rows that saw no key.
        lse_Q1 = jnp.where(alive, m_ref[...] + jnp.log(jnp.where(alive, l_Q1, 1.0)), jnp.inf)
        lse_ref[...] = _row(lse_Q1)


def dq_kernel(sched_ref, pattern_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, cfg: Config,
               width: int):
    if cfg.has_segments:
        seg_q_ref, seg_k_ref, dq_ref, acc_ref = refs
    else:
        (dq_ref, acc_ref), seg_q_ref, seg_k_ref = refs, None, None
    head, step = pl.program_id(1), pl.program_id(2)
    q_tile, k_tile, kind, first, last, _ = schedule.decode(sched_ref[pattern_ref[head] * width + step])

    @pl.when(first == 1)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def body(apply_layout: bool):
        k_KD = k_ref[...]
        s_QK = mxu_dot(q_ref[...], k_KD, NT_DIMS) * cfg.sm_scale
        p_QK = jnp.exp(s_QK - _column(lse_ref[...]))
        seg_q = seg_q_ref[...] if seg_q_ref is not None else None
        seg_k = seg_k_ref[...] if seg_k_ref is not None else None
        mask = _tile_mask(cfg, head, q_tile, k_tile, s_QK.shape, 0, apply_layout, seg_q, seg_k)
        if mask is not None:
            p_QK = jnp.where(mask, p_QK, 0.0)
        dp_QK = mxu_dot(do_ref[...], v_ref[...], NT_DIMS)
        ds_QK = p_QK * (dp_QK - _column(di_ref[...]))
        acc_ref[...] += mxu_dot(ds_QK.astype(k_KD.dtype), k_KD)

    _run_by_kind(kind, body)

    @pl.when(last == 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * cfg.sm_scale).astype(dq_ref.dtype)


def dkv_kernel(sched_ref, set_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, cfg: Config,
                width: int):
    if cfg.has_segments:
        seg_q_ref, seg_k_ref, dk_ref, dv_ref, dk_acc_ref, dv_acc_ref = refs
    else:
        (dk_ref, dv_ref, dk_acc_ref, dv_acc_ref), seg_q_ref, seg_k_ref = refs, None, None
    kv_head, step = pl.program_id(1), pl.program_id(2)
    q_tile, k_tile, kind, first, last, g = schedule.decode(sched_ref[set_ref[kv_head] * width + step])
    head = kv_head * cfg.group + g

    @pl.when(first == 1)
    def _init():
        dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
        dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

    def body(apply_layout: bool):
        # Key-major scores [bk, bq]: per-query vectors (lse, di, segment ids) broadcast as rows.
        q_QD, do_QD = q_ref[...], do_ref[...]
        s_KQ = mxu_dot(k_ref[...], q_QD, NT_DIMS) * cfg.sm_scale
        p_KQ = jnp.exp(s_KQ - lse_ref[...])
        seg_q = seg_q_ref[...] if seg_q_ref is not None else None
        seg_k = seg_k_ref[...] if seg_k_ref is not None else None
        mask = _tile_mask(cfg, head, q_tile, k_tile, s_KQ.shape, 1, apply_layout, seg_q, seg_k)
        if mask is not None:
            p_KQ = jnp.where(mask, p_KQ, 0.0)
        dv_acc_ref[...] += mxu_dot(p_KQ.astype(do_QD.dtype), do_QD)
        dp_KQ = mxu_dot(v_ref[...], do_QD, NT_DIMS)
        ds_KQ = p_KQ * (dp_KQ - di_ref[...])
        dk_acc_ref[...] += mxu_dot(ds_KQ.astype(q_QD.dtype), q_QD)

    _run_by_kind(kind, body)

    @pl.when(last == 1)
    def _finish():
        dk_ref[...] = (dk_acc_ref[...] * cfg.sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


