"""Fused ops with custom gradients against plain JAX: the head + cross-entropy, the embedding lookup's float32
gradient, SwiGLU, RMSNorm, the qkv split + RoPE."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from phi3_jax import train_state as ts
from phi3_jax.model import get_preset, init_model, layers
from phi3_jax.model.layers import embedding_lookup
from phi3_jax.ops import cross_entropy
from phi3_jax.ops.cross_entropy import head_loss


EIGHT_DEVICES = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (the CPU run simulates them)")
# The Pallas kernels: Triton on a GPU, Pallas' interpreter elsewhere.
INTERPRET = jax.default_backend() != "gpu"


def _reference(x_BTD, w_DV, targets_BT, mask_BT, divisor=1.0, dummy_ids=()):
    logits = jnp.dot(x_BTD, w_DV.astype(x_BTD.dtype)).astype(jnp.float32) / divisor
    if dummy_ids:
        logits = logits.at[..., jnp.asarray(dummy_ids)].set(jnp.finfo(jnp.float32).min)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets_BT) * mask_BT)


def _inputs(B=2, T=12, D=16, V=40, seed=0):
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.normal(size=(B, T, D)), jnp.float32)
    w = jnp.asarray(r.normal(size=(D, V)) * 0.3, jnp.float32)
    t = jnp.asarray(r.integers(0, V - 3, (B, T)), jnp.int32)
    m = jnp.asarray(r.random((B, T)) > 0.25, jnp.float32)
    return x, w, t, m


@pytest.fixture(params=cross_entropy.LOGSUMEXP_FORMS)
def logsumexp_form(request, monkeypatch):
    """Every logsumexp form, whatever the host (the Pallas kernel in its interpreter off a GPU)."""
    monkeypatch.setattr(cross_entropy, "LOGSUMEXP", request.param)


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("divisor,dummy", [(1.0, ()), (2.5, (37, 38, 39))])
def test_head_loss_matches_optax_value_and_grads(chunks, divisor, dummy, logsumexp_form):
    x, w, t, m = _inputs()
    f = lambda x, w: head_loss(x, w, t, m, divisor=divisor, dummy_ids=dummy, chunks=chunks)  # noqa: E731
    ref = lambda x, w: _reference(x, w, t, m, divisor, dummy)  # noqa: E731
    (l, (gx, gw)), (lr, (gxr, gwr)) = (jax.value_and_grad(fn, argnums=(0, 1))(x, w) for fn in (f, ref))
    np.testing.assert_allclose(l, lr, rtol=1e-5)
    np.testing.assert_allclose(gx, gxr, atol=1e-5)
    np.testing.assert_allclose(gw, gwr, atol=1e-5)
    # Masked tokens get no gradient, and the padding columns none either.
    assert not np.any(np.asarray(gx)[np.asarray(m) == 0])
    if dummy:
        assert not np.any(np.asarray(gw)[:, list(dummy)])


@pytest.mark.parametrize("chunks", [1, 3])
def test_head_loss_is_stable_for_logits_in_the_thousands(chunks, logsumexp_form):
    """The one-read logsumexp rescales its running sum by exp(old max - new max), the two-reduction one
    subtracts the max first: no overflow, no NaN."""
    x, w, t, m = _inputs(seed=3)
    x = x * 2000.0
    f = lambda x, w: head_loss(x, w, t, m, dummy_ids=(39,), chunks=chunks)  # noqa: E731
    ref = lambda x, w: _reference(x, w, t, m, dummy_ids=(39,))  # noqa: E731
    (l, (gx, gw)), (lr, (gxr, gwr)) = (jax.value_and_grad(fn, argnums=(0, 1))(x, w) for fn in (f, ref))
    assert np.isfinite(l) and np.all(np.isfinite(gx)) and np.all(np.isfinite(gw))
    np.testing.assert_allclose(l, lr, rtol=1e-5)
    np.testing.assert_allclose(gw, gwr, atol=1e-3 * np.max(np.abs(gwr)))


@pytest.mark.parametrize("block", [64, 256])
def test_row_logsumexp_kernel_matches_jax(block):
    """The Pallas kernel over rows wider than a block and not a multiple of it, with one huge logit, against
    jax.nn.logsumexp of the same values in float32."""
    from phi3_jax.ops.rowwise import row_logsumexp

    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 3, 300)) * 4, jnp.bfloat16).at[1, 2, 299].set(3000.0)
    got = row_logsumexp(x, block=block, interpret=INTERPRET)
    assert got.shape == (2, 3) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, jax.nn.logsumexp(x.astype(jnp.float32), axis=-1), rtol=1e-6)
    with pytest.raises(ValueError, match="power of 2"):
        row_logsumexp(x, block=100, interpret=INTERPRET)


@pytest.mark.parametrize("block", [64, 512])
def test_row_xent_grad_kernel_matches_the_xla_formula(block):
    """The loss rows' kernel (logsumexp and the logits gradient from one program) against the formula the
    XLA form computes, targets at both ends of the row included."""
    from phi3_jax.ops.rowwise import row_xent_grad

    r = np.random.default_rng(7)
    x = jnp.asarray(r.normal(size=(2, 3, 300)) * 4, jnp.bfloat16)
    t = jnp.asarray(r.integers(0, 300, (2, 3)), jnp.int32).at[0, 0].set(0).at[1, 2].set(299)
    c = jnp.asarray(r.random((2, 3)) > 0.3, jnp.float32) / 5.0
    lse, d = row_xent_grad(x, t, c, block=block, interpret=INTERPRET)
    x32 = x.astype(jnp.float32)
    want_lse = jax.nn.logsumexp(x32, axis=-1)
    want_d = (jnp.exp(x32 - want_lse[..., None]) - jax.nn.one_hot(t, 300)) * c[..., None]
    assert lse.dtype == jnp.float32 and d.dtype == jnp.bfloat16 and d.shape == x.shape
    np.testing.assert_allclose(lse, want_lse, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(d, np.float32), np.asarray(want_d.astype(jnp.bfloat16), np.float32),
                               rtol=2 ** -8, atol=1e-6)


@EIGHT_DEVICES
@pytest.mark.parametrize("mesh_shape", [{"data": 4, "fsdp": 1, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_kernel_logsumexp_loss_under_a_mesh(mesh_shape, monkeypatch):
    """On 8 devices the kernel runs per batch shard (shard_map), and where the vocabulary is split over
    devices the loss takes the XLA reduce instead: the same loss and gradients as the reference either way."""
    from phi3_jax import sharding as shd

    monkeypatch.setattr(cross_entropy, "LOGSUMEXP", "kernel")
    x, w, t, m = _inputs(B=8, T=4, V=48)
    mesh = shd.make_mesh(mesh_shape)
    ref = jax.value_and_grad(lambda x, w: _reference(x, w, t, m), argnums=(0, 1))(x, w)
    for rules, kernel in (({"activation_vocab": None}, True), ({}, False)):  # the table splits vocab
        f = shd.with_activation_sharding(lambda x, w: head_loss(x, w, t, m), mesh, rules)
        assert ("pallas_call" in str(jax.make_jaxpr(f)(x, w))) == kernel
        got = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, w)
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
        for a, b in zip(got[1], ref[1]):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_head_loss_scales_with_the_cotangent_and_under_jit():
    x, w, t, m = _inputs(seed=1)
    g = jax.jit(jax.grad(lambda x: 3.0 * head_loss(x, w, t, m) / jnp.sum(m)))(x)
    gr = jax.grad(lambda x: 3.0 * _reference(x, w, t, m) / jnp.sum(m))(x)
    np.testing.assert_allclose(g, gr, atol=1e-5)


def test_head_loss_bf16_keeps_the_reference_roundings():
    x, w, t, m = _inputs(B=2, T=64, D=32, V=96, seed=2)
    xb = x.astype(jnp.bfloat16)
    (l, (gx, gw)) = jax.value_and_grad(lambda x, w: head_loss(x, w, t, m), argnums=(0, 1))(xb, w)
    (lr, (gxr, gwr)) = jax.value_and_grad(lambda x, w: _reference(x, w, t, m), argnums=(0, 1))(xb, w)
    assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.float32
    np.testing.assert_allclose(l, lr, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gx, np.float32), np.asarray(gxr, np.float32), atol=2e-2)
    np.testing.assert_allclose(gw, gwr, atol=2e-2 * float(jnp.max(jnp.abs(gwr))))


def test_head_loss_rejects_chunks_that_do_not_divide_the_sequence():
    x, w, t, m = _inputs(T=12)
    with pytest.raises(ValueError, match="chunks=5"):
        head_loss(x, w, t, m, chunks=5)


@pytest.mark.parametrize("preset", ["phi-3-tiny", "phi-3-small-tiny"])
def test_model_loss_sums_equal_cross_entropy_of_its_logits(preset):
    """Decoder.loss_sums (the fused op) against optax on Decoder(ids): phi-3-small adds the tied head,
    the logit divisor and masked padding rows."""
    cfg = get_preset(preset, vocab_size=160, num_layers=2, attention_impl="xla")
    if cfg.dummy_token_ids:
        cfg = dataclasses.replace(cfg, dummy_token_ids=(157, 158, 159))
    graphdef, params = ts.split_model(init_model(cfg, 0))
    r = np.random.default_rng(0)
    ids = jnp.asarray(r.integers(0, 150, (2, 33)), jnp.int32)
    mask = jnp.asarray(r.random((2, 32)) > 0.2, jnp.float32)

    def fused(p, chunks):
        from flax import nnx
        return nnx.merge(graphdef, p).loss_sums(ids[:, :-1], ids[:, 1:], mask, chunks=chunks)[0]

    def plain(p):
        from flax import nnx
        logits = nnx.merge(graphdef, p)(ids[:, :-1])
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]) * mask)

    lr, gr = jax.value_and_grad(plain)(params)
    for chunks in (1, 4):
        l, g = jax.value_and_grad(fused)(params, chunks)
        np.testing.assert_allclose(l, lr, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(jnp.max(jnp.abs(b))))),
                     g, gr)


def test_embedding_gradient_sums_in_float32_under_bf16_compute():
    """A token repeated 4096 times: summing its row gradients in bf16 would stall near 8 (of 53)."""
    table = jnp.zeros((8, 4), jnp.float32)
    ids = jnp.zeros((1, 4096), jnp.int32)
    ct = (0.01 * (1 + (jnp.arange(4096) % 7) * 0.1))[None, :, None] * jnp.ones((1, 1, 4))
    expect = np.asarray(jnp.sum(ct, axis=(0, 1)))
    loss = lambda t: jnp.sum(embedding_lookup(t, ids, jnp.bfloat16).astype(jnp.float32) * ct)  # noqa: E731
    naive = lambda t: jnp.sum(jnp.take(t.astype(jnp.bfloat16), ids, axis=0).astype(jnp.float32) * ct)  # noqa: E731
    np.testing.assert_allclose(jax.grad(loss)(table)[0], expect, rtol=1e-4)
    # bf16 master weights: summed in float32, rounded once.
    g16 = jax.grad(loss)(table.astype(jnp.bfloat16))
    assert g16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g16[0], np.float32), expect, rtol=1e-2)
    assert abs(float(jax.grad(naive)(table)[0, 0]) - expect[0]) > 1.0  # what the lookup avoids
    assert embedding_lookup(table, ids, jnp.bfloat16).dtype == jnp.bfloat16


def test_train_step_loss_chunks_give_the_same_step():
    from phi3_jax import optim
    from phi3_jax import sharding as shd

    cfg = get_preset("phi-3-tiny", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16, intermediate_size=128, attention_impl="xla")
    mesh = shd.make_mesh({"fsdp": -1})
    params = ts.split_model(init_model(cfg, 0))[1]
    tx, _ = optim.make_optimizer(params, lr=1e-2, steps=10, warmup_steps=0, weight_decay=0.1)
    r = np.random.default_rng(0)
    ids = r.integers(0, 128, (8, 33)).astype(np.int32)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((8, 32), np.float32)}
    out = []
    for chunks in (1, 4):
        fns = ts.build(cfg, tx, mesh, loss_chunks=chunks)
        _, m = fns.train_step(fns.init(0), shd.make_global_batch(mesh, batch, 8))
        out.append((float(m["loss"]), float(m["grad_norm"])))
    np.testing.assert_allclose(out[0], out[1], rtol=1e-5)


@pytest.mark.parametrize("form", layers.SWIGLU_BACKWARD_FORMS)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_swiglu_value_and_gradient_match_autodiff_of_the_formula(dtype, tol, form, monkeypatch):
    """The MLP's fused-width backward, in each form (one pass over [gate | up], halves concatenated, the
    Pallas kernel), against JAX's own."""
    from phi3_jax.model.layers import swiglu

    monkeypatch.setattr(layers, "SWIGLU_BACKWARD", form)

    z = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 64)) * 3, dtype)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 32)), jnp.float32)

    def plain(z):
        g, u = jnp.split(z.astype(jnp.float32), 2, axis=-1)
        return jax.nn.silu(g) * u

    np.testing.assert_allclose(np.asarray(swiglu(z), np.float32), np.asarray(plain(z).astype(dtype), np.float32),
                               rtol=tol, atol=tol)
    got = jax.grad(lambda z: jnp.sum(swiglu(z).astype(jnp.float32) * w))(z)
    want = jax.grad(lambda z: jnp.sum(plain(z) * w))(z)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol,
                               atol=tol * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("block", [16, 64])
