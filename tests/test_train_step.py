"""The jitted train step: gradient accumulation, skipped non-finite updates, bf16 compute, eval."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi3_jax import optim
from phi3_jax import sharding as shd
from phi3_jax import train_state as ts
from phi3_jax.model import abstract_model, get_preset

CFG = get_preset("phi-3-tiny", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, intermediate_size=128, attention_impl="xla")


def _batch(B=8, T=32, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 128, (B, T + 1)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[:, T // 2:] = 2  # two packed documents per row
    pos = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)])[None].repeat(B, 0).astype(np.int32)
    mask = np.ones((B, T), np.float32)
    mask[:, T // 2 - 1] = 0.0
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "segment_ids": seg, "positions": pos, "loss_mask": mask}


def _fns(grad_accum=1, compute_dtype="float32", mesh=None, lr=1e-2):
    mesh = mesh or shd.make_mesh({"fsdp": -1})
    params = ts.split_model(abstract_model(CFG))[1]
    tx, _ = optim.make_optimizer(params, lr=lr, steps=100, warmup_steps=0, weight_decay=0.1)
    return ts.build(CFG, tx, mesh, compute_dtype=compute_dtype, grad_accum=grad_accum), mesh


def test_grad_accum_matches_full_batch():
    (f1, mesh), (f4, _) = _fns(1), _fns(4)
    s1, s4 = f1.init(0), f4.init(0)
    for i in range(2):
        b = shd.make_global_batch(mesh, _batch(seed=i), 8)
        s1, m1 = f1.train_step(s1, b)
        s4, m4 = f4.train_step(s4, b)
        np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-5)
        np.testing.assert_allclose(float(m1["grad_norm"]), float(m4["grad_norm"]), rtol=1e-4)
    # Adam divides by sqrt(v): float summation-order noise in tiny gradients moves updates slightly.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4), s1["params"], s4["params"])


def test_poisoned_batch_is_skipped_and_counted():
    f, mesh = _fns()
    state = f.init(0)
    good = shd.make_global_batch(mesh, _batch(), 8)
    poisoned = _batch()
    poisoned["loss_mask"][0, 0] = np.nan
    bad = shd.make_global_batch(mesh, poisoned, 8)
    state, m = f.train_step(state, good)
    before = jax.tree.map(np.asarray, state)
    state, m = f.train_step(state, bad)
    assert not bool(m["finite"]) and int(m["nonfinite_run"]) == 1 and int(m["skipped"]) == 1
    jax.tree.map(np.testing.assert_array_equal, before["params"], jax.tree.map(np.asarray, state["params"]))
    jax.tree.map(np.testing.assert_array_equal, before["opt_state"], jax.tree.map(np.asarray, state["opt_state"]))
    assert int(state["step"]) == 2
    state, m = f.train_step(state, bad)
    assert int(m["nonfinite_run"]) == 2
    state, m = f.train_step(state, good)
    assert bool(m["finite"]) and int(m["nonfinite_run"]) == 0 and int(m["skipped"]) == 2
    assert np.isfinite(float(m["loss"]))


def test_loss_drops_and_bf16_compute_keeps_f32_master():
    f, mesh = _fns(compute_dtype="bfloat16", lr=3e-3)
    state = f.init(0)
    b = shd.make_global_batch(mesh, _batch(), 8)
    losses = []
    for _ in range(8):
        state, m = f.train_step(state, b)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.3, losses
    assert state["params"]["lm_head"]["kernel"].dtype == jnp.float32
    sums = f.eval_step(state, b)
    s, n = sums["loss"], sums["count"]
    assert float(n) == float(np.sum(_batch()["loss_mask"]))
    assert abs(float(s) / float(n) - losses[-1]) < 0.5


def _cast(tree):
    return jax.tree.map(lambda a: np.asarray(a.astype(jnp.bfloat16)), tree)


def test_bf16_compute_copy_is_the_cast_master_and_steps_like_casting_in_the_step(monkeypatch):
    """bf16 compute keeps the cast weights in the state (written by the optimizer's pass); a step with it
    matches a step that casts the float32 master weights itself, and it follows the master weights.
    (Without the copy XLA:CPU may keep a weight gradient's matmul in float32 rather than round it to
    bf16, and Adam's 1 / sqrt(v) carries that rounding into the update: hence a tolerance.)"""
    monkeypatch.setattr(ts, "COMPUTE_COPY", True)  # kept on GPU meshes by default
    f, mesh = _fns(compute_dtype="bfloat16", grad_accum=2, lr=3e-3)
    state = f.init(0)
    copy = state["compute_params"]
    assert "embed_tokens" not in copy  # the table is cast per row, its gradient sums in float32
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(copy))
    b = shd.make_global_batch(mesh, _batch(), 8)
    tx, _ = optim.make_optimizer(ts.split_model(abstract_model(CFG))[1], lr=3e-3, steps=100, warmup_steps=0,
                                 weight_decay=0.1)  # as _fns makes it
    plain = jax.jit(ts.make_train_step(ts.graphdef_of(CFG), tx, compute_dtype="bfloat16", grad_accum=2, mesh=mesh))
    without = {k: v for k, v in jax.tree.map(np.asarray, state).items() if k != "compute_params"}
    for _ in range(2):
        state, m = f.train_step(state, b)
        without, m_plain = plain(without, b)
        np.testing.assert_allclose(m["loss"], m_plain["loss"], rtol=1e-6)
        np.testing.assert_allclose(m["grad_norm"], m_plain["grad_norm"], rtol=1e-5)
        # The bound of test_grad_accum_matches_full_batch, for the same 1 / sqrt(v) effect.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4), state["params"],
                     without["params"])
        jax.tree.map(np.testing.assert_array_equal, _cast({k: v for k, v in state["params"].items()
                                                           if k != "embed_tokens"}), _cast(state["compute_params"]))


