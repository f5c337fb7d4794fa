"""Presets for each released variant (spec §2) and tiny CPU variants for tests and local runs.

The 128k presets declare LongRoPE but carry no factor lists: those differ between checkpoint revisions
(spec §2.1), so they come from the checkpoint's config.json when it is imported. Such a preset can be
counted, sharded and compiled; running it needs the factors (see layers.rope_tables).
"""
from __future__ import annotations

from phi3_jax.model.config import ConfigError, ModelConfig, longrope_mscale

_MINI = dict(family="phi3", vocab_size=32064, hidden_size=3072, num_layers=32, num_heads=32,
             num_kv_heads=32, head_dim=96, intermediate_size=8192, param_dtype="bfloat16", dtype="bfloat16")
_MEDIUM = dict(_MINI, hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=10, head_dim=128,
               intermediate_size=17920)
_LONG = dict(max_position_embeddings=131072, original_max_position_embeddings=4096, rope_scaling="longrope",
             rope_short_mscale=longrope_mscale(131072, 4096), rope_long_mscale=longrope_mscale(131072, 4096))

PRESETS: dict[str, dict] = {
    "phi-3-mini-4k": dict(_MINI, max_position_embeddings=4096, sliding_window=2047),
    "phi-3-mini-128k": dict(_MINI, **_LONG, sliding_window=262144),
    "phi-3.5-mini": dict(_MINI, **_LONG, sliding_window=262144),
    "phi-3-medium-4k": dict(_MEDIUM, max_position_embeddings=4096, sliding_window=2047),
    "phi-3-medium-128k": dict(_MEDIUM, **_LONG, sliding_window=131072),
    # Tiny variants: same code paths, CPU-sized.
    "phi-3-tiny": dict(family="phi3", vocab_size=512, hidden_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=32, intermediate_size=256, max_position_embeddings=2048,
                       original_max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def register_preset(name: str, fields: dict) -> None:
    """Adds a preset (used by family modules that define their own, e.g. phi-3-small)."""
    PRESETS[name] = dict(fields)
