"""GPU (Pallas Mosaic GPU) block-sparse attention against the plain-JAX reference.

On CPU the kernels run in Pallas' GPU interpreter, which simulates SMEM, TMA copies, barriers and the
three warpgroups of a CTA; buffers start as NaN (so any output row a kernel fails to write fails the
comparison) and its race detector checks the barrier protocol. The interpreter cannot show speed, nor
the hardware-only code paths (wgmma with a register operand, TMA reduce-add of dq); those are checked to
lower for CUDA here and run for real under `-m gpu`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.blocksparse import gpu, reference
from pallas_kernels.blocksparse.layout import Layout

plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")

# Small pattern that is already sparse at 7 blocks: 2 local blocks, a vertical block every 3.
SMALL = Layout(block_size=64, local_blocks=2, vert_stride=3, num_heads=4)
PHI3_SMALL = Layout()  # 64-token blocks, 16 local, stride 8, 32 heads


def _interpret(races=True):
    return plgpu.InterpretGPUParams(detect_races=races, uninitialized_memory="nan")


def _inputs(batch, seq, heads, kv_heads, dim, dtype, seed=0):
    k_q, k_k, k_v, k_o = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(k_q, (batch, seq, heads, dim), jnp.float32).astype(dtype)
    k = jax.random.normal(k_k, (batch, seq, kv_heads, dim), jnp.float32).astype(dtype)
    v = jax.random.normal(k_v, (batch, seq, kv_heads, dim), jnp.float32).astype(dtype)
    do = jax.random.normal(k_o, (batch, seq, heads, dim), jnp.float32).astype(dtype)
    return q, k, v, do


def _compare(layout, q, k, v, do, segment_ids=None, fuse_dq=False, sm_scale=None, races=True):
    def kernel(q, k, v):
        return gpu.blocksparse_attention(q, k, v, layout=layout, sm_scale=sm_scale, segment_ids=segment_ids,
                                         interpret=_interpret(races), fuse_dq=fuse_dq)

    def ref(q, k, v):
        return reference.blocksparse_attention(q, k, v, layout=layout, sm_scale=sm_scale, segment_ids=segment_ids)

    out, vjp = jax.vjp(kernel, q, k, v)
    grads = vjp(do)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    out_ref, vjp_ref = jax.vjp(ref, *f32)
    grads_ref = vjp_ref(do.astype(jnp.float32))
    assert out.dtype == q.dtype and out.shape == q.shape
    # bf16 inputs: P and dS are rounded to bf16 before their matmuls, as in every flash kernel.
    tol = 2e-2 if q.dtype == jnp.bfloat16 else 4e-3
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (out_ref, *grads_ref)):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.isfinite(got).all(), f"{name} has non-finite entries (unwritten rows?)"
        np.testing.assert_allclose(got, want, atol=tol * max(1.0, np.abs(want).max()), rtol=0, err_msg=name)


# ---- host-side plans (pure numpy) ------------------------------------------------------------------


@pytest.mark.parametrize("layout,num_blocks", [(SMALL, 8), (PHI3_SMALL, 64), (Layout(homo_head=True), 40)])
def test_fwd_plan_covers_each_allowed_block_once(layout, num_blocks):
    mask = np.asarray(layout.block_mask(num_blocks))
    meta, steps = gpu.fwd_plan(layout, num_blocks)
    heads, tiles, width = meta.shape
    assert width % 2 == 0 and (steps[..., 0] <= steps[..., 1]).all()
    for h in range(heads):
        for c in range(tiles):
            n_full, n_steps = steps[h, c]
            ids, bits = meta[h, c] // 4, meta[h, c] % 4
            for w in range(2):  # each query block of the CTA tile
                seen = ids[(bits >> w) & 1 == 1]
                np.testing.assert_array_equal(np.sort(seen), np.flatnonzero(mask[h, 2 * c + w]))
            assert not bits[2 * n_steps:].any(), "padding must be fully masked"
            full = ids[: 2 * n_full]
            assert (bits[: 2 * n_full] == 3).all() and (full < 2 * c).all(), "unmasked steps must be fully visible"
            assert (ids >= 0).all() and (ids < num_blocks).all()


@pytest.mark.parametrize("layout,num_blocks,kv_heads", [(SMALL, 8, 2), (PHI3_SMALL, 64, 8), (PHI3_SMALL, 34, 32)])
def test_bwd_plan_lists_each_query_block_once(layout, num_blocks, kv_heads):
    mask = np.asarray(layout.block_mask(num_blocks))
    group = layout.num_heads // kv_heads
    meta, counts, order = gpu.bwd_plan(layout, num_blocks, kv_heads)
    for g in range(kv_heads):
        assert (np.diff(counts[g, order[g]]) <= 0).all(), "longest streams first"
        assert sorted(order[g]) == list(range(num_blocks))
        for kb in range(num_blocks):
            m = meta[g, kb, : counts[g, kb]]
            qb, head, diag = m // 256, (m // 2) % 128, m % 2
            got = sorted(zip(head.tolist(), qb.tolist()))
            want = [(i, int(x)) for i in range(group) for x in np.flatnonzero(mask[g * group + i, :, kb])]
            assert got == sorted(want)
            np.testing.assert_array_equal(diag, qb == kb)
            assert diag[-group:].all() and not diag[:-group].any(), "diagonal entries last"


def test_padded_len():
    assert [gpu.padded_len(n) for n in (1, 128, 129, 8192, 8000)] == [128, 128, 256, 8192, 8064]


# ---- kernels in the GPU interpreter ------------------------------------------------------------------


def test_interpret_bf16_gqa_ragged_segments():
    # 200 tokens: the last block partial, padded to 2 CTA tiles; 2 query heads share a kv head;
    # segment boundaries fall inside blocks.
    layout = Layout(block_size=64, local_blocks=1, vert_stride=2, num_heads=2)
    q, k, v, do = _inputs(1, 200, 2, 1, 64, jnp.bfloat16)
    seg = jnp.repeat(jnp.arange(3), jnp.array([70, 81, 49]))[None]
    _compare(layout, q, k, v, do, segment_ids=seg)


@pytest.mark.slow
def test_interpret_f16_batch_fused_dq():
    layout = Layout(block_size=64, local_blocks=1, vert_stride=2, num_heads=2)
    q, k, v, do = _inputs(2, 256, 2, 1, 64, jnp.float16, seed=1)
    _compare(layout, q, k, v, do, fuse_dq=True, sm_scale=0.3, races=False)


@pytest.mark.slow
@pytest.mark.parametrize("fuse_dq", [True, False])
def test_interpret_four_heads(fuse_dq):
    q, k, v, do = _inputs(1, 438, 4, 2, 64, jnp.bfloat16, seed=3)
    _compare(SMALL, q, k, v, do, fuse_dq=fuse_dq)


@pytest.mark.slow
def test_interpret_head_dim_128_fused_segments():
    q, k, v, do = _inputs(1, 384, 4, 1, 128, jnp.bfloat16, seed=2)
    seg = jnp.repeat(jnp.arange(2), jnp.array([200, 184]))[None]
    _compare(SMALL, q, k, v, do, segment_ids=seg)


# ---- the hardware code paths lower for CUDA (register-operand wgmma, TMA reduce-add, SMEM budget) ----


@pytest.mark.parametrize("fuse_dq,segments", [(True, False), (False, True)])
def test_lowers_for_cuda_at_phi3_small_geometry(fuse_dq, segments):
    q = jax.ShapeDtypeStruct((1, 2048, 32, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 2048, 8, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 2048), jnp.int32)

    def loss(q, k, v, seg):
        out = gpu.blocksparse_attention(q, k, v, layout=PHI3_SMALL, segment_ids=seg if segments else None,
                                        fuse_dq=fuse_dq)
        return out.astype(jnp.float32).sum()

    # Lowering runs Pallas' Mosaic GPU lowering and its shared-memory check (227 KiB on Hopper).
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, seg).lower(lowering_platforms=("cuda",)).as_text()
    assert hlo.count("mosaic_gpu") >= 2


def test_rejects_unsupported_inputs():
    q, k, v, _ = _inputs(1, 128, 4, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match="bfloat16/float16"):
        gpu.blocksparse_attention(q, k, v, layout=SMALL)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    with pytest.raises(ValueError, match="num_heads"):
        gpu.blocksparse_attention(q, k, v, layout=PHI3_SMALL)
    with pytest.raises(ValueError, match="block_size"):
        gpu.blocksparse_attention(q, k, v, layout=Layout(block_size=32, num_heads=4))


# ---- on a Hopper GPU ---------------------------------------------------------------------------------


def _on_hopper():
    try:
        return any("H100" in d.device_kind or "H200" in d.device_kind or "H800" in d.device_kind
                   for d in jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper GPU (H100/H200): wgmma and TMA")
@pytest.mark.parametrize("fuse_dq", [True, False])
@pytest.mark.parametrize("seq,dtype", [(2048, jnp.bfloat16), (1500, jnp.float16)])
def test_on_gpu_matches_reference(seq, dtype, fuse_dq):
    q, k, v, do = _inputs(1, seq, 32, 8, 128, dtype)
    seg = jnp.repeat(jnp.arange(2), jnp.array([seq // 3, seq - seq // 3]))[None]

    def kernel(q, k, v):
        return gpu.blocksparse_attention(q, k, v, layout=PHI3_SMALL, segment_ids=seg, fuse_dq=fuse_dq)

    def ref(q, k, v):
        return reference.blocksparse_attention(q, k, v, layout=PHI3_SMALL, segment_ids=seg)

    out, vjp = jax.vjp(kernel, q, k, v)
    grads = vjp(do)
    out_ref, vjp_ref = jax.vjp(ref, *(x.astype(jnp.float32) for x in (q, k, v)))
    grads_ref = vjp_ref(do.astype(jnp.float32))
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (out_ref, *grads_ref)):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        np.testing.assert_allclose(got, want, atol=3e-2 * max(1.0, np.abs(want).max()), rtol=0, err_msg=name)
