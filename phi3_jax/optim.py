"""AdamW with warmup + cosine/linear decay, global-norm clipping and per-parameter multipliers.

The update for a parameter p with gradient g (after clipping) is

    p <- p - lr(t) * lr_mult(p) * (adam(g) + weight_decay * wd_mult(p) * p)

which with every multiplier 1 is exactly `optax.adamw` (decoupled weight decay scaled by the learning
rate, as in PyTorch's AdamW). `t` counts *applied* updates: a step skipped for a non-finite loss or
gradient leaves the optimizer state, and so the schedule position, unchanged.

Multipliers are the hook for muP's per-parameter learning rates and decay (`phi3_jax.train.run` takes
them as `lr_multipliers` / `wd_multipliers`): each is given as a
callable `path -> float` (path like "layers/self_attn/qkv_proj/kernel") or a list of (regex, value) pairs,
first match wins, default 1.0.

Default weight-decay multipliers (`DEFAULT_WD_RULES`): 0 for norm scales and biases (any path ending in
"scale" or "bias") and for the token embedding ("embed_tokens"); 1 for every matmul kernel, the untied
lm_head included. Decaying norms pulls them toward 0, not toward their init of 1, and decaying the
embedding shrinks rare tokens' rows for no benefit.

Gradient accumulation is not done here: the train step scans over microbatches inside one jit
(see `phi3_jax.train_state`), which keeps the optimizer a plain per-step transformation.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from phi3_jax.sharding import path_str

Multipliers = Callable[[str], float] | Sequence[tuple[str, float]] | None

DEFAULT_WD_RULES: list[tuple[str, float]] = [
    (r"(^|/)(scale|bias)$", 0.0),
    (r"(^|/)embed_tokens/", 0.0),
]


def make_schedule(lr: float, steps: int, warmup_steps: int, schedule: str = "cosine",
                  min_lr_ratio: float = 0.1) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over warmup_steps, then cosine or linear decay to lr * min_lr_ratio
    at `steps`; constant afterwards. schedule="constant" keeps `lr` after warmup."""
    warmup_steps = max(0, min(int(warmup_steps), int(steps)))
    decay_steps = max(1, int(steps) - warmup_steps)
    end = lr * min_lr_ratio
    if schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=min_lr_ratio)
    elif schedule == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    elif schedule == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"train.schedule={schedule!r}: must be 'cosine', 'linear' or 'constant'")
    if warmup_steps == 0:
        return decay
    warm = optax.linear_schedule(0.0, lr, warmup_steps)
    return optax.join_schedules([warm, decay], [warmup_steps])


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
                   min_lr_ratio: float = 0.1, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.95,
                   eps: float = 1e-8, clip_norm: float = 1.0, lr_multipliers: Multipliers = None,
                   wd_multipliers: Multipliers = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule) for a parameter pytree (arrays or ShapeDtypeStructs; only paths are read).

    lr_multipliers default to 1 everywhere; wd_multipliers default to DEFAULT_WD_RULES.
    clip_norm <= 0 disables clipping.
    """
    sched = make_schedule(lr, steps, warmup_steps, schedule, min_lr_ratio)
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
    """make_optimizer with the fields of the config's `train` section."""
    t = train_cfg
    return make_optimizer(params, lr=t.lr, steps=t.steps if steps is None else steps, warmup_steps=t.warmup_steps,
                          schedule=t.schedule, min_lr_ratio=t.min_lr_ratio, weight_decay=t.weight_decay,
                          b1=t.b1, b2=t.b2, eps=t.eps, clip_norm=t.clip_norm, lr_multipliers=lr_multipliers,
                          wd_multipliers=wd_multipliers)


def global_norm(tree) -> jax.Array:
    return optax.global_norm(tree)


def applied_count(opt_state) -> jax.Array:
    """Number of updates the optimizer has applied (the schedule position)."""
    for leaf in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)):
        if isinstance(leaf, optax.ScaleByAdamState):
            return leaf.count
    raise ValueError("optimizer state holds no Adam state")


__all__ = ["DEFAULT_WD_RULES", "make_schedule", "make_optimizer", "make_optimizer_from_config", "multiplier_tree",
           "applied_count", "global_norm"]
