"""Key/value cache for incremental decoding.

One pytree for the whole model: keys and values of every layer stacked like the parameters ([L, B, S, K,
H], S the capacity), and per row the number of tokens already written. A forward call with a cache
writes its T new tokens' keys and values at rows [length, length + T) and attends over the whole cache
with positions as the mask: causality hides the slots not written yet, so rows of one batch may hold
prompts of different lengths. The layers thread the stacked arrays through as a loop carry and write
only the new tokens into them (`write_layer`), so a decode step's cache traffic is the attention's read.
A cache fresh from `init_cache` is marked `empty`: the first call (the prefill) then attends among its
own tokens as plain causal self-attention (cuDNN / flash kernels, no [T, S] scores over the capacity)
and only writes them into the cache.
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
    # Nothing written yet in any row (static): a forward with this cache is a prefill from position 0.
    empty: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def capacity(self) -> int:
        return self.k_LBSKH.shape[2]


def init_cache(cfg: ModelConfig, batch: int, capacity: int, dtype=None) -> KVCache:
    """An empty cache for `batch` rows of up to `capacity` tokens (dtype: the model's compute dtype)."""
    shape = (cfg.num_layers, batch, capacity, cfg.num_kv_heads, cfg.head_dim)
    dtype = dtype_of(dtype or cfg.dtype)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32), empty=True)


def write_layer(cache_LBSKH, new_BTKH, layer, lengths_B):
    """The stacked cache with `new` written at rows [length, length + T) of layer `layer` in each batch row.

    Only the T new tokens are written: threaded through the layer loop as a carry (and donated by the
    caller), the cache is updated in place rather than copied whole for every layer and token."""
    B, T = new_BTKH.shape[:2]
    rows_B1 = jnp.arange(B)[:, None]
    slots_BT = lengths_B[:, None] + jnp.arange(T)
    # One scatter on the stacked array (a vmap over rows would transpose the whole cache to batch it).
    return cache_LBSKH.at[layer, rows_B1, slots_BT].set(new_BTKH.astype(cache_LBSKH.dtype), mode="drop")


def layer_of(cache_LBSKH, layer):
    """[B, S, K, H]: one layer of the stacked cache."""
    return jax.lax.dynamic_index_in_dim(cache_LBSKH, layer, axis=0, keepdims=False)