def test_swiglu_backward_kernel_matches_the_xla_halves(block):
    """The Pallas kernel, with a width that is not a multiple of its block, against the same formula in
    XLA (within one bf16 rounding: the two may round float32 exp differently); a wrong block or shape is
    refused."""
    from phi3_jax.ops.rowwise import swiglu_backward

    r = np.random.default_rng(5)
    z = jnp.asarray(r.normal(size=(2, 3, 2 * 40)) * 3, jnp.bfloat16)
    dh = jnp.asarray(r.normal(size=(2, 3, 40)), jnp.bfloat16)
    got = swiglu_backward(z, dh, block=block, interpret=INTERPRET)
    want = jnp.concatenate(layers.swiglu_backward_halves(z, dh), axis=-1)
    assert got.dtype == jnp.bfloat16 and got.shape == z.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2 ** -8, atol=1e-6)
    with pytest.raises(ValueError, match="power of 2"):
        swiglu_backward(z, dh, block=48, interpret=INTERPRET)
    with pytest.raises(ValueError, match=r"not \[B, T, 2I\]"):
        swiglu_backward(z, dh[..., :20], interpret=INTERPRET)


@EIGHT_DEVICES
def test_swiglu_backward_kernel_under_a_mesh(monkeypatch):
    """On 8 devices the kernel runs per batch shard, and where the MLP width is split over devices the
    one-pass XLA form runs instead: gradients equal to autodiff's either way."""
    from phi3_jax import sharding as shd

    monkeypatch.setattr(layers, "SWIGLU_BACKWARD", "kernel")
    r = np.random.default_rng(6)
    z = jnp.asarray(r.normal(size=(8, 4, 64)), jnp.float32)
    w = jnp.asarray(r.normal(size=(8, 4, 32)), jnp.float32)
    want = jax.grad(lambda z: jnp.sum(layers.plain_swiglu(z) * w))(z)
    mesh = shd.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})
    for rules, kernel in (({"activation_mlp": None}, True), ({}, False)):
        f = shd.with_activation_sharding(jax.grad(lambda z: jnp.sum(layers.swiglu(z) * w)), mesh, rules)
        assert ("pallas_call" in str(jax.make_jaxpr(f)(z))) == kernel
        np.testing.assert_allclose(jax.jit(f)(z), want, atol=1e-5)


