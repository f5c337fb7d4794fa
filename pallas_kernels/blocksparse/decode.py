"""Block-sparse decode: one new query per sequence against a dense KV cache (spec §5.4).

The cache is [batch, max_len, kv_heads, head_dim] and holds every token (the new token's K/V included);
`lengths[b]` counts the valid tokens, so the query sits at position lengths[b] - 1. The kernel reads only
the key blocks some query head of a kv head needs (local window plus that group's strided blocks) and
masks per head inside them. Cache entries at or past a sequence's length are never trusted: they may
hold anything, NaN included.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.blocksparse import schedule
from pallas_kernels.blocksparse.layout import Layout
from pallas_kernels.blocksparse.tpu_kernels import MASK_VALUE, NT_DIMS, layout_mask, mxu_dot


def _check(q_BNH, k_BLKH, v_BLKH, lengths_B, layout: Layout) -> tuple[int, int]:
    batch, q_heads, head_dim = q_BNH.shape
    if k_BLKH.shape != v_BLKH.shape or k_BLKH.ndim != 4 or k_BLKH.shape[0] != batch \
            or k_BLKH.shape[3] != head_dim:
        raise ValueError(f"caches must be [batch={batch}, max_len, kv_heads, head_dim={head_dim}], "
                         f"got {k_BLKH.shape}, {v_BLKH.shape}")
    kv_heads = k_BLKH.shape[2]
    if q_heads != layout.num_heads or q_heads % kv_heads:
        raise ValueError(f"q has {q_heads} heads; need layout.num_heads={layout.num_heads}, "
                         f"a multiple of kv_heads={kv_heads}")
    if lengths_B.shape != (batch,):
        raise ValueError(f"lengths must be [batch={batch}], got {lengths_B.shape}")
    return kv_heads, q_heads // kv_heads


def decode_reference(q_BNH, k_BLKH, v_BLKH, lengths_B, *, layout: Layout, sm_scale=None):
    """Plain-JAX decode in float32; a sequence of length 0 gets a zero output."""
    kv_heads, group = _check(q_BNH, k_BLKH, v_BLKH, lengths_B, layout)
    batch, q_heads, head_dim = q_BNH.shape
    max_len = k_BLKH.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    pos_B = lengths_B.astype(jnp.int32) - 1
    k_pos = jnp.arange(max_len)
    mask_BNL = jax.vmap(lambda p: layout.token_mask(p[None], k_pos)[:, 0])(jnp.maximum(pos_B, 0))
    mask_BNL = mask_BNL & (k_pos[None, None, :] <= pos_B[:, None, None])
    valid_BL = k_pos[None, :] <= pos_B[:, None]
    v_BLKH = jnp.where(valid_BL[:, :, None, None], v_BLKH.astype(jnp.float32), 0.0)
    q_BKGH = q_BNH.astype(jnp.float32).reshape(batch, kv_heads, group, head_dim)
    s_BKGL = jnp.einsum("bkgh,blkh->bkgl", q_BKGH, k_BLKH.astype(jnp.float32)) * scale
    mask_BKGL = mask_BNL.reshape(batch, kv_heads, group, max_len)
    s_BKGL = jnp.where(mask_BKGL, s_BKGL, -jnp.inf)
    m_BKG1 = jnp.max(s_BKGL, axis=-1, keepdims=True)
    p_BKGL = jnp.exp(s_BKGL - jnp.where(jnp.isfinite(m_BKG1), m_BKG1, 0.0))
    l_BKG1 = jnp.sum(p_BKGL, axis=-1, keepdims=True)
    o_BKGH = jnp.einsum("bkgl,blkh->bkgh", p_BKGL / jnp.where(l_BKG1 == 0, 1.0, l_BKG1), v_BLKH)
    return o_BKGH.reshape(q_BNH.shape).astype(q_BNH.dtype)


def _group_blocks(layout: Layout, position: int, kv_heads: int) -> np.ndarray:
    """bool [kv_heads, blocks up to position's]: key blocks read for a query at a static position."""
    qb = position // layout.block_size
    kb = np.arange(qb + 1)
    vertical_NJ = (kb[None, :] + layout.head_offsets()[:, None]) % layout.vert_stride == 0
    need_NJ = ((qb - kb) < layout.local_blocks)[None, :] | vertical_NJ
    return need_NJ.reshape(kv_heads, -1, qb + 1).any(axis=1)


def max_blocks_per_group(layout: Layout, max_len: int, kv_heads: int) -> int:
    """Static bound on the key blocks any (sequence, kv head) reads: the grid's step count."""
    last = (-(-max_len // layout.block_size) - 1) * layout.block_size
    # The count only grows with the query block, so the last block bounds every length.
    return int(_group_blocks(layout, last, kv_heads).sum(axis=-1).max())


def block_lists(layout: Layout, lengths_B, max_len: int, kv_heads: int):
    """(ids int32 [batch, kv_heads, M], counts int32 [batch, kv_heads]): ascending key blocks to read,
    the union over each kv head's query heads; entries past `counts` repeat the last id."""
    nb = -(-max_len // layout.block_size)
    steps = max_blocks_per_group(layout, max_len, kv_heads)
    pos_B = jnp.maximum(lengths_B.astype(jnp.int32) - 1, 0)
    need_BNJ = layout.key_block_mask(pos_B, nb)
    need_BKJ = need_BNJ.reshape(pos_B.shape[0], kv_heads, -1, nb).any(axis=2)
    counts_BK = need_BKJ.sum(axis=-1).astype(jnp.int32)
    # Stable sort of "not needed" keeps the needed block ids first and ascending.
    order_BKJ = jnp.argsort(~need_BKJ, axis=-1, stable=True)[..., :steps].astype(jnp.int32)
    last_BK1 = jnp.take_along_axis(order_BKJ, jnp.maximum(counts_BK - 1, 0)[..., None], axis=-1)
    ids_BKM = jnp.where(jnp.arange(steps) < counts_BK[..., None], order_BKJ, last_BK1)
    return ids_BKM, counts_BK


def read_bytes(layout: Layout, position: int, kv_heads: int, head_dim: int, itemsize: int = 2):
    """(bytes of K and V the sparse decode reads for a query at `position`, bytes a dense read needs),
    per layer and sequence. Sparse reads whole blocks, so the query's own block counts in full."""
    need = _group_blocks(layout, int(position), kv_heads)
    per_token = 2 * head_dim * itemsize  # K and V
    return int(need.sum()) * layout.block_size * per_token, (position + 1) * kv_heads * per_token


def _decode_kernel(lengths_ref, ids_ref, counts_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref, *,
                   layout: Layout, group: int, sm_scale: float, steps: int):
    b, kv_head, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row = b * pl.num_programs(1) + kv_head
    block_k = k_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(j < counts_ref[row])
    def _step():
        pos = lengths_ref[b] - 1
        k_start = ids_ref[row * steps + j] * block_k
        q_GD = q_ref[...]
        s_GK = mxu_dot(q_GD, k_ref[...], NT_DIMS) * sm_scale
        head_GK = kv_head * group + lax.broadcasted_iota(jnp.int32, s_GK.shape, 0)
        k_pos_GK = k_start + lax.broadcasted_iota(jnp.int32, s_GK.shape, 1)
        mask_GK = layout_mask(layout, head_GK, jnp.full(s_GK.shape, pos, jnp.int32), k_pos_GK)
        s_GK = jnp.where(mask_GK, s_GK, MASK_VALUE)
        # Rows past the length may hold anything; zero them so 0 * garbage cannot reach the sum.
        k_pos_K1 = k_start + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)
        v_KD = jnp.where(k_pos_K1 <= pos, v_ref[...], jnp.zeros((), v_ref.dtype))
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(s_GK, axis=1, keepdims=True))
        p_GK = jnp.where(mask_GK, jnp.exp(s_GK - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p_GK, axis=1, keepdims=True)
        acc_ref[...] = alpha * acc_ref[...] + mxu_dot(p_GK.astype(v_KD.dtype), v_KD)
        m_ref[...] = m_new

    @pl.when(j == steps - 1)
    def _finish():
        l_G1 = l_ref[...]
        alive = l_G1 > 0.0
        o_ref[...] = jnp.where(alive, acc_ref[...] / jnp.where(alive, l_G1, 1.0), 0.0).astype(o_ref.dtype)


def decode_tpu(q_BNH, k_BLKH, v_BLKH, lengths_B, *, layout: Layout, sm_scale=None, interpret=False):
    """Pallas TPU decode. On a real TPU head_dim must be a multiple of 128 (a kv head's slice of the cache
    row is the block's lane dimension); the interpreter takes any head_dim."""
    kv_heads, _ = _check(q_BNH, k_BLKH, v_BLKH, lengths_B, layout)
    batch = q_BNH.shape[0]
    steps = max_blocks_per_group(layout, k_BLKH.shape[1], kv_heads)
    # The block lists live in SMEM: split big batches over several calls.
    per_call = max(1, schedule.MAX_SCHEDULE_WORDS // (kv_heads * steps))
    if batch <= per_call:
        return _decode_call(q_BNH, k_BLKH, v_BLKH, lengths_B, layout, sm_scale, interpret)
    parts = [_decode_call(q_BNH[i:i + per_call], k_BLKH[i:i + per_call], v_BLKH[i:i + per_call],
                          lengths_B[i:i + per_call], layout, sm_scale, interpret)
             for i in range(0, batch, per_call)]
    return jnp.concatenate(parts, axis=0)


def _decode_call(q_BNH, k_BLKH, v_BLKH, lengths_B, layout: Layout, sm_scale, interpret):
    batch, q_heads, head_dim = q_BNH.shape
    max_len, kv_heads = k_BLKH.shape[1:3]
    group = q_heads // kv_heads
    B = layout.block_size
    steps = max_blocks_per_group(layout, max_len, kv_heads)
    ids_BKM, counts_BK = block_lists(layout, lengths_B, max_len, kv_heads)
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)

    def kv_map(b, kh, j, lengths, ids, counts):
        return b, ids[(b * kv_heads + kh) * steps + j], kh

    def q_map(b, kh, j, lengths, ids, counts):
        return b, kh, 0, 0

    # [batch, max_len, kv_heads * head_dim] is a free reshape; a block is one kv head's columns.
    kv_spec = pl.BlockSpec((None, B, head_dim), kv_map)
    q_spec = pl.BlockSpec((None, None, group, head_dim), q_map)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3, grid=(batch, kv_heads, steps), in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((group, 1), jnp.float32), pltpu.VMEM((group, 1), jnp.float32),
                        pltpu.VMEM((group, head_dim), jnp.float32)])
    kernel = functools.partial(_decode_kernel, layout=layout, group=group, sm_scale=scale, steps=steps)
    o_BKGH = pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((batch, kv_heads, group, head_dim),
                                                                    q_BNH.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="blocksparse_decode",
    )(lengths_B.astype(jnp.int32), ids_BKM.reshape(-1), counts_BK.reshape(-1),
      q_BNH.reshape(batch, kv_heads, group, head_dim), k_BLKH.reshape(batch, max_len, -1),
      v_BLKH.reshape(batch, max_len, -1))
    return o_BKGH.reshape(q_BNH.shape)


def blocksparse_decode(q_BNH, k_BLKH, v_BLKH, lengths_B, *, layout: Layout, sm_scale=None,
                       backend: str = "reference", interpret=False):
    """q: [batch, q_heads, head_dim], the token at position lengths[b] - 1 of each sequence; caches:
    [batch, max_len, kv_heads, head_dim]; lengths: int [batch]. Returns [batch, q_heads, head_dim]."""
    if backend == "reference":
        return decode_reference(q_BNH, k_BLKH, v_BLKH, lengths_B, layout=layout, sm_scale=sm_scale)
    if backend == "tpu":
        return decode_tpu(q_BNH, k_BLKH, v_BLKH, lengths_B, layout=layout, sm_scale=sm_scale,
                          interpret=interpret)
    raise ValueError(f"decode backend must be 'reference' or 'tpu', got {backend!r}")
