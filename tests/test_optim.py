"""phi3_jax.optim: schedules, AdamW equivalence, weight-decay / LR multipliers, clipping."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from phi3_jax import optim


def _params():
    k = jax.random.split(jax.random.key(0), 4)
    return {
        "embed_tokens": {"embedding": jax.random.normal(k[0], (16, 8))},
        "layers": {"mlp": {"down_proj": {"kernel": jax.random.normal(k[1], (2, 8, 8))}},
                   "input_layernorm": {"scale": jnp.ones((2, 8))},
                   "self_attn": {"qkv_proj": {"bias": jnp.zeros((2, 24))}}},
        "lm_head": {"kernel": jax.random.normal(k[2], (8, 16))},
    }


def _grads(params, i):
    return jax.tree.map(lambda p: jnp.sin(p * (i + 1)) + 0.1 * (i + 1), params)


def test_schedule_warmup_cosine_linear():
    s = optim.make_schedule(1.0, steps=110, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)
    assert float(s(110)) == pytest.approx(0.1, rel=1e-5)
    lin = optim.make_schedule(1.0, steps=110, warmup_steps=10, schedule="linear", min_lr_ratio=0.0)
    assert float(lin(60)) == pytest.approx(0.5, rel=1e-5)
    with pytest.raises(ValueError, match="schedule"):
        optim.make_schedule(1.0, 10, 0, "exp")


def test_warmup_stable_decay():
    # 10 warmup steps, 70 at lr, then the last 20 decay to lr * 0.1.
    for kind, mid in (("linear", 0.55), ("cosine", 0.55), ("sqrt", 0.1 + 0.9 * (1 - 0.5 ** 0.5))):
        s = optim.make_schedule(1.0, steps=100, warmup_steps=10, schedule=kind, min_lr_ratio=0.1, decay_steps=20)
        assert float(s(5)) == pytest.approx(0.5)
        assert [float(s(i)) for i in (10, 45, 80)] == pytest.approx([1.0, 1.0, 1.0])
        assert float(s(90)) == pytest.approx(mid, rel=1e-5), kind
        assert float(s(100)) == pytest.approx(0.1, rel=1e-5) and float(s(150)) == pytest.approx(0.1, rel=1e-5)
        # Lengthening the run moves the decay and leaves every earlier step's learning rate as it was.
        longer = optim.make_schedule(1.0, steps=160, warmup_steps=10, schedule=kind, min_lr_ratio=0.1,
                                     decay_steps=20)
        steps = np.arange(81)
        np.testing.assert_array_equal(jax.vmap(s)(steps), jax.vmap(longer)(steps))
        assert float(longer(100)) == 1.0 and float(longer(150)) == pytest.approx(mid, rel=1e-5)
    # decay_steps 0 or the whole span after the warmup: the plain decay.
    plain = optim.make_schedule(1.0, 100, 10, "sqrt", 0.1)
    whole = optim.make_schedule(1.0, 100, 10, "sqrt", 0.1, decay_steps=90)
    steps = np.arange(120)
    np.testing.assert_allclose(jax.vmap(plain)(steps), jax.vmap(whole)(steps), rtol=1e-6)
    assert float(plain(55)) == pytest.approx(0.1 + 0.9 * (1 - 0.5 ** 0.5), rel=1e-5)
    no_warmup = optim.make_schedule(1.0, 100, 0, "linear", 0.0, decay_steps=50)
    assert [float(no_warmup(i)) for i in (0, 50, 75, 100)] == pytest.approx([1.0, 1.0, 0.5, 0.0])


@pytest.mark.parametrize("fields, words", [
    (dict(decay_steps=-1), r"decay_steps=-1: must be >= 0"),
    (dict(schedule="constant", decay_steps=10), r"decay_steps=10: schedule 'constant' has no decay"),
    (dict(steps=100, warmup_steps=10, decay_steps=91), r"decay_steps=91: longer than the steps after the warmup"),
    (dict(schedule="wsd"), r"schedule='wsd': must be one of cosine, linear, sqrt, constant"),
])
def test_schedule_config_errors(fields, words):
    from phi3_jax import train_config as tcfg

    c = tcfg.default_config()
    c.train.update(fields)
    with pytest.raises(tcfg.ConfigError, match=r"config\.train\." + words):
        tcfg.validate(c)


def test_plain_adamw_when_multipliers_are_one():
    params = _params()
    sched = optim.make_schedule(1e-2, 50, 5)
    ours, _ = optim.make_optimizer(params, lr=1e-2, steps=50, warmup_steps=5, weight_decay=0.1, clip_norm=0,
                                   wd_multipliers=[])  # decay everything, like optax.adamw without a mask
    ref = optax.adamw(sched, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    p1, p2 = params, params
    s1, s2 = ours.init(p1), ref.init(p2)
    for i in range(6):
        g = _grads(params, i)
        u1, s1 = ours.update(g, s1, p1)
        u2, s2 = ref.update(g, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), p1, p2)


def test_default_weight_decay_mask():
    params = _params()
    tree = optim.multiplier_tree(params, None, optim.DEFAULT_WD_RULES)
    assert tree["embed_tokens"]["embedding"] == 0.0
    assert tree["layers"]["input_layernorm"]["scale"] == 0.0
    assert tree["layers"]["self_attn"]["qkv_proj"]["bias"] == 0.0
    assert tree["layers"]["mlp"]["down_proj"]["kernel"] == 1.0
    assert tree["lm_head"]["kernel"] == 1.0
    # With zero gradients only decay moves a parameter: masked ones stay put.
    tx, _ = optim.make_optimizer(params, lr=0.1, steps=10, weight_decay=0.5, clip_norm=0)
    zeros = jax.tree.map(jnp.zeros_like, params)
    u, _ = tx.update(zeros, tx.init(params), params)
    assert float(jnp.abs(u["embed_tokens"]["embedding"]).max()) == 0.0
    assert float(jnp.abs(u["layers"]["input_layernorm"]["scale"]).max()) == 0.0
    np.testing.assert_allclose(u["lm_head"]["kernel"], -0.1 * 0.5 * params["lm_head"]["kernel"], rtol=1e-6)


def test_lr_multipliers_scale_updates():
    params = _params()
    base, _ = optim.make_optimizer(params, lr=0.1, steps=10, weight_decay=0.1, clip_norm=0)
    half, _ = optim.make_optimizer(params, lr=0.1, steps=10, weight_decay=0.1, clip_norm=0,
                                   lr_multipliers=[(r"mlp/", 0.5)])
    by_fn, _ = optim.make_optimizer(params, lr=0.1, steps=10, weight_decay=0.1, clip_norm=0,
                                    lr_multipliers=lambda path: 0.5 if "mlp/" in path else 1.0)
    g = _grads(params, 0)
    ub, _ = base.update(g, base.init(params), params)
    uh, _ = half.update(g, half.init(params), params)
    uf, _ = by_fn.update(g, by_fn.init(params), params)
    k = ("layers", "mlp", "down_proj", "kernel")
    get = lambda t: t[k[0]][k[1]][k[2]][k[3]]  # noqa: E731
    np.testing.assert_allclose(get(uh), 0.5 * get(ub), rtol=1e-6)
    np.testing.assert_allclose(get(uf), get(uh), rtol=1e-6)
    np.testing.assert_allclose(uh["lm_head"]["kernel"], ub["lm_head"]["kernel"], rtol=1e-6)


def test_clipping_scales_gradients_to_the_clip_norm_before_adam():
    # Adam's step hides a gradient's scale (its first step is g / |g| whatever g is), so check what clipping
    # fed it: the first moment after one step is (1 - b1) times the clipped gradient.
    params = _params()
    tx, _ = optim.make_optimizer(params, lr=1.0, steps=10, clip_norm=1.0)
    for scale, want_norm in ((1e6, 1.0), (1e-3, None)):
        g = jax.tree.map(lambda p: scale * (jnp.sin(p) + 0.5), params)
        norm = float(optax.global_norm(g))
        u, state = tx.update(g, tx.init(params), params)
        (adam,) = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                   if isinstance(s, optax.ScaleByAdamState)]
        want = (want_norm or norm) * 0.1  # clipped to norm 1 above it, untouched below
        assert float(optax.global_norm(adam.mu)) == pytest.approx(want, rel=1e-5)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
        assert int(optim.applied_count(state)) == 1
    # Later steps as optax's own clip-then-AdamW chain.
    ref = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8),
                      optax.scale_by_learning_rate(optim.make_schedule(1.0, 10, 0)))
    s1, s2 = tx.init(params), ref.init(params)
    for i in range(3):
        g = jax.tree.map(lambda x: 10.0 ** (3 * i - 3) * x, _grads(params, i))
        u1, s1 = tx.update(g, s1, params)
        u2, s2 = ref.update(g, s2, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), u1, u2)


def test_config_rules_match_the_api_and_a_rule_that_applies_to_nothing_is_refused():
    from types import SimpleNamespace

    from phi3_jax import train_config as tcfg
    from phi3_jax.model.config import ConfigError

    params = _params()
    c = tcfg.default_config()
    c.train.lr_mults = (("mlp/", 0.5), ("embed_tokens/", 0.0))  # as --config.train.lr_mults=... gives them
    c.train.weight_decay = 0.1
    t = tcfg.validate(c).train
    assert t.wd_mults == tuple(optim.DEFAULT_WD_RULES)
    from_config, _ = optim.make_optimizer_from_config(params, t)
    by_api, _ = optim.make_optimizer(params, lr=t.lr, steps=t.steps, warmup_steps=t.warmup_steps,
                                     weight_decay=0.1, lr_multipliers=[("mlp/", 0.5), ("embed_tokens/", 0.0)])
    g = _grads(params, 0)
    state1, state2 = from_config.init(params), by_api.init(params)
    for _ in range(t.warmup_steps + 2):  # past the warmup's lr of 0
        u1, state1 = from_config.update(g, state1, params)
        u2, state2 = by_api.update(g, state2, params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), u1, u2)
    assert float(jnp.abs(u1["embed_tokens"]["embedding"]).max()) == 0.0  # lr x0 freezes it
    assert float(jnp.abs(u1["lm_head"]["kernel"]).max()) > 0.0

    # (tensors, elements) per rule, the first match wins: "mlp/" takes the kernel before "kernel" sees it.
    rules = [("mlp/", 0.5), ("kernel$", 2.0), ("scale|bias", 0.0)]
    assert optim.rule_coverage(params, rules) == [(1, 128), (1, 128), (2, 64)]
    assert "'mlp/' x0.5 (1 tensor, 128 parameters)" in optim.describe_rules(rules, optim.rule_coverage(params, rules))
    for name, bad, index in (("lr_mults", (("mpl/", 0.5),), 0),  # mistyped
                             ("wd_mults", (("kernel", 1.0), ("mlp/down_proj/kernel", 2.0)), 1)):  # shadowed
        with pytest.raises(ConfigError, match=rf"config\.train\.{name}\[{index}\]=.*applies to no parameter.*"
                                              r"the parameters are: embed_tokens/embedding, "):
            optim.make_optimizer_from_config(params, SimpleNamespace(**{**vars(t), name: bad}))


@pytest.mark.parametrize("rules, words", [
    ((("mlp/", -1.0),), r"lr_mults\[0\]=\('mlp/', -1.0\): the multiplier must be a finite number >= 0"),
    ((("mlp/", float("inf")),), r"lr_mults\[0\]=.*must be a finite number"),
    ((("(", 1.0),), r"lr_mults\[0\]: '\(' is not a regular expression"),
    (("mlp/", 0.5), r"lr_mults\[0\]='mlp/': expected a \(regex, multiplier\) pair"),  # a pair, not a list of pairs
    (((1, 0.5),), r"lr_mults\[0\]=\(1, 0.5\): expected a \(regex, multiplier\) pair"),
])
def test_config_rule_errors_name_the_rule(rules, words):
    from phi3_jax import train_config as tcfg

    c = tcfg.default_config()
    c.train.lr_mults = rules
    with pytest.raises(tcfg.ConfigError, match=r"config\.train\." + words):
        tcfg.validate(c)
