"""AdamW with warmup + cosine / linear / 1-sqrt decay (after a stable phase, if asked), global-norm clipping
and per-parameter multipliers.

The update for a parameter p with gradient g (after clipping) is

    p <- p - lr(t) * lr_mult(p) * (adam(g) + weight_decay * wd_mult(p) * p)

which with every multiplier 1 is exactly `optax.adamw` (decoupled weight decay scaled by the learning
rate, as in PyTorch's AdamW). `t` counts *applied* updates: a step skipped for a non-finite loss or
gradient leaves the optimizer state, and so the schedule position, unchanged.

Multipliers are given as a callable `path -> float` (path like "layers/self_attn/qkv_proj/kernel") or a
list of (regex, value) pairs, first match wins (`re.search`), default 1.0. A training config sets the pairs
as `train.lr_mults` / `train.wd_mults` (`make_optimizer_from_config` refuses a pair that applies to no
parameter, so a mistyped pattern cannot pass silently); `phi3_jax.train.run(lr_multipliers=,
wd_multipliers=)` takes either form in their place (the hook for muP's per-parameter learning rates).
Layers are stacked for the scan over depth, so a rule applies to a weight in every layer at once.

Default weight-decay multipliers (`DEFAULT_WD_RULES`): 0 for norm scales and biases (any path ending in
"scale" or "bias") and for the token embedding ("embed_tokens"); 1 for every matmul kernel, the untied
lm_head included. Decaying norms pulls them toward 0, not toward their init of 1, and decaying the
embedding shrinks rare tokens' rows for no benefit.

Gradient accumulation is not done here: the train step scans over microbatches inside one jit
(see `phi3_jax.train_state`), which keeps the optimizer a plain per-step transformation.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from phi3_jax.model.config import ConfigError
from phi3_jax.sharding import path_str

Multipliers = Callable[[str], float] | Sequence[tuple[str, float]] | None

DEFAULT_WD_RULES: list[tuple[str, float]] = [
    (r"(^|/)(scale|bias)$", 0.0),
    (r"(^|/)embed_tokens/", 0.0),
]


SCHEDULES = ("cosine", "linear", "sqrt", "constant")


def make_schedule(lr: float, steps: int, warmup_steps: int, schedule: str = "cosine",
                  min_lr_ratio: float = 0.1, decay_steps: int = 0) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over warmup_steps, then a decay to lr * min_lr_ratio at `steps`, constant
    afterwards: "cosine", "linear", or "sqrt" (1 - sqrt of the decay's progress, the cooldown of
    warmup-stable-decay runs, arXiv 2405.18392); "constant" keeps `lr` after warmup.

    decay_steps > 0 decays over the last decay_steps steps only and holds `lr` between the warmup and them
    (warmup-stable-decay): the learning rate before the decay does not depend on `steps`, so a run resumed
    with a larger train.steps before its decay began continues as if it had been set from the start.
    decay_steps = 0 decays over every step after the warmup."""
    if schedule not in SCHEDULES:
        raise ValueError(f"train.schedule={schedule!r}: must be one of {', '.join(SCHEDULES)}")
    warmup_steps = max(0, min(int(warmup_steps), int(steps)))
    after_warmup = max(1, int(steps) - warmup_steps)
    decay_steps = min(int(decay_steps), after_warmup) if decay_steps else after_warmup
    end = lr * min_lr_ratio
    if schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=min_lr_ratio)
    elif schedule == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    elif schedule == "sqrt":
        def decay(count):
            done = jnp.clip(count / decay_steps, 0.0, 1.0)
            return end + (lr - end) * (1.0 - jnp.sqrt(done))
    else:
        decay = optax.constant_schedule(lr)
    pieces, lengths = [], []
    if warmup_steps:
        pieces.append(optax.linear_schedule(0.0, lr, warmup_steps))
        lengths.append(warmup_steps)
    if schedule != "constant" and decay_steps < after_warmup:
        pieces.append(optax.constant_schedule(lr))
        lengths.append(after_warmup - decay_steps)
    pieces.append(decay)
    return optax.join_schedules(pieces, list(np.cumsum(lengths))) if lengths else decay


def _as_fn(mult: Multipliers, default_rules: Sequence[tuple[str, float]] = ()) -> Callable[[str], float]:
    if callable(mult):
        return mult
    rules = list(mult) if mult is not None else list(default_rules)
    compiled = [(re.compile(p), float(v)) for p, v in rules]

    def fn(path: str) -> float:
        for pattern, value in compiled:
            if pattern.search(path):
                return value
        return 1.0

    return fn


def multiplier_tree(params, mult: Multipliers, default_rules: Sequence[tuple[str, float]] = ()):
    """A pytree of Python floats, one per parameter, from a multiplier spec."""
    fn = _as_fn(mult, default_rules)
    return jax.tree_util.tree_map_with_path(lambda path, _: float(fn(path_str(path))), params)


