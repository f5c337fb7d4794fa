"""Training-only dropout: the op, where the model applies it, the keys' invariances, and config.json fields."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phi3_jax import optim
from phi3_jax import sharding as shd
from phi3_jax import train_state as ts
from phi3_jax.model import ConfigError, get_preset, init_model
from phi3_jax.model.hf_config import from_hf_config, to_hf_config
from phi3_jax.model.layers import dropout


def _keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dropout_rate_scale_and_gradient(dtype):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 64, 32)) + 3.0, dtype)
    y = dropout(x, 0.25, _keys(4), 0)
    dropped = np.asarray(y == 0)
    assert y.dtype == dtype and abs(dropped.mean() - 0.25) < 0.02
    # Kept entries are x * (1 / 0.75) computed in float32 and rounded once.
    expect = (np.asarray(x, np.float32) * np.float32(1 / 0.75)).astype(np.asarray(x).dtype)
    np.testing.assert_array_equal(np.asarray(y)[~dropped], expect[~dropped])
    # The gradient is the same mask and scale (regenerated from the keys, not stored).
    g = jax.grad(lambda x: jnp.sum(dropout(x, 0.25, _keys(4), 0).astype(jnp.float32)))(x)
    np.testing.assert_array_equal(np.asarray(g) == 0, dropped)
    np.testing.assert_allclose(np.asarray(g, np.float32)[~dropped], np.float32(1 / 0.75), rtol=1e-2)


def test_dropout_mask_of_a_row_depends_only_on_its_key_and_site():
    k = _keys(3)
    x = jnp.ones((3, 16, 8))
    a = dropout(x, 0.5, k, 0)
    b = dropout(x[::-1], 0.5, k[::-1], 0)  # same rows, other order
    np.testing.assert_array_equal(a, b[::-1])
    assert not np.array_equal(a, dropout(x, 0.5, k, 1))  # another site, another mask


CFG = get_preset("phi-3-small-tiny", num_layers=2, attention_impl="xla")


def _batch(B=8, T=64, seed=0):
    ids = np.random.default_rng(seed).integers(0, 500, (B, T + 1)).astype(np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((B, T), np.float32)}


def test_model_drops_only_with_keys_and_rates():
    """No keys: deterministic (eval, sampling). Keys with all rates 0: bit-identical to no keys."""
    assert CFG.embd_dropout == 0.1 and CFG.resid_mlp_dropout == 0.1 and CFG.resid_attn_dropout == 0.0
    b = _batch(B=2)
    args = (b["inputs"], b["targets"], b["loss_mask"])
    model = init_model(CFG, 0)
    plain = float(model.loss_sums(*args)[0])
    dropped = float(model.loss_sums(*args, dropout_keys_B=_keys(2))[0])
    assert dropped != plain and np.isfinite(dropped)
    graphdef, state = nnx.split(model)
    off = nnx.merge(ts.graphdef_of(dataclasses.replace(CFG, embd_dropout=0.0, resid_mlp_dropout=0.0)), state)
    assert float(off.loss_sums(*args, dropout_keys_B=_keys(2))[0]) == plain
    # Each site matters: embeddings alone, MLP outputs alone.
    for change in (dict(resid_mlp_dropout=0.0), dict(embd_dropout=0.0)):
        one = nnx.merge(ts.graphdef_of(dataclasses.replace(CFG, **change)), state)
        assert float(one.loss_sums(*args, dropout_keys_B=_keys(2))[0]) not in (plain, dropped)


def _step(cfg, grad_accum=1, seed=0, mesh_shape=None, loss_chunks=1):
    mesh = shd.make_mesh(mesh_shape or {"fsdp": -1})
    params = ts.split_model(init_model(cfg, 0))[1]
    tx, _ = optim.make_optimizer(params, lr=1e-3, steps=10, warmup_steps=0, weight_decay=0.1)
    fns = ts.build(cfg, tx, mesh, grad_accum=grad_accum, seed=seed, loss_chunks=loss_chunks)
    batch = shd.make_global_batch(mesh, _batch(), 8)
    state, m = fns.train_step(fns.init(0), batch)
    state, m2 = fns.train_step(state, batch)
    return fns, state, batch, (float(m["loss"]), float(m["grad_norm"]), float(m2["loss"]))


def test_train_step_masks_do_not_depend_on_grad_accum_or_mesh_but_on_seed_and_step():
    _, _, _, ref = _step(CFG)
    _, _, _, accum = _step(CFG, grad_accum=4)
    # (the tensor axis also splits the tied head's vocabulary, here with the loss in 4 chunks)
    _, _, _, mesh = _step(CFG, mesh_shape={"data": 2, "fsdp": 2, "tensor": 2}, loss_chunks=4)
    _, _, _, other_seed = _step(CFG, seed=1)
    np.testing.assert_allclose(accum, ref, rtol=2e-5)
    np.testing.assert_allclose(mesh, ref, rtol=2e-5)
    assert other_seed[0] != ref[0]
    assert ref[0] != ref[2]  # step 2 draws new masks (and has new weights)


def test_eval_step_never_drops():
    fns, state, batch, _ = _step(CFG)
    model = nnx.merge(ts.graphdef_of(CFG), state["params"])
    want = model.loss_sums(batch["inputs"], batch["targets"], batch["loss_mask"])
    got = fns.eval_step(state, batch)
    np.testing.assert_allclose([float(got["loss"]), float(got["count"])], [float(w) for w in want], rtol=1e-6)


def test_config_rates_are_checked():
    with pytest.raises(ConfigError, match="resid_mlp_dropout"):
        dataclasses.replace(CFG, resid_mlp_dropout=1.0)
    with pytest.raises(ConfigError, match="embd_dropout"):
        dataclasses.replace(CFG, embd_dropout=-0.1)


def test_hf_config_dropout_fields_round_trip():
    phi3 = to_hf_config(get_preset("phi-3-tiny", embd_dropout=0.05, resid_attn_dropout=0.1, resid_mlp_dropout=0.1))
    assert (phi3["embd_pdrop"], phi3["resid_pdrop"], phi3["attention_dropout"]) == (0.05, 0.1, 0.0)
    back = from_hf_config(phi3)
    assert (back.embd_dropout, back.resid_attn_dropout, back.resid_mlp_dropout) == (0.05, 0.1, 0.1)
    with pytest.raises(ConfigError, match="attention_dropout"):
        from_hf_config({**phi3, "attention_dropout": 0.1})
    with pytest.raises(ConfigError, match="resid_pdrop"):
        from_hf_config({**phi3, "resid_pdrop": 1.5})
    with pytest.raises(ConfigError, match="resid_attn_dropout"):
        to_hf_config(get_preset("phi-3-tiny", resid_attn_dropout=0.1))

    small = to_hf_config(CFG)
    assert (small["embedding_dropout_prob"], small["ffn_dropout_prob"], small["attention_dropout_prob"]) == (0.1, 0.1, 0.0)
    back = from_hf_config(small)
    assert (back.embd_dropout, back.resid_attn_dropout, back.resid_mlp_dropout) == (0.1, 0.0, 0.1)
    with pytest.raises(ConfigError, match="attention_dropout_prob"):
        from_hf_config({**small, "attention_dropout_prob": 0.1})
    with pytest.raises(ConfigError, match="resid_attn_dropout"):
        to_hf_config(dataclasses.replace(CFG, resid_attn_dropout=0.1))