@EIGHT_DEVICES
def test_rms_norm_kernel_under_a_mesh(monkeypatch):
    """On 8 devices the norm's kernel runs per batch shard (the scale replicated), and where the hidden
    axis is split over devices XLA's forward runs instead: values and gradients as autodiff's either way."""
    from phi3_jax import sharding as shd

    monkeypatch.setattr(layers, "RMS_NORM_FORWARD", "kernel")
    monkeypatch.setattr(layers, "RMS_NORM_BACKWARD", "kernel")  # d scale: partial sums from every shard
    r = np.random.default_rng(8)
    x = jnp.asarray(r.normal(size=(8, 4, 48)) + 0.5, jnp.float32)
    scale = jnp.asarray(1 + 0.1 * r.normal(size=(48,)), jnp.float32)
    w = jnp.asarray(r.normal(size=(8, 4, 48)), jnp.float32)
    loss = lambda norm: lambda x, s: jnp.sum(norm(x, s, 1e-5) * w)  # noqa: E731
    want = jax.value_and_grad(loss(layers.plain_rms_norm), argnums=(0, 1))(x, scale)
    mesh = shd.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})
    for rules, kernel in (({}, True), ({"activation_embed": "tensor"}, False)):
        f = shd.with_activation_sharding(jax.value_and_grad(loss(layers.rms_norm), argnums=(0, 1)), mesh, rules)
        assert ("pallas_call" in str(jax.make_jaxpr(f)(x, scale))) == kernel
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), jax.jit(f)(x, scale), want)


