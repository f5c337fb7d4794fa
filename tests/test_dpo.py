"""DPO: the per-token head op, the pair loss on packed rows against unpacked conversations, the train step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from phi3_jax import optim
from phi3_jax import sharding as shd
from phi3_jax import train_state as ts
from phi3_jax.model import abstract_model, get_preset, init_model
from phi3_jax.ops.cross_entropy import head_token_nll

CFG = get_preset("phi-3-tiny", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=8, intermediate_size=64, attention_impl="xla")
BETA = 0.5


@pytest.mark.parametrize("chunks", [1, 5])
def test_head_token_nll_matches_log_softmax_values_and_grads(chunks):
    kx, kw, kt, kg = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (2, 5, 16))
    w = jax.random.normal(kw, (16, 40)) * 0.3
    t = jax.random.randint(kt, (2, 5), 0, 40)
    g = jax.random.normal(kg, (2, 5))

    def plain(x, w):
        logits = jnp.dot(x, w) / 2.0
        logits = logits.at[..., 3].set(jnp.finfo(jnp.float32).min)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), t[..., None], -1)[..., 0]

    def fused(x, w):
        return head_token_nll(x, w, t, divisor=2.0, dummy_ids=(3,), chunks=chunks)

    vjp = jax.jit(lambda f, x, w, g: (f(x, w), jax.vjp(f, x, w)[1](g)), static_argnums=0)
    want_nll, want = vjp(plain, x, w, g)
    got_nll, got = vjp(fused, x, w, g)
    np.testing.assert_allclose(got_nll, want_nll, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# Three preference pairs as (chosen ids, chosen trained, rejected ids, rejected trained): a trained mark on
# id t means the model is scored on predicting t.
def _pairs(rng):
    out = []
    for n_c, n_r in ((5, 4), (3, 6), (7, 7)):
        c, r = rng.integers(1, 64, n_c), rng.integers(1, 64, n_r)
        out.append((c, (np.arange(n_c) >= 2).astype(np.int32), r, (np.arange(n_r) >= 2).astype(np.int32)))
    return out


def _packed(pairs, T=24):
    """Pairs 0 and 1 in row 0, pair 2 in row 1 (pair rows: segment 2k-1 chosen, 2k rejected)."""
    rows = {k: np.zeros((2, T), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    rows["loss_mask"] = np.zeros((2, T), np.float32)
    for row, members in ((0, pairs[:2]), (1, pairs[2:])):
        at, seg = 0, 0
        for c, ct, r, rt in members:
            for ids, trained in ((c, ct), (r, rt)):
                seg += 1
                n = len(ids)
                rows["inputs"][row, at:at + n - 1] = ids[:-1]
                rows["targets"][row, at:at + n - 1] = ids[1:]
                rows["segment_ids"][row, at:at + n] = seg
                rows["positions"][row, at:at + n] = np.arange(n)
                rows["loss_mask"][row, at:at + n - 1] = trained[1:]
                rows["inputs"][row, at + n - 1] = ids[-1]  # its target is the next segment's: no loss
                at += n
    return {k: jnp.asarray(v) for k, v in rows.items()}


def _logps(params, pairs, average=False):
    """[pairs, 2]: sum of log p(ids[t] | ids[:t]) over trained t of each chosen and rejected conversation (with
    `average`, its mean over them), from the model's float32 logits with each conversation alone in a row
    (padded at its end: causal)."""
    seqs = [(ids, trained) for c, ct, r, rt in pairs for ids, trained in ((c, ct), (r, rt))]
    L = max(len(ids) for ids, _ in seqs)
    ids = np.stack([np.pad(i, (0, L - len(i))) for i, _ in seqs])
    trained = np.stack([np.pad(t, (0, L - len(t))) for _, t in seqs]).astype(np.float32)
    model = nnx.merge(ts.graphdef_of(CFG), params)
    x, _ = model.hidden(jnp.asarray(ids[:, :-1]))
    logp = jax.nn.log_softmax(model.logits(x))
    target = jnp.take_along_axis(logp, jnp.asarray(ids[:, 1:, None]), -1)[..., 0]
    logp = jnp.sum(target * trained[:, 1:], axis=1)
    return (logp / trained[:, 1:].sum(1) if average else logp).reshape(-1, 2)


def _reference_loss(params, ref, pairs, kind="sigmoid", smoothing=0.0, rpo=0.0):
    """The losses as TRL writes them (RPO's term per sequence, as its paper does), from the unpacked
    conversations' log-probabilities."""
    ratio = _logps(params, pairs, kind == "ipo") - _logps(ref, pairs, kind == "ipo")
    m = ratio[:, 0] - ratio[:, 1]
    if kind == "ipo":
        losses = (m - 1 / (2 * BETA)) ** 2
    elif kind == "hinge":
        losses = jax.nn.relu(1 - BETA * m)
    else:
        losses = -jax.nn.log_sigmoid(BETA * m) * (1 - smoothing) - jax.nn.log_sigmoid(-BETA * m) * smoothing
    losses = losses - rpo * _logps(params, pairs, average=True)[:, 0]
    return jnp.sum(losses), (jnp.sum(m > 0), BETA * jnp.sum(ratio, axis=0))


def _params(seed):
    return nnx.split(init_model(CFG, seed), nnx.Param)[1].to_pure_dict()


@pytest.mark.parametrize("loss_chunks,kind,smoothing,rpo", [(1, "sigmoid", 0.0, 0.0), (3, "sigmoid", 0.0, 0.0),
                                                           (1, "sigmoid", 0.2, 0.0), (1, "ipo", 0.0, 0.0),
                                                           (1, "hinge", 0.0, 0.0), (1, "sigmoid", 0.0, 0.5)])
def test_dpo_sums_match_unpacked_conversations_values_and_grads(loss_chunks, kind, smoothing, rpo):
    pairs = _pairs(np.random.default_rng(0))
    policy, ref = _params(0), _params(1)
    batch = _packed(pairs)
    graphdef = ts.graphdef_of(CFG)
    loss_fn = ts.DPOLoss(BETA, kind, smoothing, rpo)

    def packed_loss(p):
        sums = ts.dpo_sums(graphdef, p, ref, batch, "float32", loss_fn, loss_chunks=loss_chunks)
        return sums["loss"], sums

    (loss, sums), grads = jax.jit(jax.value_and_grad(packed_loss, has_aux=True))(policy)
    (want_loss, (want_correct, want_rewards)), want_grads = jax.jit(jax.value_and_grad(
        lambda p: _reference_loss(p, ref, pairs, kind, smoothing, rpo), has_aux=True))(policy)
    np.testing.assert_allclose([float(sums["reward_chosen"]), float(sums["reward_rejected"])], want_rewards,
                               rtol=1e-4, atol=1e-6)
    assert float(sums["count"]) == 3
    assert int(sums["correct"]) == int(want_correct)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), grads, want_grads)


