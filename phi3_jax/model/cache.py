"""Key/value cache for incremental decoding.

One pytree for the whole model: keys and values of every layer stacked like the parameters ([L, B, S, K,
H], S the capacity), and per row the number of tokens already written. A forward call with a cache
writes its T new tokens' keys and values at rows [length, length + T) and attends over the whole cache
with positions as the mask: causality hides the slots not written yet, so rows of one batch may hold
prompts of different lengths.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from phi3_jax.model.config import ModelConfig
from phi3_jax.model.layers import dtype_of


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k_LBSKH: jax.Array
    v_LBSKH: jax.Array
    lengths_B: jax.Array  # int32: tokens already in the cache, per row

    @property
    def capacity(self) -> int:
        return self.k_LBSKH.shape[2]


def init_cache(cfg: ModelConfig, batch: int, capacity: int, dtype=None) -> KVCache:
    """An empty cache for `batch` rows of up to `capacity` tokens (dtype: the model's compute dtype)."""
    shape = (cfg.num_layers, batch, capacity, cfg.num_kv_heads, cfg.head_dim)
    dtype = dtype_of(dtype or cfg.dtype)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


def write(cache_BSKH, new_BTKH, lengths_B):
    """cache with `new` written at rows [length, length + T) of each batch row."""
    return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), i, axis=0))(
        cache_BSKH, new_BTKH, lengths_B)