@EIGHT_DEVICES
def test_add_rms_norm_kernel_under_a_mesh(monkeypatch):
    """The residual add + norm kernel per batch shard on 8 devices; XLA's add and norm where the hidden
    axis is split: values and gradients as autodiff's either way."""
    from phi3_jax import sharding as shd

    monkeypatch.setattr(layers, "RMS_NORM_FORWARD", "kernel")
    monkeypatch.setattr(layers, "RMS_NORM_BACKWARD", "kernel")
    r = np.random.default_rng(9)
    x, a, wh, wy = (jnp.asarray(r.normal(size=(8, 4, 48)), jnp.float32) for _ in range(4))
    scale = jnp.asarray(1 + 0.1 * r.normal(size=(48,)), jnp.float32)
    loss = lambda f: lambda x, a, s: sum(jnp.sum(o * w) for o, w in zip(f(x, a, s), (wh, wy)))  # noqa: E731
    plain = lambda x, a, s: (x + a, layers.plain_rms_norm(x + a, s, 1e-5))  # noqa: E731
    want = jax.value_and_grad(loss(plain), argnums=(0, 1, 2))(x, a, scale)
    mesh = shd.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})
    fused = lambda x, a, s: layers.add_rms_norm(x, a, s, 1e-5)  # noqa: E731
    for rules, kernel in (({}, True), ({"activation_embed": "tensor"}, False)):
        f = shd.with_activation_sharding(jax.value_and_grad(loss(fused), argnums=(0, 1, 2)), mesh, rules)
        assert ("pallas_call" in str(jax.make_jaxpr(f)(x, a, scale))) == kernel
        jax.tree.map(lambda g, h: np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-5), jax.jit(f)(x, a, scale),
                     want)