def test_dpo_against_itself_is_log2_and_a_pair_without_a_rejected_reply_is_not_counted():
    pairs = _pairs(np.random.default_rng(1))
    p = _params(0)
    sums = ts.dpo_sums(ts.graphdef_of(CFG), p, p, _packed(pairs), "float32", ts.DPOLoss(BETA))
    np.testing.assert_allclose(float(sums["loss"]), 3 * np.log(2.0), rtol=1e-6)
    assert float(sums["correct"]) == 0
    c, ct, r, rt = pairs[2]
    pairs[2] = (c, ct, r, np.zeros_like(rt))  # row 1's pair: nothing of the rejected side is trained
    sums = ts.dpo_sums(ts.graphdef_of(CFG), p, p, _packed(pairs), "float32", ts.DPOLoss(BETA))
    assert float(sums["count"]) == 2


def _dpo_fns(grad_accum=1, compute_dtype="float32", loss_chunks=1):
    mesh = shd.make_mesh({"fsdp": -1})
    params = ts.split_model(abstract_model(CFG))[1]
    tx, _ = optim.make_optimizer(params, lr=3e-3, steps=100, warmup_steps=0, weight_decay=0.0)
    fns = ts.build(CFG, tx, mesh, compute_dtype=compute_dtype, grad_accum=grad_accum, objective="dpo",
                   dpo=ts.DPOLoss(BETA), loss_chunks=loss_chunks)
    return fns, tx, mesh