def rule_coverage(params, rules: Sequence[tuple[str, float]]) -> list[tuple[int, int]]:
    """(tensors, elements) that each (regex, value) rule applies to, first match wins."""
    compiled = [re.compile(p) for p, _ in rules]
    cover = [[0, 0] for _ in rules]
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_str(path)
        for i, pattern in enumerate(compiled):
            if pattern.search(name):
                cover[i][0] += 1
                cover[i][1] += math.prod(leaf.shape)
                break
    return [tuple(c) for c in cover]


def check_rules(params, rules: Sequence[tuple[str, float]], where: str) -> list[tuple[int, int]]:
    """rule_coverage, raising ConfigError for a rule that applies to no parameter (a mistyped pattern, or one
    that an earlier rule shadows)."""
    cover = rule_coverage(params, rules)
    for i, ((pattern, value), (tensors, _)) in enumerate(zip(rules, cover)):
        if not tensors:
            names = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
            raise ConfigError(f"{where}[{i}]=({pattern!r}, {value}): applies to no parameter (rules are tried in "
                              f"order with re.search, the first match wins); the parameters are: {', '.join(names)}")
    return cover


def describe_rules(rules: Sequence[tuple[str, float]], cover: Sequence[tuple[int, int]]) -> str:
    """"'mlp/' x0.5 (2 tensors, 49,152 parameters)" for each rule, joined by '; '."""
    return "; ".join(f"{pattern!r} x{value:g} ({tensors} tensor{'s' * (tensors != 1)}, {elements:,} parameters)"
                     for (pattern, value), (tensors, elements) in zip(rules, cover))


def _scale_by_tree(tree) -> optax.GradientTransformation:
    """Multiplies each update leaf by a static per-leaf float (skipped where it is 1)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u if m == 1.0 else u * jnp.asarray(m, u.dtype), updates, tree), state

    return optax.GradientTransformation(init, update)


def _decayed_weights(weight_decay: float, tree) -> optax.GradientTransformation:
    """updates + weight_decay * wd_mult * params (leaves with multiplier 0 untouched)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("weight decay needs the parameters")
        if weight_decay == 0.0:
            return updates, state
        return jax.tree.map(lambda u, p, m: u if m == 0.0 else u + (weight_decay * m) * p.astype(u.dtype),
                            updates, params, tree), state

    return optax.GradientTransformation(init, update)


def make_optimizer(params, *, lr: float, steps: int, warmup_steps: int = 0, schedule: str = "cosine",
                   min_lr_ratio: float = 0.1, decay_steps: int = 0, weight_decay: float = 0.0, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8, clip_norm: float = 1.0, lr_multipliers: Multipliers = None,
                   wd_multipliers: Multipliers = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule) for a parameter pytree (arrays or ShapeDtypeStructs; only paths are read).

    lr_multipliers default to 1 everywhere; wd_multipliers default to DEFAULT_WD_RULES.
    clip_norm <= 0 disables clipping.
    """
    sched = make_schedule(lr, steps, warmup_steps, schedule, min_lr_ratio, decay_steps)
    lr_tree = multiplier_tree(params, lr_multipliers)
    wd_tree = multiplier_tree(params, wd_multipliers, DEFAULT_WD_RULES)
    parts = []
    if clip_norm and clip_norm > 0:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts += [
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        _decayed_weights(weight_decay, wd_tree),
        _scale_by_tree(lr_tree),
        optax.scale_by_learning_rate(sched),
    ]
    return optax.chain(*parts), sched


def make_optimizer_from_config(params, train_cfg, steps: int | None = None, lr_multipliers: Multipliers = None,
                               wd_multipliers: Multipliers = None):
    """make_optimizer with the fields of the config's `train` section; lr_multipliers / wd_multipliers, when
    given, take the place of its lr_mults / wd_mults. Raises ConfigError for a config rule that applies to
    no parameter."""
    t = train_cfg
    if lr_multipliers is None:
        lr_multipliers = list(t.lr_mults)
        check_rules(params, lr_multipliers, "config.train.lr_mults")
    if wd_multipliers is None:
        wd_multipliers = list(t.wd_mults)
        check_rules(params, wd_multipliers, "config.train.wd_mults")
    return make_optimizer(params, lr=t.lr, steps=t.steps if steps is None else steps, warmup_steps=t.warmup_steps,
                          schedule=t.schedule, min_lr_ratio=t.min_lr_ratio, decay_steps=t.decay_steps,
                          weight_decay=t.weight_decay, b1=t.b1, b2=t.b2, eps=t.eps, clip_norm=t.clip_norm,
                          lr_multipliers=lr_multipliers, wd_multipliers=wd_multipliers)


def global_norm(tree) -> jax.Array:
    return optax.global_norm(tree)


def applied_count(opt_state) -> jax.Array:
    """Number of updates the optimizer has applied (the schedule position)."""
    for leaf in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)):
        if isinstance(leaf, optax.ScaleByAdamState):
            return leaf.count
    raise ValueError("optimizer state holds no Adam state")


__all__ = ["DEFAULT_WD_RULES", "SCHEDULES", "check_rules", "describe_rules", "rule_coverage", "make_schedule",
           "make_optimizer", "make_optimizer_from_config", "multiplier_tree", "applied_count", "global_norm"]