def test_skipped_step_keeps_the_compute_copy(monkeypatch):
    monkeypatch.setattr(ts, "COMPUTE_COPY", True)
    f, mesh = _fns(compute_dtype="bfloat16")
    state = f.init(0)
    state, _ = f.train_step(state, shd.make_global_batch(mesh, _batch(), 8))
    poisoned = _batch()
    poisoned["loss_mask"][0, 0] = np.nan
    before = jax.tree.map(np.asarray, state["compute_params"])
    state, m = f.train_step(state, shd.make_global_batch(mesh, poisoned, 8))
    assert not bool(m["finite"])
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, state["compute_params"]))


def test_compute_copy_only_where_it_is_kept(monkeypatch):
    monkeypatch.setattr(ts, "COMPUTE_COPY", True)
    assert "compute_params" not in _fns(compute_dtype="float32")[0].init(0)  # nothing to cast
    monkeypatch.setattr(ts, "COMPUTE_COPY", None)
    assert "compute_params" not in _fns(compute_dtype="bfloat16")[0].abstract_state  # a CPU mesh


def test_state_from_params_casts_the_compute_copy(monkeypatch):
    """--init_from's fresh state around imported weights carries their cast copy, placed like the state."""
    monkeypatch.setattr(ts, "COMPUTE_COPY", True)
    f, _ = _fns(compute_dtype="bfloat16")
    params = jax.tree.map(np.asarray, f.init(3)["params"])
    tx, _ = optim.make_optimizer(params, lr=1e-2, steps=100, warmup_steps=0, weight_decay=0.1)
    state = ts.state_from_params(f, tx, params)
    expect = _cast({k: v for k, v in params.items() if k != "embed_tokens"})
    jax.tree.map(np.testing.assert_array_equal, expect, _cast(state["compute_params"]))
    jax.tree.map(lambda a, s: a.sharding == s or pytest.fail(f"{a.sharding} != {s}"), state["compute_params"],
                 f.state_shardings["compute_params"])


def test_compute_copy_steps_alike_on_one_device_and_a_data_fsdp_tensor_mesh(monkeypatch):
    monkeypatch.setattr(ts, "COMPUTE_COPY", True)
    runs = []
    for shape in ({"data": 1, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
        f, mesh = _fns(compute_dtype="bfloat16", mesh=shd.make_mesh(shape), lr=3e-3)
        state = f.init(0)
        assert state["compute_params"]["layers"]["mlp"]["gate_up_proj"]["kernel"].sharding == \
            f.state_shardings["compute_params"]["layers"]["mlp"]["gate_up_proj"]["kernel"]
        b = shd.make_global_batch(mesh, _batch(), 8)
        losses = []
        for _ in range(3):
            state, m = f.train_step(state, b)
            losses.append(float(m["loss"]))
        runs.append((losses, jax.tree.map(np.asarray, state["compute_params"])))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=2e-3)  # bf16 matmuls, sums in another order
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3),
                 runs[0][1], runs[1][1])
