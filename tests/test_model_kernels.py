"""The model with impl="pallas" (block-sparse kernels, interpreted on CPU) against impl="xla": loss and grads."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from phi3_jax.model import ModelConfig, init_model

CFG = ModelConfig(family="phi3small", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, intermediate_size=128, embedding_multiplier=10.0, attn_scale_multiplier=1.0,
                  logit_divisor=2.0, tie_embeddings=True, rope_theta=1e6, dense_attention_every_n_layers=2,
                  blocksparse_block_size=16, blocksparse_local_blocks=2, blocksparse_vert_stride=2,
                  max_position_embeddings=256, original_max_position_embeddings=256)


def _loss_and_grads(cfg, impl, ids, seg):
    model = init_model(cfg, seed=3)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(params):
        m = nnx.merge(graphdef, params)
        logits = m(ids[:, :-1], segment_ids_BT=seg[:, :-1], impl=impl)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    return jax.value_and_grad(loss_fn)(params)


def test_pallas_impl_calls_the_kernel():
    model = init_model(CFG)
    ids = jnp.zeros((1, 40), jnp.int32)
    assert "pallas_call" in str(jax.make_jaxpr(lambda x: model(x, impl="pallas"))(ids))
    assert "pallas_call" not in str(jax.make_jaxpr(lambda x: model(x, impl="xla"))(ids))


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-5), pytest.param("bfloat16", 3e-2, marks=pytest.mark.slow)])
def test_blocksparse_kernel_trains_like_xla(dtype, tol):
    cfg = CFG.replace(dtype=dtype)
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(0, 256, (2, 81)), jnp.int32)
    seg = jnp.asarray(np.concatenate([np.ones((2, 50)), 2 * np.ones((2, 31))], 1), jnp.int32)
    loss_x, g_x = _loss_and_grads(cfg, "xla", ids, seg)
    loss_p, g_p = _loss_and_grads(cfg, "pallas", ids, seg)
    assert abs(float(loss_x) - float(loss_p)) <= tol * abs(float(loss_x))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_x), jax.tree_util.tree_leaves(g_p)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= tol * max(np.abs(a).max(), 1e-6) * 10, path


def test_kernel_runs_per_batch_shard_on_a_mesh():
    """Mosaic kernels cannot be partitioned by XLA: on a mesh the model calls them under shard_map."""
    from phi3_jax import sharding as shd

    mesh = shd.make_mesh({"data": 2, "fsdp": 1, "tensor": 1, "expert": 1}, jax.devices()[:2])
    rng = np.random.RandomState(1)
    ids = jnp.asarray(rng.randint(0, 256, (2, 49)), jnp.int32)
    seg = jnp.ones((2, 49), jnp.int32)
    loss_x, _ = _loss_and_grads(CFG, "xla", ids, seg)
    with shd.activation_sharding(mesh):
        model = init_model(CFG, seed=3)
        jaxpr = str(jax.make_jaxpr(lambda x: model(x, impl="pallas"))(ids[:, :-1]))
        loss_p, _ = _loss_and_grads(CFG, "pallas", ids, seg)
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr
    assert abs(float(loss_x) - float(loss_p)) <= 2e-5 * abs(float(loss_x))


@pytest.mark.slow
def test_gpu_kernel_trains_like_xla(monkeypatch):
    """The model's path into the Mosaic GPU kernels (run in Pallas' GPU interpreter): loss and grads."""
    pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
    from pallas_kernels.blocksparse import gpu

    attn = importlib.import_module("phi3_jax.ops.attention")  # the package re-exports the function's name
    cfg = CFG.replace(dtype="bfloat16", num_heads=2, num_kv_heads=1, head_dim=64, hidden_size=128,
                      blocksparse_block_size=64, blocksparse_local_blocks=1, max_position_embeddings=512,
                      original_max_position_embeddings=512)
    rng = np.random.RandomState(2)
    ids = jnp.asarray(rng.randint(0, 256, (1, 201)), jnp.int32)
    seg = jnp.asarray(np.repeat([1, 2], [130, 71])[None], jnp.int32)
    loss_x, g_x = _loss_and_grads(cfg, "xla", ids, seg)

    calls = []
    kernel = gpu.blocksparse_attention
    monkeypatch.setattr(gpu, "blocksparse_attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    monkeypatch.setattr(attn, "_kernel_backend", lambda: ("gpu", True))
    loss_p, g_p = _loss_and_grads(cfg, "pallas", ids, seg)
    assert calls, "the model did not call the GPU kernel"
    assert abs(float(loss_x) - float(loss_p)) <= 3e-2 * abs(float(loss_x))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_x), jax.tree_util.tree_leaves(g_p)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= 5e-2 * max(np.abs(a).max(), 1e-6), path  # bf16 P and dS


def test_auto_picks_the_gpu_kernel_only_for_inputs_it_takes(monkeypatch):
    from pallas_kernels.blocksparse.layout import Layout

    attn = importlib.import_module("phi3_jax.ops.attention")
    monkeypatch.setattr(attn.jax, "default_backend", lambda: "gpu")
    mask = attn.Mask(layout=Layout(num_heads=4))
    q16 = jnp.zeros((1, 128, 4, 64), jnp.bfloat16)
    assert attn._auto_impl(q16, q16, mask) == "pallas"
    assert attn._auto_impl(q16.astype(jnp.float32), q16.astype(jnp.float32), mask) == "xla"
    q96 = jnp.zeros((1, 128, 4, 96), jnp.bfloat16)
    assert attn._auto_impl(q96, q96, mask) == "xla"
    assert attn._auto_impl(q16, q16, attn.Mask(layout=Layout(block_size=32, num_heads=4))) == "xla"


@pytest.mark.parametrize("layout,split", [
    (dict(num_heads=8, vert_stride=4, local_blocks=2, block_size=16), True),  # each half of the heads alike
    (dict(num_heads=4, vert_stride=8, local_blocks=1, block_size=16), False),  # halves differ: heads gathered
])
def test_blocksparse_kernel_on_a_tensor_parallel_mesh(layout, split):
    from pallas_kernels.blocksparse import Layout
    from phi3_jax import sharding as shd
    from phi3_jax.ops import Mask, attention

    layout = Layout(**layout)
    N = layout.num_heads
    ks = jax.random.split(jax.random.key(7), 4)
    q = jax.random.normal(ks[0], (2, 96, N, 16), jnp.float32)
    k, v = (jax.random.normal(kk, (2, 96, 2, 16), jnp.float32) for kk in ks[1:3])
    do = jax.random.normal(ks[3], q.shape, jnp.float32)
    seg = jnp.asarray(np.repeat([[1, 2]], [60, 36], axis=1).repeat(2, 0), jnp.int32)
    mask = Mask(q_segment_ids=seg, layout=layout)

    def out_and_grads(impl, q, k, v, do):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, mask, scale=0.3, impl=impl), q, k, v)
        return [out, *vjp(do)]

    want = out_and_grads("xla", q, k, v, do)
    mesh = shd.make_mesh({"data": 2, "fsdp": 1, "tensor": 2, "expert": 1}, jax.devices()[:4])
    with shd.activation_sharding(mesh):
        jaxpr = str(jax.make_jaxpr(lambda q, k, v: attention(q, k, v, mask, scale=0.3, impl="pallas"))(q, k, v))
        got = jax.jit(lambda *a: out_and_grads("pallas", *a))(q, k, v, do)
    in_specs = jaxpr.split("shard_map", 1)[1].split("jaxpr=", 1)[0]
    assert ("None, 'tensor', None" in in_specs) == split, in_specs
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5 * max(1.0, float(jnp.abs(w).max())),
                                   rtol=0, err_msg=name)
