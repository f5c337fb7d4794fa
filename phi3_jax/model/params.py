"""Flat views of a model's parameters: {("layers", "mlp", "down_proj", "kernel"): array}."""
from __future__ import annotations

from typing import Any

import jax
from flax import nnx


def flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """{path tuple of str: leaf} of a nested dict (keys converted with str)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    """The nested dict of a {path tuple: leaf} mapping; inverse of `flatten`."""
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def flat_params(model: nnx.Module) -> dict[tuple[str, ...], jax.Array]:
    return flatten(nnx.state(model, nnx.Param).to_pure_dict())


def param_shapes(model: nnx.Module) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in flat_params(model).items()}


def set_params(model: nnx.Module, flat: dict[tuple[str, ...], jax.Array]) -> None:
    """Replaces every parameter; the set of paths must match exactly."""
    state = nnx.state(model, nnx.Param)
    have = set(flatten(state.to_pure_dict()))
    if have != set(flat):
        raise KeyError(f"parameter paths differ: missing {sorted(have - set(flat))[:3]}, "
                       f"extra {sorted(set(flat) - have)[:3]}")
    nnx.replace_by_pure_dict(state, unflatten(flat))
    nnx.update(model, state)
