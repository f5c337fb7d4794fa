"""TPU block-sparse attention kernel, run by the Pallas interpreter on CPU, against the plain-JAX reference.

The interpreter fills every output and scratch buffer with NaN before the kernel runs
(`test_interpreter_poisons_outputs` checks that it still does), so a tile the schedule forgets to write
shows up as NaN in the comparisons below.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels.blocksparse import Layout, blocksparse_attention, schedule
from pallas_kernels.blocksparse import reference, tpu

TOL = {jnp.float32: dict(out=2e-5, grad=5e-5), jnp.bfloat16: dict(out=2e-2, grad=3e-2)}


def make_inputs(seed, batch, seq, kv_heads, group, head_dim, dtype, segments):
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (batch, seq, kv_heads * group, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), jnp.float32).astype(dtype)
    do = jax.random.normal(keys[3], q.shape, jnp.float32).astype(dtype)
    seg = None
    if segments:
        # Sorted random segment boundaries, as packing produces them.
        seg = jnp.sort(jax.random.randint(keys[4], (batch, seq), 0, 3), axis=1)
    return q, k, v, do, seg


@functools.partial(jax.jit, static_argnames=("layout", "backend", "block_q", "block_k", "sm_scale"))
def forward_and_grads(q, k, v, do, seg, *, layout, backend, block_q=None, block_k=None, sm_scale=None):
    options = dict(interpret=True, block_q=block_q, block_k=block_k) if backend == "tpu" else {}
    if backend == "reference":  # the reference defines the result in float32
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))

    def attend(q, k, v):
        return blocksparse_attention(q, k, v, layout=layout, sm_scale=sm_scale, segment_ids=seg,
                                     backend=backend, **options)

    out, vjp = jax.vjp(attend, q, k, v)
    return (out,) + vjp(do.astype(out.dtype))


def assert_close(got, want, tol, name):
    got = np.asarray(got.astype(jnp.float32))
    want = np.asarray(want.astype(jnp.float32))
    assert np.isfinite(got).all(), f"{name}: non-finite values (an unwritten tile?)"
    err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
    assert err < tol, f"{name}: max error {err:.3g} (relative to max |ref| when > 1), tolerance {tol}"


def check_case(seed, batch, seq, kv_heads, group, head_dim, dtype, segments, layout_kw, block_q, block_k,
               sm_scale=None):
    layout = Layout(num_heads=kv_heads * group, **layout_kw)
    q, k, v, do, seg = make_inputs(seed, batch, seq, kv_heads, group, head_dim, dtype, segments)
    got = forward_and_grads(q, k, v, do, seg, layout=layout, backend="tpu", block_q=block_q,
                            block_k=block_k, sm_scale=sm_scale)
    want = forward_and_grads(q, k, v, do, seg, layout=layout, backend="reference", sm_scale=sm_scale)
    assert got[0].shape == q.shape and got[0].dtype == q.dtype
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape, name
        assert_close(g, w, TOL[dtype]["out" if name == "out" else "grad"], name)


SMALL = dict(block_size=16, local_blocks=2, vert_stride=3)

# seed, batch, seq, kv_heads, group, head_dim, dtype, segments, layout, block_q, block_k
FAST_CASES = [
    (0, 1, 64, 1, 1, 64, jnp.float32, False, SMALL, 16, 16),                      # seq = 4 blocks exactly
    (1, 2, 77, 2, 2, 96, jnp.float32, True, SMALL, 32, 16),                       # ragged seq, GQA, segments
    (2, 1, 100, 2, 4, 128, jnp.bfloat16, True, dict(SMALL, homo_head=True), 16, 32),
    (3, 2, 90, 8, 1, 64, jnp.bfloat16, False, dict(block_size=16, local_blocks=1, vert_stride=4), 32, 32),
    (4, 1, 120, 1, 3, 64, jnp.float32, False, dict(block_size=32, local_blocks=1, vert_stride=2), 16, 64),
]


@pytest.mark.parametrize("case", FAST_CASES, ids=lambda c: f"S{c[2]}-K{c[3]}-G{c[4]}-D{c[5]}")
def test_kernel_matches_reference(case):
    check_case(*case)


def test_custom_scale_and_default_tiles():
    # Default tiles (one tile per short sequence) and the muP-style 1/head_dim scale of phi-3-small.
    check_case(5, 1, 50, 2, 2, 64, jnp.float32, True, SMALL, None, None, sm_scale=1.0 / 64)


def test_split_schedule_matches(monkeypatch):
    # A tiny SMEM budget forces several kernel calls chained through aliased outputs.
    monkeypatch.setattr(schedule, "MAX_SCHEDULE_WORDS", 24)
    sched, _ = schedule.q_major(Layout(num_heads=4, **SMALL), 96, 16, 16)
    assert len(schedule.split_rows(sched, "q")) > 2
    check_case(6, 1, 96, 2, 2, 64, jnp.float32, True, SMALL, 16, 16)


def test_interpreter_poisons_outputs():
    def writes_nothing(x_ref, o_ref):
        del x_ref, o_ref

    out = pl.pallas_call(writes_nothing, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
                         interpret=True)(jnp.zeros((8, 128)))
    assert np.isnan(np.asarray(out)).all()


def test_schedule_visits_exactly_the_nonempty_tiles():
    layout = Layout(num_heads=6, **SMALL)
    kinds = layout.tile_kinds(200, 32, 16)
    sched, pattern = schedule.q_major(layout, 200, 32, 16)
    for h in range(6):
        q_t, k_t, kind, first, last, _ = schedule.decode(sched[pattern[h]].astype(np.int64))
        live = kind != 0
        got = np.zeros_like(kinds[h])
        got[q_t[live], k_t[live]] = kind[live]
        np.testing.assert_array_equal(got, kinds[h])
        assert first[live].sum() == last[live].sum() == kinds.shape[1]
    k_sched, kv_set = schedule.k_major(layout, 200, 32, 16, kv_heads=3)
    for kh in range(3):
        q_t, k_t, kind, _, _, g = schedule.decode(k_sched[kv_set[kh]].astype(np.int64))
        live = kind != 0
        assert live.sum() == (kinds[2 * kh:2 * kh + 2] != 0).sum()
        np.testing.assert_array_equal(kind[live], kinds[2 * kh + g[live], q_t[live], k_t[live]])
        assert np.all(np.diff(k_t[live]) >= 0)


def test_rejects_bad_tiles_and_shapes():
    layout = Layout(num_heads=4, **SMALL)
    q, k, v, _, _ = make_inputs(0, 1, 32, 2, 2, 64, jnp.float32, False)
    with pytest.raises(ValueError, match="block_q"):
        tpu.blocksparse_attention(q, k, v, layout=layout, interpret=True, block_q=24, block_k=16)
    with pytest.raises(ValueError, match="num_heads"):
        tpu.blocksparse_attention(q, k, v, layout=Layout(num_heads=8, **SMALL), interpret=True)
    with pytest.raises(ValueError, match="backend"):
        blocksparse_attention(q, k, v, layout=layout, backend="cuda")


def test_reference_zero_for_fully_masked_rows():
    class NoFirstRow(Layout):
        def token_mask(self, q_positions, k_positions):
            mask = super().token_mask(q_positions, k_positions)
            return mask.at[:, 0].set(False)

    layout = NoFirstRow(num_heads=2, **SMALL)
    q, k, v, _, _ = make_inputs(0, 1, 20, 1, 2, 64, jnp.float32, False)
    out = reference.blocksparse_attention(q, k, v, layout=layout)
    grads = jax.grad(lambda q, k, v: reference.blocksparse_attention(q, k, v, layout=layout).sum(),
                     argnums=(0, 1, 2))(q, k, v)
    assert np.all(np.asarray(out[:, 0]) == 0.0)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(8))
def test_random_shapes(seed):
    rng = np.random.default_rng(seed)
    block_size = int(rng.choice([16, 32]))
    layout_kw = dict(block_size=block_size, local_blocks=int(rng.integers(1, 4)),
                     vert_stride=int(rng.integers(2, 6)), homo_head=bool(rng.integers(2)))
    kv_heads, group = int(rng.integers(1, 9)), int(rng.integers(1, 5))
    seq = int(rng.integers(block_size, 12 * block_size))
    tiles = [block_size // 2, block_size, 2 * block_size]
    check_case(seed, int(rng.integers(1, 3)), seq, kv_heads, group, int(rng.choice([64, 96, 128])),
               [jnp.float32, jnp.bfloat16][seed % 2], bool(rng.integers(2)), layout_kw,
               int(rng.choice(tiles)), int(rng.choice(tiles)))


@pytest.mark.slow
def test_phi3_small_layout_past_1024_tokens():
    # Real geometry (B=64, 16 local blocks, stride 8) where sparsity starts, with the default tiles.
    check_case(11, 1, 1100, 1, 4, 64, jnp.bfloat16, True, dict(), None, None, sm_scale=1.0 / 64)


@pytest.mark.slow
def test_tpu_faithful_interpreter():
    # The TPU interpreter models block pipelining and write-back; outputs start as NaN.
    from jax.experimental.pallas import tpu as pltpu

    layout = Layout(num_heads=4, **SMALL)
    q, k, v, do, seg = make_inputs(7, 1, 40, 2, 2, 64, jnp.float32, True)
    params = pltpu.InterpretParams(uninitialized_memory="nan")

    def attend(q, k, v):
        return tpu.blocksparse_attention(q, k, v, layout=layout, segment_ids=seg, interpret=params,
                                         block_q=16, block_k=16)

    out, vjp = jax.vjp(attend, q, k, v)
    want, want_vjp = jax.vjp(lambda q, k, v: reference.blocksparse_attention(q, k, v, layout=layout,
                                                                             segment_ids=seg), q, k, v)
    for name, g, w in zip(("out", "dq", "dk", "dv"), (out,) + vjp(do), (want,) + want_vjp(do)):
        assert_close(g, w, 5e-5, name)


def _tpu_device(topology: str):
    """A TPU device description for ahead-of-time compilation from this CPU host, or a skip."""
    pytest.importorskip("libtpu", reason="libtpu not installed: pip install libtpu to compile for TPU")
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(topology, "tpu").devices[0]
    except Exception as err:  # libtpu present but unusable here
        pytest.skip(f"no TPU topology {topology!r} from libtpu: {err}")


@pytest.mark.slow
@pytest.mark.tpu
@pytest.mark.parametrize("topology,seq,dtype", [
    ("v5e:1x1", 8192, jnp.bfloat16), ("v5e:1x1", 32768, jnp.bfloat16), ("v5e:1x1", 8192, jnp.float32),
    ("v5p:1x1x1", 8192, jnp.bfloat16), ("v5p:1x1x1", 32768, jnp.bfloat16),
    ("v5p:1x1x1", 131072, jnp.bfloat16),  # schedule split over several calls to fit SMEM
], ids=str)
def test_aot_compiles_for_tpu(topology, seq, dtype):
    """Mosaic lowering + TPU compile of forward and backward at phi-3-small geometry (with segments)."""
    device = _tpu_device(topology)
    sharding = jax.sharding.SingleDeviceSharding(device)
    layout = Layout()
    q = jax.ShapeDtypeStruct((1, seq, 32, 128), dtype, sharding=sharding)
    kv = jax.ShapeDtypeStruct((1, seq, 8, 128), dtype, sharding=sharding)
    seg = jax.ShapeDtypeStruct((1, seq), jnp.int32, sharding=sharding)

    def attend(q, k, v, seg):
        return blocksparse_attention(q, k, v, layout=layout, sm_scale=1.0 / 128, segment_ids=seg,
                                     backend="tpu")

    def loss(q, k, v, seg):
        return attend(q, k, v, seg).astype(jnp.float32).sum()

    fwd = jax.jit(attend).lower(q, kv, kv, seg).compile()
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg).compile()
    assert "blocksparse_fwd" in fwd.as_text() and "blocksparse_dkv" in bwd.as_text()


@pytest.mark.slow
@pytest.mark.tpu
@pytest.mark.parametrize("topology", ["v5e:1x1", "v5p:1x1x1"])
def test_aot_decode_compiles_for_tpu(topology):
    from pallas_kernels.blocksparse.decode import blocksparse_decode

    device = _tpu_device(topology)
    sharding = jax.sharding.SingleDeviceSharding(device)
    q = jax.ShapeDtypeStruct((8, 32, 128), jnp.bfloat16, sharding=sharding)
    cache = jax.ShapeDtypeStruct((8, 32768, 8, 128), jnp.bfloat16, sharding=sharding)
    lengths = jax.ShapeDtypeStruct((8,), jnp.int32, sharding=sharding)
    jax.jit(lambda q, k, v, n: blocksparse_decode(q, k, v, n, layout=Layout(), backend="tpu")).lower(
        q, cache, cache, lengths).compile()