@pytest.mark.parametrize("backward", layers.RMS_NORM_BACKWARD_FORMS)
@pytest.mark.parametrize("form", layers.RMS_NORM_FORWARD_FORMS)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_add_rms_norm_value_and_gradients_match_autodiff_of_add_then_norm(dtype, tol, form, backward, monkeypatch):
    """h = x + a and the norm of h from one op: the values of the add (rounded to x's dtype) then the norm,
    and the gradients of both outputs' uses (h's two cotangents summed) as autodiff's, in every form of
    the forward and backward passes."""
    monkeypatch.setattr(layers, "RMS_NORM_FORWARD", form)
    monkeypatch.setattr(layers, "RMS_NORM_BACKWARD", backward)
    r = np.random.default_rng(1)
    x = jnp.asarray(r.normal(size=(2, 8, 96)) * 2 + 0.5, dtype)
    a = jnp.asarray(r.normal(size=(2, 8, 96)), dtype)
    scale = jnp.asarray(1 + 0.1 * r.normal(size=(96,)), dtype)
    wh, wy = (jnp.asarray(r.normal(size=(2, 8, 96)), jnp.float32) for _ in range(2))

    def plain(x, a, scale):
        return x + a, layers.plain_rms_norm(x + a, scale, 1e-5)

    def fused(x, a, scale):
        return layers.add_rms_norm(x, a, scale, 1e-5)

    (h, y), (h_plain, y_plain) = fused(x, a, scale), plain(x, a, scale)
    assert h.dtype == y.dtype == dtype
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(h_plain, np.float32))
    y, y_plain = np.asarray(y, np.float32), np.asarray(y_plain, np.float32)
    if form == "xla":
        np.testing.assert_array_equal(y, y_plain)
    else:  # the kernel sums the row in its own order (interpreted too): a few float32 ulps
        ulps = 1 if dtype == jnp.bfloat16 else 4
        np.testing.assert_allclose(y, y_plain, rtol=ulps * float(jnp.finfo(dtype).eps), atol=1e-6)
    def loss(f):
        return lambda *args: sum(jnp.sum(o.astype(jnp.float32) * w) for o, w in zip(f(*args), (wh, wy)))

    got = jax.grad(loss(fused), argnums=(0, 1, 2))(x, a, scale)
    want = jax.grad(loss(plain), argnums=(0, 1, 2))(x, a, scale)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol,
                                   atol=tol * float(jnp.max(jnp.abs(w.astype(jnp.float32)))))


