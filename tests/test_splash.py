"""Dense attention through the splash kernels (Pallas TPU, interpreted on CPU) against XLA attention."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi3_jax.ops import Mask, attention

attn = importlib.import_module("phi3_jax.ops.attention")  # the package re-exports the function's name


def _inputs(B, T, N, K, H, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, K, H), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (B, T, N, H), jnp.float32).astype(dtype)
    return q, k, v, do


def _out_and_grads(impl, q, k, v, do, mask, scale):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, mask, scale=scale, impl=impl), q, k, v)
    return [out, *vjp(do)]


@pytest.mark.parametrize("window,segments,heads", [(None, False, (4, 2)), (50, False, (2, 2)), (None, True, (4, 1)),
                                                   pytest.param(130, True, (6, 2), marks=pytest.mark.slow)])
def test_splash_matches_xla(window, segments, heads):
    N, K = heads
    q, k, v, do = _inputs(2, 256, N, K, 64, seed=N + K)
    seg = jnp.asarray(np.stack([np.repeat([1, 2, 3], [100, 100, 56]), np.repeat([4, 5, 6], [60, 140, 56])])) if segments else None
    mask = Mask(q_segment_ids=seg, window=window)
    calls = []
    real = attn._pallas_splash
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attn, "_pallas_splash", lambda *a: calls.append(1) or real(*a))
        got = _out_and_grads("pallas", q, k, v, do, mask, 0.3)
    assert calls, "splash was not used"
    want = _out_and_grads("xla", q, k, v, do, mask, 0.3)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5 * max(1.0, float(jnp.abs(w).max())),
                                   rtol=0, err_msg=name)


def test_splash_only_where_it_applies(monkeypatch):
    q, k, v, _ = _inputs(1, 200, 2, 2, 64)
    assert not attn.splash.supports(q, k, Mask())  # 200 is not a multiple of 128
    q, k, v, _ = _inputs(1, 256, 2, 2, 64)
    assert attn.splash.supports(q, k, Mask(window=10))
    assert not attn.splash.supports(q, k[:, :128], Mask())  # cross-attention shapes
    assert not attn.splash.supports(q, k, Mask(causal=False))
    monkeypatch.setattr(attn.jax, "default_backend", lambda: "tpu")
    assert attn._auto_impl(q, k, Mask()) == "pallas"
    assert attn._auto_impl(q[:, :200], k[:, :200], Mask()) == "xla"


def test_phi3_model_trains_like_xla_through_splash():
    import optax
    from flax import nnx

    from phi3_jax.model import ModelConfig, init_model

    cfg = ModelConfig(family="phi3", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, intermediate_size=96, sliding_window=40, max_position_embeddings=256,
                      original_max_position_embeddings=256)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 129)), jnp.int32)
    seg = jnp.asarray(np.repeat([[1, 2]], [70, 59], axis=1).repeat(2, 0), jnp.int32)

    def loss_and_grads(impl):
        graphdef, params = nnx.split(init_model(cfg, seed=1), nnx.Param)

        def loss_fn(params):
            logits = nnx.merge(graphdef, params)(ids[:, :-1], segment_ids_BT=seg[:, :-1], impl=impl)
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

        return jax.value_and_grad(loss_fn)(params)

    loss_x, g_x = loss_and_grads("xla")
    calls = []
    real = attn.splash.attention
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attn.splash, "attention", lambda *a, **kw: calls.append(a[3].window) or real(*a, **kw))
        loss_s, g_s = loss_and_grads("pallas")
    assert calls and set(calls) == {40}, calls
    assert abs(float(loss_x) - float(loss_s)) <= 1e-5 * abs(float(loss_x))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_x), jax.tree_util.tree_leaves(g_s)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-4 * max(np.abs(np.asarray(a)).max(), 1e-6), path


def test_splash_on_a_tensor_parallel_mesh_keeps_heads_split():
    from phi3_jax import sharding as shd

    q, k, v, do = _inputs(2, 128, 4, 2, 64, seed=5)
    seg = jnp.asarray(np.repeat([[1, 2]], [90, 38], axis=1).repeat(2, 0), jnp.int32)
    mask = Mask(q_segment_ids=seg, window=30)
    want = _out_and_grads("xla", q, k, v, do, mask, 0.25)
    mesh = shd.make_mesh({"data": 2, "fsdp": 1, "tensor": 2, "expert": 1}, jax.devices()[:4])
    with shd.activation_sharding(mesh):
        jaxpr = str(jax.make_jaxpr(lambda q, k, v: attention(q, k, v, mask, scale=0.25, impl="pallas"))(q, k, v))
        got = jax.jit(lambda *a: _out_and_grads("pallas", *a, mask, 0.25))(q, k, v, do)
    in_specs = jaxpr.split("shard_map", 1)[1].split("jaxpr=", 1)[0]
    assert "None, 'tensor', None" in in_specs, in_specs  # heads stay split over the tensor axis
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5 * max(1.0, float(jnp.abs(w).max())),
                                   rtol=0, err_msg=name)
