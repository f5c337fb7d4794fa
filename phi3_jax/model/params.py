"""Flat views of a model's parameters: {("layers", "mlp", "down_proj", "kernel"): array}."""
from __future__ import annotations

import jax
from flax import nnx


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (str(k),))
        else:
            yield prefix + (str(k),), v


def _unflatten(flat):
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def flat_params(model: nnx.Module) -> dict[tuple[str, ...], jax.Array]:
    return dict(_flatten(nnx.state(model, nnx.Param).to_pure_dict()))


def param_shapes(model: nnx.Module) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in flat_params(model).items()}


def set_params(model: nnx.Module, flat: dict[tuple[str, ...], jax.Array]) -> None:
    """Replaces every parameter; the set of paths must match exactly."""
    state = nnx.state(model, nnx.Param)
    have = set(dict(_flatten(state.to_pure_dict())))
    if have != set(flat):
        raise KeyError(f"parameter paths differ: missing {sorted(have - set(flat))[:3]}, "
                       f"extra {sorted(set(flat) - have)[:3]}")
    nnx.replace_by_pure_dict(state, _unflatten(flat))
    nnx.update(model, state)
