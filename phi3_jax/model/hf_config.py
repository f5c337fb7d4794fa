"""Hugging Face config.json <-> ModelConfig.

The reader is strict: a field it does not understand would silently change the model, so unknown fields
and missing required fields stop with a message naming them. Both the released checkpoints' layout
(`rope_theta` + `rope_scaling`) and the transformers 5 layout (`rope_parameters`) are read; the released
layout is written, which every transformers version loads.
"""
from __future__ import annotations

from typing import Any, Callable

from phi3_jax.model.config import ConfigError, ModelConfig, longrope_mscale

# Fields any PretrainedConfig may carry that do not change the computation.
GENERIC_FIELDS = {
    "_name_or_path", "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version",
    "use_cache", "model_type", "output_attentions", "output_hidden_states", "return_dict", "id2label",
    "label2id", "problem_type", "is_encoder_decoder", "chunk_size_feed_forward", "tokenizer_class",
    "attention_dropout", "embd_pdrop", "resid_pdrop", "initializer_range", "quantization_config",
    "tf_legacy_loss", "use_bfloat16", "pruned_heads", "torchscript", "add_cross_attention",
}

_PHI3_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "original_max_position_embeddings",
    "rms_norm_eps", "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters",
    "partial_rotary_factor", "bos_token_id", "eos_token_id", "pad_token_id", "sliding_window",
    "attention_bias", "head_dim",
}
_PHI3_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def check_fields(hf: dict, known: set[str], required: tuple[str, ...], model_type: str) -> None:
    unknown = sorted(set(hf) - known - GENERIC_FIELDS)
    if unknown:
        raise ConfigError(f"config.json: unknown field(s) {unknown} for model_type {model_type!r}; "
                          "phi3_jax does not know what they change, so it will not guess")
    missing = [k for k in required if k not in hf]
    if missing:
        raise ConfigError(f"config.json: missing required field(s) {missing} for model_type {model_type!r}")


def _dtype_name(hf: dict) -> str:
    name = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    if name not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"config.json: torch_dtype {name!r} is not one of float32, bfloat16, float16")
    return name


def _rope_params(hf: dict) -> dict[str, Any]:
    """Normalises both rope layouts to one dict with rope_theta, type, factors, mscales, L0."""
    rp = dict(hf.get("rope_parameters") or {})
    rs = hf.get("rope_scaling")
    if rs:
        rp.update(rs)
    out = {
        "rope_theta": float(rp.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "type": rp.get("rope_type", rp.get("type", "default")) or "default",
        "partial_rotary_factor": float(rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))),
    }
    if out["type"] in ("su", "yarn"):  # transformers maps both names to longrope for Phi-3
        out["type"] = "longrope"
    if out["type"] not in ("default", "longrope"):
        raise ConfigError(f"config.json: rope_scaling type {out['type']!r} is not supported (default, longrope, su)")
    if out["partial_rotary_factor"] != 1.0:
        raise ConfigError("config.json: partial_rotary_factor must be 1.0 for the Phi-3 family")
    if out["type"] == "longrope":
        for key in ("short_factor", "long_factor"):
            if key not in rp:
                raise ConfigError(f"config.json: rope_scaling is longrope but has no {key!r}")
        out["short_factor"] = tuple(float(x) for x in rp["short_factor"])
        out["long_factor"] = tuple(float(x) for x in rp["long_factor"])
        for key in ("short_mscale", "long_mscale", "attention_factor", "factor"):
            if rp.get(key) is not None:
                out[key] = float(rp[key])
        if rp.get("original_max_position_embeddings") is not None:
            out["original_max_position_embeddings"] = int(rp["original_max_position_embeddings"])
    return out