def _batch8(mesh):
    rng = np.random.default_rng(2)
    rows = [_packed(_pairs(rng)) for _ in range(4)]
    return shd.make_global_batch(mesh, {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}, 8)


@pytest.mark.slow
def test_dpo_train_step_learns_the_preference_and_keeps_the_reference():
    fns, tx, mesh = _dpo_fns()
    state = fns.init(0)
    ref0 = jax.tree.map(np.asarray, state["ref_params"])
    jax.tree.map(np.testing.assert_array_equal, ref0, jax.tree.map(np.asarray, state["params"]))
    batch = _batch8(mesh)
    out = []
    for _ in range(10):
        state, m = fns.train_step(state, batch)
        out.append((float(m["loss"]), float(m["accuracy"])))
    np.testing.assert_allclose(out[0][0], np.log(2.0), rtol=1e-6)  # policy == reference at step 0
    assert out[-1][0] < 0.5 * np.log(2.0) and out[-1][1] == 1.0, out
    jax.tree.map(np.testing.assert_array_equal, ref0, jax.tree.map(np.asarray, state["ref_params"]))
    ev = fns.eval_step(state, batch)
    assert float(ev["count"]) == 12 and float(ev["correct"]) == 12


@pytest.mark.slow
def test_dpo_grad_accum_loss_chunks_and_init_from_params():
    (f1, tx, mesh), (f2, _, _) = _dpo_fns(1), _dpo_fns(2, loss_chunks=3)
    start = _params(3)
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731 - state_from_params takes (donates) them
    s1, s2 = ts.state_from_params(f1, tx, copy(start)), ts.state_from_params(f2, tx, copy(start))
    jax.tree.map(np.testing.assert_array_equal, start, jax.tree.map(np.asarray, s1["ref_params"]))
    batch = _batch8(mesh)
    for _ in range(2):
        s1, m1 = f1.train_step(s1, batch)
        s2, m2 = f2.train_step(s2, batch)
        np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
        assert float(m1["accuracy"]) == float(m2["accuracy"])


@pytest.mark.slow
def test_bf16_reference_is_the_policy_cast():
    fns, tx, mesh = _dpo_fns(compute_dtype="bfloat16")
    state = fns.init(0)
    assert state["ref_params"]["layers"]["mlp"]["down_proj"]["kernel"].dtype == jnp.bfloat16
    state, m = fns.train_step(state, _batch8(mesh))
    np.testing.assert_allclose(float(m["loss"]), np.log(2.0), rtol=1e-6)


def test_objective_config_errors():
    from phi3_jax import train_config as tcfg
    from tests.train_helpers import load_config

    for fields, words in (({"objective": "ppo"}, r"objective='ppo': must be 'lm' or 'dpo'"),
                          ({"dpo_beta": 0.0}, r"dpo_beta=0.0: must be > 0"),
                          ({"dpo_loss": "kto"}, r"dpo_loss='kto': must be one of sigmoid, ipo, hinge"),
                          ({"dpo_label_smoothing": 0.5}, r"dpo_label_smoothing=0.5: must be in \[0, 0.5\)"),
                          ({"dpo_rpo_alpha": -1.0}, r"dpo_rpo_alpha=-1.0: must be >= 0"),
                          ({"dpo_loss": "ipo", "dpo_label_smoothing": 0.1},
                           r"dpo_label_smoothing=0.1: applies to dpo_loss='sigmoid' only \(it is 'ipo'\)")):
        c = load_config()
        c.train.update(fields)
        with pytest.raises(tcfg.ConfigError, match=r"config\.train\." + words):
            tcfg.validate(c)
    with pytest.raises(ValueError, match="label_smoothing"):
        ts.DPOLoss(BETA, "hinge", 0.1)
    with pytest.raises(ValueError, match="objective"):
        ts.make_train_step(ts.graphdef_of(CFG), optax.sgd(0.1), objective="ppo")