@pytest.mark.parametrize("form", layers.RMS_NORM_BACKWARD_FORMS)
def test_add_rms_norm_with_one_output_unused(form, monkeypatch):
    """Only the norm used (the final norm: h's cotangent is a symbolic zero, no zero array), or only h."""
    monkeypatch.setattr(layers, "RMS_NORM_BACKWARD", form)
    r = np.random.default_rng(3)
    x, a, w = (jnp.asarray(r.normal(size=(2, 5, 32)), jnp.float32) for _ in range(3))
    scale = jnp.asarray(1 + 0.1 * r.normal(size=(32,)), jnp.float32)
    for out in (0, 1):
        fused = lambda x, a, s: jnp.sum(layers.add_rms_norm(x, a, s, 1e-5)[out] * w)  # noqa: E731
        plain = lambda x, a, s: jnp.sum((x + a, layers.plain_rms_norm(x + a, s, 1e-5))[out] * w)  # noqa: E731
        got, want = (jax.grad(f, argnums=(0, 1, 2))(x, a, scale) for f in (fused, plain))
        jax.tree.map(lambda g, h: np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-6), got, want)


def test_norm_kernels_refuse_unlike_operands():
    from phi3_jax.ops import rowwise

    x, r, s = jnp.ones((1, 2, 8)), jnp.ones((1, 2, 1)), jnp.ones((8,))
    with pytest.raises(ValueError, match="is not like x"):
        rowwise.add_rms_norm(x, jnp.ones((1, 2, 4)), s, 1e-5)
    with pytest.raises(ValueError, match="dy .* is not like x"):
        rowwise.rms_norm_backward(x, r, s, jnp.ones((1, 2, 4)))
    with pytest.raises(ValueError, match="dres .* is not like x"):
        rowwise.rms_norm_backward(x, r, s, x, x.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="rows=0"):
        rowwise.rms_norm_backward(x, r, s, x, rows=0)


