"""Block-sparse decode against a dense cache: reference vs full attention, kernel (interpreted) vs reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.blocksparse import Layout, blocksparse_attention, schedule
from pallas_kernels.blocksparse import decode

SMALL = dict(block_size=16, local_blocks=2, vert_stride=3)


def make_cache(seed, batch, max_len, kv_heads, group, head_dim, lengths, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, kv_heads * group, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (batch, max_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (batch, max_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    # Poison everything past each length: the decode must never read it into the result.
    valid = (jnp.arange(max_len)[None, :] < jnp.asarray(lengths)[:, None])[:, :, None, None]
    return q, jnp.where(valid, k, jnp.nan), jnp.where(valid, v, jnp.nan)


def test_reference_equals_last_row_of_full_attention():
    layout = Layout(num_heads=4, **SMALL)
    lengths = jnp.array([150, 37, 1, 64])
    q, k, v = make_cache(0, 4, 150, 2, 2, 32, lengths)
    got = decode.blocksparse_decode(q, k, v, lengths, layout=layout)
    assert np.isfinite(np.asarray(got)).all()
    for b, n in enumerate(lengths.tolist()):
        q_full = jnp.zeros((1, n, 4, 32)).at[0, -1].set(q[b])
        want = blocksparse_attention(q_full, k[b:b + 1, :n], v[b:b + 1, :n], layout=layout)[0, -1]
        np.testing.assert_allclose(got[b], want, atol=1e-5)


@pytest.mark.parametrize("kv_heads,group,head_dim,max_len,layout_kw,dtype", [
    (2, 2, 32, 150, SMALL, jnp.float32),
    (1, 4, 64, 96, dict(SMALL, homo_head=True), jnp.float32),
    (4, 2, 128, 200, dict(block_size=32, local_blocks=2, vert_stride=2), jnp.bfloat16),
])
def test_kernel_matches_reference_ragged(kv_heads, group, head_dim, max_len, layout_kw, dtype):
    layout = Layout(num_heads=kv_heads * group, **layout_kw)
    lengths = jnp.array([max_len, 1, max_len // 2 + 3])
    q, k, v = make_cache(1, 3, max_len, kv_heads, group, head_dim, lengths, dtype)
    want = decode.blocksparse_decode(q, k, v, lengths, layout=layout)
    got = jax.jit(lambda q, k, v, n: decode.blocksparse_decode(q, k, v, n, layout=layout, backend="tpu",
                                                               interpret=True))(q, k, v, lengths)
    assert got.shape == q.shape and got.dtype == q.dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol)


def test_kernel_splits_large_batches(monkeypatch):
    layout = Layout(num_heads=4, **SMALL)
    monkeypatch.setattr(schedule, "MAX_SCHEDULE_WORDS", 2 * 2 * decode.max_blocks_per_group(layout, 80, 2))
    lengths = jnp.array([80, 5, 33, 17, 64])
    q, k, v = make_cache(2, 5, 80, 2, 2, 32, lengths)
    got = decode.blocksparse_decode(q, k, v, lengths, layout=layout, backend="tpu", interpret=True)
    want = decode.blocksparse_decode(q, k, v, lengths, layout=layout)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_zero_length_gives_zero():
    layout = Layout(num_heads=2, **SMALL)
    lengths = jnp.array([0, 20])
    q, k, v = make_cache(3, 2, 32, 1, 2, 32, lengths)
    for backend in ("reference", "tpu"):
        out = decode.blocksparse_decode(q, k, v, lengths, layout=layout, backend=backend, interpret=True)
        assert np.all(np.asarray(out[0]) == 0.0) and np.isfinite(np.asarray(out)).all(), backend


def test_block_lists_are_the_group_union():
    layout = Layout(num_heads=6, **SMALL)
    lengths = jnp.array([1, 17, 160, 300])
    ids, counts = decode.block_lists(layout, lengths, 300, kv_heads=3)
    assert ids.shape[-1] == decode.max_blocks_per_group(layout, 300, 3)
    full = layout.block_mask(19)
    for b, n in enumerate(lengths.tolist()):
        qb = (n - 1) // 16
        for kh in range(3):
            want = np.nonzero(full[2 * kh:2 * kh + 2, qb].any(axis=0))[0]
            np.testing.assert_array_equal(ids[b, kh, :counts[b, kh]], want)
            assert np.all(ids[b, kh, counts[b, kh]:] == want[-1])


@pytest.mark.parametrize("p,counts", [(1023, {1024}), (1024, {961, 1025})])
def test_phi3_small_keys_per_head(p, counts):
    # Spec §5.4: what each head reads equals the reference mask's row (spec §5.3 counts).
    layout = Layout()
    row = np.asarray(layout.token_mask(np.array([p]), np.arange(p + 1)))[:, 0]
    assert set(row.sum(axis=-1).tolist()) == counts


def test_read_bytes():
    layout = Layout()
    # <= 1024 tokens: the window covers everything.
    sparse, dense = decode.read_bytes(layout, 1023, kv_heads=8, head_dim=128)
    assert sparse == dense == 1024 * 8 * 2 * 128 * 2
    # Long context: 4 query heads per kv head cover 4 of the 8 strided residues, so about half the cache.
    sparse, dense = decode.read_bytes(layout, 131071, kv_heads=8, head_dim=128)
    assert dense == 131072 * 8 * 512
    blocks_per_group = 16 + 4 * (2048 - 16) // 8
    assert sparse == 8 * blocks_per_group * 64 * 512
    # One kv head per query head (no GQA union) reads 1/8 of the strided blocks.
    sparse_mha, _ = decode.read_bytes(layout, 131071, kv_heads=32, head_dim=128)
    assert sparse_mha / (131072 * 32 * 512) < 0.14
