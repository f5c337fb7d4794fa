"""Plain-JAX block-sparse attention: the numerical definition every kernel is tested against."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.blocksparse.layout import Layout


def check_inputs(q, k, v, layout: Layout, segment_ids=None) -> tuple[int, int]:
    """Validates shapes; returns (kv_heads, group size = q_heads // kv_heads)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [batch, seq, heads, head_dim], got {q.shape}, {k.shape}, {v.shape}")
    batch, seq, q_heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[:2] != (batch, seq) or k.shape[3] != head_dim:
        raise ValueError(f"k and v must be [batch={batch}, seq={seq}, kv_heads, head_dim={head_dim}], "
                         f"got {k.shape}, {v.shape}")
    kv_heads = k.shape[2]
    if q_heads != layout.num_heads:
        raise ValueError(f"q has {q_heads} heads but layout.num_heads={layout.num_heads}")
    if q_heads % kv_heads:
        raise ValueError(f"q_heads={q_heads} must be a multiple of kv_heads={kv_heads}")
    if segment_ids is not None and segment_ids.shape != (batch, seq):
        raise ValueError(f"segment_ids must be [batch={batch}, seq={seq}], got {segment_ids.shape}")
    return kv_heads, q_heads // kv_heads


def blocksparse_attention(q_BTNH, k_BSKH, v_BSKH, *, layout: Layout, sm_scale=None, segment_ids=None):
    """Masked softmax attention in float32; rows with no allowed key return 0."""
    kv_heads, group = check_inputs(q_BTNH, k_BSKH, v_BSKH, layout, segment_ids)
    batch, seq, q_heads, head_dim = q_BTNH.shape
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    pos = jnp.arange(seq)
    mask_NTS = layout.token_mask(pos, pos)
    mask_BKGTS = jnp.broadcast_to(mask_NTS.reshape(1, kv_heads, group, seq, seq),
                                  (batch, kv_heads, group, seq, seq))
    if segment_ids is not None:
        same_BTS = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask_BKGTS = mask_BKGTS & same_BTS[:, None, None]
    q_BTKGH = q_BTNH.reshape(batch, seq, kv_heads, group, head_dim)
    s_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                         preferred_element_type=jnp.float32) * sm_scale
    s_BKGTS = jnp.where(mask_BKGTS, s_BKGTS, -jnp.inf)
    m_BKGT = jnp.max(s_BKGTS, axis=-1, keepdims=True)
    # A fully masked row has max -inf; shifting by 0 there keeps exp() at 0 instead of NaN.
    m_BKGT = jnp.where(jnp.isfinite(m_BKGT), m_BKGT, 0.0)
    p_BKGTS = jnp.exp(s_BKGTS - jax.lax.stop_gradient(m_BKGT))
    l_BKGT = jnp.sum(p_BKGTS, axis=-1, keepdims=True)
    p_BKGTS = p_BKGTS / jnp.where(l_BKGT == 0.0, 1.0, l_BKGT)
    o_BTKGH = jnp.einsum("bkgts,bskh->btkgh", p_BKGTS, v_BSKH.astype(jnp.float32))
    return o_BTKGH.reshape(q_BTNH.shape).astype(q_BTNH.dtype)