@pytest.mark.parametrize("rows", [1, 4, 32])
def test_rms_norm_backward_kernel_walks_every_row_once(rows):
    """Row counts that do not divide the rows (2 x 9): every dx row written, d scale summed once per row,
    against the XLA formula."""
    from phi3_jax.ops import rowwise

    r = np.random.default_rng(2)
    x, dy, dres = (jnp.asarray(r.normal(size=(2, 9, 40)) + 0.3, jnp.float32) for _ in range(3))
    scale = jnp.asarray(1 + 0.1 * r.normal(size=(40,)), jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5)
    with_xla = layers._rms_norm_grads((x, scale, inv), dy, dres)
    dx, dscale_GD = rowwise.rms_norm_backward(x, inv, scale, dy, dres, rows=rows)
    assert dscale_GD.shape == (-(-18 // rows), 40)
    np.testing.assert_allclose(dx, with_xla[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jnp.sum(dscale_GD, axis=0), with_xla[1], rtol=1e-5, atol=1e-5)


def test_unknown_kernel_forms_are_refused(monkeypatch):
    monkeypatch.setattr(layers, "SWIGLU_BACKWARD", "fast")
    with pytest.raises(ValueError, match="SWIGLU_BACKWARD='fast'"):
        jax.grad(lambda z: jnp.sum(layers.swiglu(z)))(jnp.ones((1, 2, 8)))
    monkeypatch.setattr(layers, "RMS_NORM_FORWARD", "fast")
    with pytest.raises(ValueError, match="RMS_NORM_FORWARD='fast'"):
        layers.rms_norm(jnp.ones((1, 2, 8)), jnp.ones((8,)), 1e-5)
    monkeypatch.setattr(layers, "RMS_NORM_FORWARD", "xla")
    monkeypatch.setattr(layers, "RMS_NORM_BACKWARD", "fast")
    with pytest.raises(ValueError, match="RMS_NORM_BACKWARD='fast'"):
        jax.grad(lambda x: jnp.sum(layers.rms_norm(x, jnp.ones((8,)), 1e-5)))(jnp.ones((1, 2, 8)))
    monkeypatch.setattr(cross_entropy, "LOGSUMEXP", "fast")
    x, w, t, m = _inputs()
    with pytest.raises(ValueError, match="LOGSUMEXP='fast'"):
        head_loss(x, w, t, m)


@pytest.mark.parametrize("backward", layers.RMS_NORM_BACKWARD_FORMS)
@pytest.mark.parametrize("form", layers.RMS_NORM_FORWARD_FORMS)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_rms_norm_value_and_gradients_match_autodiff_of_the_formula(dtype, tol, form, backward, monkeypatch):
    """The hand-written backward pass in either form (XLA's, or the Pallas kernel), after either forward
    (a Triton kernel on a GPU may sum the squares in another order, so within a few roundings of x's dtype
    there)."""
    from phi3_jax.model.layers import rms_norm

    monkeypatch.setattr(layers, "RMS_NORM_FORWARD", form)
    monkeypatch.setattr(layers, "RMS_NORM_BACKWARD", backward)
    r = np.random.default_rng(0)
    x = jnp.asarray(r.normal(size=(2, 8, 64)) * 2 + 0.5, dtype)
    scale = jnp.asarray(1 + 0.1 * r.normal(size=(64,)), dtype)
    w = jnp.asarray(r.normal(size=(2, 8, 64)), jnp.float32)

    def plain(x, scale):
        x32 = x.astype(jnp.float32)
        y = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-5)).astype(x.dtype)
        return y * scale.astype(x.dtype)

    y, y_plain = (np.asarray(a, np.float32) for a in (rms_norm(x, scale, 1e-5), plain(x, scale)))
    if form == "xla":
        np.testing.assert_array_equal(y, y_plain)
    else:  # the kernel sums the row in its own order (interpreted too): a few float32 ulps
        ulps = 1 if dtype == jnp.bfloat16 else 4  # float32: the sum's order moves r, then two roundings
        np.testing.assert_allclose(y, y_plain, rtol=ulps * float(jnp.finfo(dtype).eps), atol=1e-6)
    loss = lambda f: lambda x, s: jnp.sum(f(x, s).astype(jnp.float32) * w)  # noqa: E731
    got = jax.grad(loss(lambda x, s: rms_norm(x, s, 1e-5)), argnums=(0, 1))(x, scale)
    want = jax.grad(loss(plain), argnums=(0, 1))(x, scale)
    for g, h in zip(got, want):
        assert g.dtype == h.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(h, np.float32), rtol=tol,
                                   atol=tol * float(jnp.max(jnp.abs(h.astype(jnp.float32)))))


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("forms", [{}, {"SWIGLU_BACKWARD": "kernel", "LOGSUMEXP": "kernel",
                                       "RMS_NORM_FORWARD": "kernel", "RMS_NORM_BACKWARD": "kernel"}],
                         ids=["default_forms", "kernel_forms"])
