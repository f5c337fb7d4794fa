"""Block-sparse causal attention for Hopper GPUs in Pallas Mosaic GPU, forward and backward.

Tiling: one CTA owns two 64-row query blocks (one per compute warpgroup, like JAX's attention_mgpu)
and streams key/value tiles of 128 rows. A 128-row tile is gathered from two arbitrary 64-row layout
blocks (two TMA copies), so the vertical blocks of a head (stride 8 apart) fill whole tiles instead of
half-masked ones. Per (head, CTA) lists of key blocks come from `layout.block_mask`; blocks every row
of the CTA may fully see come first and run without a mask, the few edge blocks (diagonal, the oldest
local block, list padding) come last and are masked at token level.

Backward is one kernel per (kv head, 64-row key block): both compute warpgroups share that K/V block
and take alternate entries of the stream of (query head of the group, query block) pairs that see it,
so no work is masked away and dk/dv sum the GQA group in registers. dq partials (fp32) go back with TMA
reduce-add into an fp32 buffer (as FlashAttention-3 does).

Under `interpret=True` the kernels run in Pallas' GPU interpreter on CPU (see gpu_kernels.py for the
few places where that path differs).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.blocksparse import gpu_kernels, reference
from pallas_kernels.blocksparse.gpu_kernels import BLOCK, STEP_KEYS
from pallas_kernels.blocksparse.layout import Layout

_SUPPORTED = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# ---- host-side plans -----------------------------------------------------------------------------


def padded_len(seq_len: int) -> int:
    """Sequence length padded to whole CTA query tiles (two layout blocks)."""
    return -(-seq_len // STEP_KEYS) * STEP_KEYS


@functools.lru_cache(maxsize=8)
def fwd_plan(layout: Layout, num_blocks: int):
    """Key blocks each (head, CTA query tile) visits, as pairs.

    Returns (meta int32 [H, C, 2 * S], steps int32 [H, C, 2]) for C = num_blocks // 2 tiles and S steps:
    meta = block * 4 + bit0 (query block 2c sees it) + 2 * bit1 (query block 2c + 1 sees it); steps =
    (unmasked steps, all steps). Blocks both query blocks see and that lie strictly before both come
    first; padding entries repeat a listed block with no bits set (fully masked, never out of range).
    """
    nb = int(num_blocks)
    if nb % 2:
        raise ValueError(f"num_blocks={nb} must be even (two query blocks per CTA)")
    mask = np.asarray(layout.block_mask(nb))
    lo, hi = mask[:, 0::2, :], mask[:, 1::2, :]  # [H, C, nb]
    seen = lo | hi
    kb = np.arange(nb)[None, None, :]
    first_q = 2 * np.arange(nb // 2)[None, :, None]
    full = lo & hi & (kb < first_q)
    # Sort key: full blocks, then masked ones, then unseen ones (dropped), each in increasing order.
    order = np.argsort(np.where(full, kb, np.where(seen, nb + kb, 2 * nb + kb)), axis=-1, kind="stable")
    n_full = full.sum(-1)
    n_seen = seen.sum(-1)
    width = 2 * max(1, int(-(-n_seen.max() // 2)))
    ids = order[..., :width]
    pos = np.arange(width)[None, None, :]
    valid = pos < n_seen[..., None]
    last = np.take_along_axis(ids, np.maximum(n_seen - 1, 0)[..., None], -1)
    ids = np.where(valid, ids, last)
    bits = (np.take_along_axis(lo, ids, -1) * 1 + np.take_along_axis(hi, ids, -1) * 2) * valid
    meta = (ids * 4 + bits).astype(np.int32)
    steps = np.stack([n_full // 2, -(-n_seen // 2)], -1).astype(np.int32)
    return meta, steps


@functools.lru_cache(maxsize=8)
def bwd_plan(layout: Layout, num_blocks: int, num_kv_heads: int):
    """(query head, query block) pairs that see each (kv head, key block), for the dk/dv/dq kernel.

    Returns (meta int32 [K, nb, W], counts int32 [K, nb], order int32 [K, nb]): meta = (qb * 128 +
    head-in-group) * 2 + (qb == kb), listed by head then query block with the `group` diagonal entries
    last (the only ones needing a causal mask); `order` lists key blocks by decreasing work so the
    longest CTAs start first. Padding repeats the last entry.
    """
    nb, kvh = int(num_blocks), int(num_kv_heads)
    mask = np.asarray(layout.block_mask(nb))
    group = mask.shape[0] // kvh
    if group >= 128:
        raise ValueError(f"{group} query heads per kv head do not fit the metadata packing")
    # [K, kb, G, qb]: who sees key block kb.
    sees = mask.reshape(kvh, group, nb, nb).transpose(0, 3, 1, 2).reshape(kvh, nb, group * nb)
    counts = sees.sum(-1)
    width = max(1, int(counts.max()))
    slot = np.arange(group * nb)[None, None, :]
    diag = (slot % nb) == np.arange(nb)[None, :, None]
    key = np.where(sees, np.where(diag, group * nb + slot, slot), 2 * group * nb + slot)
    order = np.argsort(key, axis=-1, kind="stable")[..., :width]
    last = np.take_along_axis(order, np.maximum(counts - 1, 0)[..., None], -1)
    order = np.where(np.arange(width)[None, None, :] < counts[..., None], order, last)
    head, qb = order // nb, order % nb
    kb = np.arange(nb)[None, :, None]
    meta = ((qb * 128 + head) * 2 + (qb == kb)).astype(np.int32)
    cta_order = np.argsort(-counts, axis=-1, kind="stable").astype(np.int32)
    return meta, counts.astype(np.int32), cta_order


# ---- public entry point --------------------------------------------------------------------------


_HEAD_DIMS = (64, 128)  # 256 would exceed both SMEM (K/V tiles) and registers (accumulators)


def supports(dtype, head_dim: int, layout: Layout) -> bool:
    """Whether the kernels take q/k/v of this dtype and head_dim with this layout (callers pick a fallback)."""
    return jnp.dtype(dtype) in _SUPPORTED and head_dim in _HEAD_DIMS and layout.block_size == BLOCK


def _check(q, k, v, layout: Layout, segment_ids):
    reference.check_inputs(q, k, v, layout, segment_ids)
    if layout.block_size != BLOCK:
        raise ValueError(f"the GPU kernels tile by {BLOCK}-token blocks; layout.block_size={layout.block_size}")
    if q.dtype not in _SUPPORTED or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among bfloat16/float16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] not in _HEAD_DIMS:
        raise ValueError(f"head_dim must be 64 or 128, got {q.shape[-1]}")


def _pad(x, seq_pad, value=0):
    extra = seq_pad - x.shape[1]
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attention(q, k, v, seg, layout, sm_scale, interpret, fuse_dq):
    return _attention_fwd(q, k, v, seg, layout, sm_scale, interpret, fuse_dq)[0]


def _attention_fwd(q, k, v, seg, layout, sm_scale, interpret, fuse_dq):
    seq = q.shape[1]
    seq_pad = padded_len(seq)
    # Padded keys come after every real query, so causality hides them; padded query rows are dropped.
    q_p, k_p, v_p = (_pad(x, seq_pad) for x in (q, k, v))
    seg_p = None if seg is None else _pad(seg.astype(jnp.int32), seq_pad, -1)
    plan = fwd_plan(layout, seq_pad // BLOCK)
    out_p, lse = gpu_kernels.forward(q_p, k_p, v_p, seg_p, plan, sm_scale=sm_scale, interpret=interpret)
    return out_p[:, :seq], (q_p, k_p, v_p, seg_p, out_p, lse)


def _attention_bwd(layout, sm_scale, interpret, fuse_dq, res, do):
    q_p, k_p, v_p, seg_p, out_p, lse = res
    seq = do.shape[1]
    do_p = _pad(do.astype(q_p.dtype), q_p.shape[1])
    delta = jnp.einsum("bthd,bthd->bht", out_p.astype(jnp.float32), do_p.astype(jnp.float32))
    nb = q_p.shape[1] // BLOCK
    kw = dict(sm_scale=sm_scale, interpret=interpret)
    args = (q_p, k_p, v_p, do_p, lse, delta, seg_p)
    bwd_meta = bwd_plan(layout, nb, k_p.shape[2])
    if not fuse_dq:
        dk, dv, _ = gpu_kernels.dkv(*args, None, bwd_meta, fuse_dq=False, **kw)
        dq = gpu_kernels.dq(*args, fwd_plan(layout, nb), **kw)
    elif interpret:
        dk, dv, dq_acc = gpu_kernels.dkv(*args, None, bwd_meta, fuse_dq=True, **kw)
        dq = (dq_acc * sm_scale).astype(q_p.dtype)
    else:
        # fp32 accumulator the kernel's TMA reduce-adds land in; must start at zero.
        dq_ref = jax.new_ref(jnp.zeros(q_p.shape, jnp.float32))
        dk, dv, _ = gpu_kernels.dkv(*args, dq_ref, bwd_meta, fuse_dq=True, **kw)
        dq = (dq_ref[...] * sm_scale).astype(q_p.dtype)
    return dq[:, :seq], dk[:, :seq], dv[:, :seq], None


_attention.defvjp(_attention_fwd, _attention_bwd)


def blocksparse_attention(q, k, v, *, layout: Layout, sm_scale=None, segment_ids=None, backend="gpu",
                          interpret=False, fuse_dq: bool = False):
    """Causal block-sparse attention on Hopper (Pallas Mosaic GPU); differentiable.

    q [batch, seq, q_heads, head_dim], k/v [batch, seq, kv_heads, head_dim] (bf16 or f16); query head h
    uses the layout's pattern of global head h. segment_ids [batch, seq] (optional) further restricts
    attention to equal ids. `interpret` (True or a `plgpu.InterpretGPUParams`) runs the kernels in the
    Pallas GPU interpreter on CPU. `fuse_dq` computes dq in the dk/dv kernel (TMA reduce-add into an
    fp32 buffer); the default, False, uses a separate dq kernel that recomputes the scores, which was
    faster at every length on an H100 (bench/RESULTS.md): the reduce-adds cost more than the recompute.
    """
    if backend != "gpu":
        raise ValueError(f"pallas_kernels.blocksparse.gpu only implements backend='gpu', got {backend!r}")
    _check(q, k, v, layout, segment_ids)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    return _attention(q, k, v, segment_ids, layout, scale, interpret, bool(fuse_dq))
