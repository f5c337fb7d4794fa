"""impl="xla" (hand-written backward pass) against autodiff of reference_attention: outputs and q/k/v gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.blocksparse import Layout
from phi3_jax.ops import Mask, attention, reference_attention

B, T, H = 2, 40, 16


def inputs(heads, kv_heads, dtype, seed=0, kv_len=T):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (B, T, heads, H), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (B, kv_len, kv_heads, H), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (B, kv_len, kv_heads, H), jnp.float32).astype(dtype)
    w = jax.random.normal(keys[3], (B, T, heads, H), jnp.float32)  # a cotangent that is not all ones
    return q, k, v, w


def value_and_grads(fn, q, k, v, w, mask):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v, mask, 0.3).astype(jnp.float32) * w)

    out = fn(q, k, v, mask, 0.3)
    return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def xla(q, k, v, mask, scale):
    return attention(q, k, v, mask, scale=scale, impl="xla")


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)


SEGMENTS = np.array([[1] * 12 + [2] * 28, [0] * 5 + [1] * 35], np.int32)
MASKS = {
    "causal": Mask(),
    "window": Mask(window=7),
    "segments": Mask(q_segment_ids=SEGMENTS),
    "bidirectional": Mask(causal=False),
    "block_sparse": Mask(layout=Layout(block_size=8, local_blocks=2, vert_stride=3, num_heads=4)),
}


@pytest.mark.parametrize("dtype,bound", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_matches_autodiff_of_reference(name, heads, kv_heads, dtype, bound):
    q, k, v, w = inputs(heads, kv_heads, dtype)
    mask = MASKS[name]
    out, grads = value_and_grads(xla, q, k, v, w, mask)
    ref_out, ref_grads = value_and_grads(reference_attention, q, k, v, w, mask)
    assert out.dtype == q.dtype
    assert rel_err(out, ref_out) < bound
    for g, ref, x in zip(grads, ref_grads, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert rel_err(g, ref) < bound


def test_hidden_keys_get_exactly_zero_gradient():
    """Causality and segments must hold exactly in the backward pass too (no leak through rounding)."""
    q, k, v, w = inputs(4, 2, jnp.float32)
    mask = Mask(q_segment_ids=SEGMENTS)
    # The loss reads only the first query of row 0's second document (position 12).
    w = jnp.zeros_like(w).at[0, 12].set(1.0)
    _, (dq, dk, dv) = value_and_grads(xla, q, k, v, w, mask)
    assert not np.any(np.asarray(dk[0, :12])) and not np.any(np.asarray(dv[0, :12]))  # other document
    assert not np.any(np.asarray(dk[0, 13:])) and not np.any(np.asarray(dv[0, 13:]))  # later tokens
    assert np.all(np.asarray(dv[0, 12]) != 0)
    assert not np.any(np.asarray(dq[1])) and not np.any(np.asarray(dk[1]))


def test_query_with_no_visible_key_gives_zeros_not_nan():
    q, k, v, w = inputs(4, 4, jnp.float32)
    q_seg = jnp.asarray(SEGMENTS).at[1, :5].set(7)  # segment 7 has no keys
    mask = Mask(q_segment_ids=q_seg, kv_segment_ids=jnp.asarray(SEGMENTS))
    out, grads = value_and_grads(xla, q, k, v, w, mask)
    assert np.all(np.isfinite(np.asarray(out))) and not np.any(np.asarray(out[1, :5]))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    ref_out, ref_grads = value_and_grads(reference_attention, q, k, v, w, mask)
    assert rel_err(out, ref_out) < 2e-5
    for g, ref in zip(grads, ref_grads):
        assert rel_err(g, ref) < 2e-5


def test_kv_cache_shapes_and_query_positions():
    """Queries at absolute positions against a longer cache (the decode path's mask)."""
    q, k, v, w = inputs(4, 2, jnp.float32, kv_len=64)
    mask = Mask(q_index=jnp.arange(T) + 20)
    out, grads = value_and_grads(xla, q, k, v, w, mask)
    ref_out, ref_grads = value_and_grads(reference_attention, q, k, v, w, mask)
    assert rel_err(out, ref_out) < 2e-5
    for g, ref in zip(grads, ref_grads):
        assert rel_err(g, ref) < 2e-5


@pytest.mark.parametrize("dtype,bound", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_one_query_a_row(heads, kv_heads, dtype, bound):
    """A decode step (one query a row, rows at different positions) takes products and sums, not matmuls."""
    q, k, v, w = inputs(heads, kv_heads, dtype, kv_len=64)
    q, w = q[:, :1], w[:, :1]
    mask = Mask(q_index=jnp.asarray([[37], [5]]))
    out, grads = value_and_grads(xla, q, k, v, w, mask)
    ref_out, ref_grads = value_and_grads(reference_attention, q, k, v, w, mask)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert rel_err(out, ref_out) < bound
    for g, ref in zip(grads, ref_grads):
        assert rel_err(g, ref) < bound
    assert not np.any(np.asarray(grads[1][1, 6:])) and not np.any(np.asarray(grads[2][0, 38:]))  # causal
