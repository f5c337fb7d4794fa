"""Tensor-name and layout table between phi3_jax parameters and Hugging Face checkpoints (spec §7).

Each family keeps the checkpoint's fused layouts (qkv, gate/up), so every tensor maps by a name and at
most a transpose: import then export is bit-identical. Checks are strict: a missing, unexpected or
mis-shaped tensor stops the conversion with its checkpoint name.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from phi3_jax.model.config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint does not hold the tensors the model config asks for; the message names the tensor."""


@dataclasses.dataclass(frozen=True)
class Entry:
    path: tuple[str, ...]  # parameter path in the model state
    hf: str  # checkpoint name; "{i}" marks a per-layer tensor stacked on the layer axis
    transpose: bool = False  # torch Linear weight [out, in] <-> kernel [in, out]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


def _linear(path: tuple[str, ...], hf: str, bias: bool) -> list[Entry]:
    out = [Entry(path + ("kernel",), hf + ".weight", transpose=True)]
    if bias:
        out.append(Entry(path + ("bias",), hf + ".bias"))
    return out


def _norm(path: tuple[str, ...], hf: str, bias: bool) -> list[Entry]:
    out = [Entry(path + ("scale",), hf + ".weight")]
    if bias:
        out.append(Entry(path + ("bias",), hf + ".bias"))
    return out


# Internal module -> checkpoint module, per family.
_NAMES = {
    "phi3": dict(qkv="self_attn.qkv_proj", o="self_attn.o_proj", gate_up="mlp.gate_up_proj",
                 down="mlp.down_proj", final_norm="model.norm"),
    "phi3small": dict(qkv="self_attn.query_key_value", o="self_attn.dense", gate_up="mlp.up_proj",
                      down="mlp.down_proj", final_norm="model.final_layernorm"),
}

# Checkpoint tensors that carry no parameters (recomputed buffers) and are skipped on import.
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def weight_table(cfg: ModelConfig) -> list[Entry]:
    n, b, layer = _NAMES[cfg.family], cfg.has_bias, "model.layers.{i}."
    norm_bias = cfg.norm_type == "layer"
    table = [Entry(("embed_tokens", "embedding"), "model.embed_tokens.weight")]
    table += _norm(("layers", "input_layernorm"), layer + "input_layernorm", norm_bias)
    table += _linear(("layers", "self_attn", "qkv_proj"), layer + n["qkv"], b)
    table += _linear(("layers", "self_attn", "o_proj"), layer + n["o"], b)
    table += _norm(("layers", "post_attention_layernorm"), layer + "post_attention_layernorm", norm_bias)
    table += _linear(("layers", "mlp", "gate_up_proj"), layer + n["gate_up"], b)
    table += _linear(("layers", "mlp", "down_proj"), layer + n["down"], b)
    table += _norm(("norm",), n["final_norm"], norm_bias)
    if not cfg.tie_embeddings:
        table += _linear(("lm_head",), "lm_head", False)
    return table


def expected_hf_shapes(cfg: ModelConfig, model_shapes: dict[tuple[str, ...], tuple[int, ...]]):
    """{checkpoint name: shape} from the model's parameter shapes."""
    out = {}
    for e in weight_table(cfg):
        shape = model_shapes[e.path]
        if e.per_layer:
            shape = shape[1:]
        if e.transpose:
            shape = shape[::-1]
        names = [e.hf.format(i=i) for i in range(cfg.num_layers)] if e.per_layer else [e.hf]
        for name in names:
            out[name] = tuple(shape)
    return out


def params_from_hf(cfg: ModelConfig, get_tensor, names: set[str],
                   model_shapes: dict[tuple[str, ...], tuple[int, ...]]) -> dict[tuple[str, ...], np.ndarray]:
    """Reads checkpoint tensors into {parameter path: array}.

    get_tensor(name) -> np.ndarray; names: every tensor the checkpoint holds. Fails before reading
    anything if a tensor is missing or unexpected, and on the first mis-shaped tensor.
    """
    expected = expected_hf_shapes(cfg, model_shapes)
    missing = sorted(set(expected) - names)
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s) the {cfg.family} config needs, "
                              f"e.g. {missing[:3]}")
    # A tied checkpoint may still carry the lm_head copy; transformers ties it on load, so do the same.
    ignored = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unexpected = sorted(n for n in names - set(expected) - ignored if not IGNORED.match(n))
    if unexpected:
        raise CheckpointError(f"checkpoint holds {len(unexpected)} tensor(s) the {cfg.family} config does not "
                              f"use, e.g. {unexpected[:3]} (is it a checkpoint of another model?)")
    params = {}
    for e in weight_table(cfg):
        names_e = [e.hf.format(i=i) for i in range(cfg.num_layers)] if e.per_layer else [e.hf]
        arrays = []
        for name in names_e:
            a = get_tensor(name)
            if tuple(a.shape) != expected[name]:
                raise CheckpointError(f"tensor {name!r} has shape {tuple(a.shape)}, the config needs "
                                      f"{expected[name]}")
            arrays.append(a.T if e.transpose else a)
        params[e.path] = np.stack(arrays) if e.per_layer else arrays[0]
    return params


def params_to_hf(cfg: ModelConfig, params: dict[tuple[str, ...], np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for e in weight_table(cfg):
        a = np.asarray(params[e.path])
        layers = [a[i] for i in range(cfg.num_layers)] if e.per_layer else [a]
        for i, t in enumerate(layers):
            out[e.hf.format(i=i)] = np.ascontiguousarray(t.T if e.transpose else t)
    return out
