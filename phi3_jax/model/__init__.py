"""Model definition: config, presets, layers, the decoder."""
from phi3_jax.model.cache import KVCache, init_cache
from phi3_jax.model.config import ConfigError, ModelConfig
from phi3_jax.model.decoder import Decoder, abstract_model, init_model
from phi3_jax.model.hf_config import from_hf_config, to_hf_config
from phi3_jax.model.presets import PRESETS, get_preset
from phi3_jax.model import phi3small  # noqa: F401,E402  registers the phi-3-small presets and config.json reader

__all__ = ["ConfigError", "ModelConfig", "Decoder", "abstract_model", "init_model", "from_hf_config",
           "to_hf_config", "PRESETS", "get_preset", "KVCache", "init_cache"]
