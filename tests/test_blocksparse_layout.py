"""Block-sparse layout: spec §5.2 formula, §5.3 densities and decode key counts, kernel tile metadata."""
import time

import numpy as np
import pytest

from pallas_kernels.blocksparse import EMPTY, FULL, PARTIAL, Layout, visit_lists


def spec_token_mask(q_pos, k_pos, n_heads=32, B=64, L=16, V=8, homo=False):
    """Spec §5.2 sketch, in numpy, as the independent definition."""
    s = 0 if homo else max(1, V // n_heads)
    qb = q_pos[:, None] // B
    kb = k_pos[None, :] // B
    causal = k_pos[None, :] <= q_pos[:, None]
    local = (qb - kb) < L
    h = np.arange(n_heads)[:, None, None]
    vert = ((kb[None] + h * s + 1) % V) == 0
    return causal[None] & (local[None] | vert)


LAYOUTS = [Layout(), Layout(homo_head=True), Layout(block_size=16, local_blocks=3, vert_stride=4, num_heads=6),
           Layout(block_size=8, local_blocks=2, vert_stride=16, num_heads=4),
           Layout(block_size=32, local_blocks=4, vert_stride=3, num_heads=2, homo_head=True)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_token_mask_matches_spec(layout):
    B = layout.block_size
    pos = np.arange((layout.local_blocks + 2 * layout.vert_stride + 1) * B + 5)
    want = spec_token_mask(pos, pos, layout.num_heads, B, layout.local_blocks, layout.vert_stride,
                           layout.homo_head)
    got = np.asarray(layout.token_mask(pos, pos))
    np.testing.assert_array_equal(got, want)
    # Absolute positions: a decode query against a cache equals the matching row of the full mask.
    np.testing.assert_array_equal(np.asarray(layout.token_mask(pos[-3:], pos)), want[:, -3:])


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_block_mask_is_token_mask_at_block_level(layout):
    nb = layout.local_blocks + 2 * layout.vert_stride + 3
    B = layout.block_size
    token = spec_token_mask(np.arange(nb * B), np.arange(nb * B), layout.num_heads, B, layout.local_blocks,
                            layout.vert_stride, layout.homo_head)
    want = token.reshape(layout.num_heads, nb, B, nb, B).any(axis=(2, 4))
    got = layout.block_mask(nb)
    assert got.shape == (layout.num_heads, nb, nb) and got.dtype == np.bool_
    np.testing.assert_array_equal(got, want)


def test_phi3_small_pattern_facts():
    layout = Layout()
    assert layout.head_step == 1
    mask = layout.block_mask(40)
    # Heads sharing a kv head see different vertical residues; h = 7 mod 8 includes key block 0.
    np.testing.assert_array_equal(layout.vertical_residues()[:8], [7, 6, 5, 4, 3, 2, 1, 0])
    assert mask[7, 39, 0] and mask[15, 39, 0] and not mask[0, 39, 0] and mask[0, 39, 7]
    assert layout.block_mask(16).all(axis=0)[np.tril_indices(16)].all()  # <= 1024 tokens: plain causal


def test_block_mask_128k_is_fast():
    layout = Layout()
    start = time.perf_counter()
    mask = layout.block_mask(2048)
    elapsed = time.perf_counter() - start
    assert mask.shape == (32, 2048, 2048)
    assert elapsed < 2.0, elapsed  # ~0.1 s here; the token-level mask would be 2^34 entries per head


DENSITY_TABLE = [  # N, mean, min head, max head (spec §5.3)
    (1024, 1.0, 1.0, 1.0), (2048, 0.7677, 0.7540, 0.7814), (4096, 0.4977, 0.4874, 0.5079),
    (8192, 0.3242, 0.3182, 0.3302), (16384, 0.2278, 0.2246, 0.2310), (32768, 0.1772, 0.1755, 0.1789),
    (65536, 0.1513, 0.1505, 0.1521), (131072, 0.1382, 0.1378, 0.1386),
]


@pytest.mark.parametrize("n,mean,lo,hi", DENSITY_TABLE)
def test_density_table(n, mean, lo, hi):
    d = Layout().density(n)
    assert d.shape == (32,)
    np.testing.assert_allclose([d.mean(), d.min(), d.max()], [mean, lo, hi], atol=6e-5)


def test_density_4096_heads():
    d = Layout().density(4096)
    np.testing.assert_allclose(d[0], 0.487430, atol=1e-6)
    np.testing.assert_allclose(d[7], 0.507933, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS[2:], ids=str)
@pytest.mark.parametrize("extra", [0, 5])
def test_density_matches_token_count(layout, extra):
    n = (layout.local_blocks + 2 * layout.vert_stride) * layout.block_size + extra
    pos = np.arange(n)
    mask = np.asarray(layout.token_mask(pos, pos))
    np.testing.assert_allclose(layout.density(n), mask.sum(axis=(1, 2)) / (n * (n + 1) / 2), rtol=1e-12)


@pytest.mark.parametrize("p,counts", [(1023, {1024}), (1024, {961, 1025}), (4095, {1408}), (8191, {1920}),
                                      (131071, {17280})])
def test_decode_key_counts(p, counts):
    got = Layout().decode_key_counts(p)
    assert set(got.tolist()) == counts
    if p == 1024:
        assert got[7] == got[15] == 1025 and got[0] == 961


def test_key_block_mask_matches_block_mask():
    layout = Layout(block_size=16, local_blocks=3, vert_stride=4, num_heads=6)
    positions = np.array([0, 15, 16, 100, 255])
    got = np.asarray(layout.key_block_mask(positions, 16))
    want = layout.block_mask(16)[:, positions // 16, :].transpose(1, 0, 2)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("layout", LAYOUTS[2:], ids=str)
@pytest.mark.parametrize("seq_len", [37, 128, 200])
@pytest.mark.parametrize("tile_q,tile_k", [(1, 1), (1, 2), (2, 1), (2, 4), ("half", 1)])
def test_tile_kinds_match_token_mask(layout, seq_len, tile_q, tile_k):
    B = layout.block_size
    if tile_q == "half" and B == 1:
        pytest.skip("no divisor")
    bq = B // 2 if tile_q == "half" else B * tile_q
    bk = B * tile_k
    kinds = layout.tile_kinds(seq_len, bq, bk)
    nq, nk = -(-seq_len // bq), -(-seq_len // bk)
    assert kinds.shape == (layout.num_heads, nq, nk)
    pos_q, pos_k = np.arange(nq * bq), np.arange(nk * bk)
    token = spec_token_mask(pos_q, pos_k, layout.num_heads, B, layout.local_blocks, layout.vert_stride,
                            layout.homo_head)
    tiles = token.reshape(layout.num_heads, nq, bq, nk, bk)
    want = np.where(tiles.all(axis=(2, 4)), FULL, np.where(tiles.any(axis=(2, 4)), PARTIAL, EMPTY))
    np.testing.assert_array_equal(kinds, want)


def test_tile_size_must_fit_block():
    with pytest.raises(ValueError, match="block_q"):
        Layout(block_size=64).tile_kinds(256, 48, 64)


def test_visit_lists():
    kinds = np.array([[[2, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 2]]], np.int8)
    ids, k, counts = visit_lists(kinds)
    np.testing.assert_array_equal(counts, [[2, 0, 4]])
    np.testing.assert_array_equal(ids, [[[0, 2, 2, 2], [0, 0, 0, 0], [0, 1, 2, 3]]])
    np.testing.assert_array_equal(k, [[[2, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 2]]])


def test_kv_and_q_block_lists_agree_with_block_mask():
    layout = Layout(block_size=16, local_blocks=3, vert_stride=4, num_heads=6)
    mask = layout.block_mask(20)
    ids, kinds, counts = layout.kv_block_lists(20)
    np.testing.assert_array_equal(counts, mask.sum(-1))
    for h in range(6):
        for qb in range(20):
            np.testing.assert_array_equal(ids[h, qb, :counts[h, qb]], np.nonzero(mask[h, qb])[0])
            assert kinds[h, qb, counts[h, qb] - 1] == PARTIAL  # the diagonal block is causal inside
    q_ids, _, q_counts = layout.q_tile_lists(20 * 16, 16, 16)
    np.testing.assert_array_equal(q_counts, mask.sum(1))
    np.testing.assert_array_equal(q_ids[2, 5, :q_counts[2, 5]], np.nonzero(mask[2, :, 5])[0])


def test_layout_validates():
    with pytest.raises(ValueError, match="block_size"):
        Layout(block_size=0)


def test_shard_keeps_the_patterns_of_each_slice():
    released = Layout()  # 32 heads, stride 8: offsets (h + 1) % 8
    for parts in (1, 2, 4):
        local = released.shard(parts)
        assert local is not None and local.num_heads == 32 // parts
        np.testing.assert_array_equal(np.tile(local.head_offsets(), parts), released.head_offsets())
    assert released.shard(8) is None  # 4 heads a slice: the local layout would step by 2, not 1
    assert released.shard(3) is None  # does not divide the heads
    assert Layout(num_heads=6, homo_head=True).shard(3).num_heads == 2