def test_model_with_fused_backward_passes_matches_jax_autodiff(monkeypatch, forms, scan_layers):
    """The GPU path (layers.FUSED_BACKWARD) through the whole model, in the default forms and with the
    Pallas row kernels, layers scanned or unrolled (each residual add then runs in the next norm's op):
    loss and every gradient as autodiff's."""
    from flax import nnx

    for name, value in forms.items():
        monkeypatch.setattr(cross_entropy if name == "LOGSUMEXP" else layers, name, value)
    cfg = get_preset("phi-3-tiny", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16, intermediate_size=128, attention_impl="xla", scan_layers=scan_layers)
    graphdef, params = ts.split_model(init_model(cfg, 0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 17)), jnp.int32)
    mask = jnp.ones((2, 16), jnp.float32)
    loss = lambda p: nnx.merge(graphdef, p).loss_sums(ids[:, :-1], ids[:, 1:], mask)[0]  # noqa: E731
    out = {}
    for fused in (True, False):
        monkeypatch.setattr(layers, "FUSED_BACKWARD", fused)
        out[fused] = jax.value_and_grad(loss)(params)
    np.testing.assert_allclose(out[True][0], out[False][0], rtol=1e-5)  # (GPU reductions reorder sums)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(jnp.max(jnp.abs(b))))),
                 out[True][1], out[False][1])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_qkv_rope_value_and_gradient_match_autodiff_of_split_and_rope(dtype):
    """layers.qkv_rope (GQA: 4 query heads, 2 kv heads) against autodiff of the slices + apply_rope it
    replaces on GPUs: the same values, and the same d qkv (the same roundings: products then one sum)."""
    from phi3_jax.model.attention import split_qkv
    from phi3_jax.model.layers import apply_rope, qkv_rope, rope_tables

    cfg = get_preset("phi-3-tiny", num_heads=4, num_kv_heads=2, head_dim=16, hidden_size=64)
    r = np.random.default_rng(0)
    qkv = jnp.asarray(r.normal(size=(2, 9, 8 * 16)), dtype)
    cos, sin = rope_tables(cfg, jnp.asarray(r.integers(0, 50, (2, 9)), jnp.int32), dtype)
    ws = [jnp.asarray(r.normal(size=(2, 9, n, 16)), jnp.float32) for n in (4, 2, 2)]

    def plain(qkv):
        q, k, v = split_qkv(cfg, qkv)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def fused(qkv):
        return qkv_rope(qkv, cos, sin, (4, 2, 16))

    for a, b in zip(fused(qkv), plain(qkv)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    loss = lambda f: lambda x: sum(jnp.sum(o.astype(jnp.float32) * w) for o, w in zip(f(x), ws))  # noqa: E731
    got, want = jax.grad(loss(fused))(qkv), jax.grad(loss(plain))(qkv)
    assert got.dtype == dtype and float(jnp.max(jnp.abs(want.astype(jnp.float32)))) > 0
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