def _phi3_from_hf(hf: dict) -> ModelConfig:
    check_fields(hf, _PHI3_FIELDS, _PHI3_REQUIRED, "phi3")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json: hidden_act {hf['hidden_act']!r}: the phi3 family uses 'silu'")
    if hf.get("attention_bias"):
        raise ConfigError("config.json: attention_bias=true is not part of the phi3 family")
    heads = int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or hf["hidden_size"] // heads)
    if head_dim * heads != hf["hidden_size"]:
        raise ConfigError("config.json: hidden_size must equal num_attention_heads * head_dim for phi3")
    rope = _rope_params(hf)
    max_pos = int(hf.get("max_position_embeddings", 4096))
    l0 = int(rope.get("original_max_position_embeddings", hf.get("original_max_position_embeddings", max_pos)))
    fields: dict[str, Any] = dict(
        family="phi3", vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=head_dim,
        intermediate_size=int(hf["intermediate_size"]), norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_theta=rope["rope_theta"],
        max_position_embeddings=max_pos, original_max_position_embeddings=l0,
        sliding_window=hf.get("sliding_window"), bos_token_id=hf.get("bos_token_id", 1),
        eos_token_id=_ids(hf.get("eos_token_id", 32000)), pad_token_id=hf.get("pad_token_id", 32000),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        embd_dropout=_rate(hf, "embd_pdrop"), resid_attn_dropout=_rate(hf, "resid_pdrop"),
        resid_mlp_dropout=_rate(hf, "resid_pdrop"),
        param_dtype=_dtype_name(hf), dtype=_dtype_name(hf),
    )
    if _rate(hf, "attention_dropout"):
        raise ConfigError(f"config.json: attention_dropout={hf['attention_dropout']!r}: dropout on attention "
                          "probabilities is not implemented (every released Phi-3 uses 0.0)")
    if rope["type"] == "longrope":
        # transformers: m = attention_factor if given, else sqrt(1 + ln(s)/ln(L0)) with s = factor or max/L0.
        m = rope.get("attention_factor")
        if m is None:
            s = rope.get("factor", max_pos / l0)
            m = longrope_mscale(int(round(s * l0)), l0) if s > 1 else 1.0
        fields.update(rope_scaling="longrope", rope_short_factor=rope["short_factor"],
                      rope_long_factor=rope["long_factor"], rope_short_mscale=m, rope_long_mscale=m)
    return ModelConfig(**fields)


def _rate(hf: dict, key: str) -> float:
    p = hf.get(key) or 0.0
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ConfigError(f"config.json: {key}={p!r}: must be a probability in [0, 1)")
    return float(p)


def _ids(x):
    return tuple(x) if isinstance(x, list) else x


def _phi3_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    hf: dict[str, Any] = {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_position_embeddings,
        "original_max_position_embeddings": cfg.original_max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta, "rope_scaling": None, "sliding_window": cfg.sliding_window,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": _list(cfg.eos_token_id),
        "pad_token_id": cfg.pad_token_id, "initializer_range": cfg.initializer_range,
        "attention_dropout": 0.0, "embd_pdrop": cfg.embd_dropout, "resid_pdrop": cfg.resid_mlp_dropout,
        "use_cache": True, "torch_dtype": cfg.param_dtype,
    }
    if cfg.resid_attn_dropout != cfg.resid_mlp_dropout:
        raise ConfigError(f"ModelConfig.resid_attn_dropout={cfg.resid_attn_dropout} differs from resid_mlp_dropout="
                          f"{cfg.resid_mlp_dropout}: a phi3 config.json has one resid_pdrop for both")
    if cfg.rope_scaling == "longrope":
        hf["rope_scaling"] = {"type": "longrope", "short_factor": list(cfg.rope_short_factor),
                              "long_factor": list(cfg.rope_long_factor)}
        if cfg.rope_short_mscale != longrope_mscale(cfg.max_position_embeddings,
                                                     cfg.original_max_position_embeddings):
            hf["rope_scaling"]["attention_factor"] = cfg.rope_short_mscale
    return hf


def _list(x):
    return list(x) if isinstance(x, tuple) else x


# model_type -> (reader, writer); family modules add their own entries.
FROM_HF: dict[str, Callable[[dict], ModelConfig]] = {"phi3": _phi3_from_hf}
TO_HF: dict[str, Callable[[ModelConfig], dict]] = {"phi3": _phi3_to_hf}


def from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type is None:
        raise ConfigError("config.json: missing required field 'model_type'")
    if model_type not in FROM_HF:
        raise ConfigError(f"config.json: model_type {model_type!r} is not supported; supported: {sorted(FROM_HF)}")
    return FROM_HF[model_type](hf)


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return TO_HF[cfg.family](cfg)
