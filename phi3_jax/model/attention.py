"""Self-attention block: fused qkv projection in the checkpoint's layout, RoPE, GQA, output projection."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from phi3_jax import sharding as shd
from phi3_jax.model import cache
from phi3_jax.model.config import ModelConfig
from phi3_jax.model.layers import Linear, apply_rope, fused_backward, qkv_rope, split_fused_qkv
from phi3_jax.ops import Mask, attention


def split_qkv(cfg: ModelConfig, qkv_BTF):
    """Fused projection -> q [B,T,N,H], k and v [B,T,K,H].

    phi3 stores [all q heads | all k heads | all v heads]; phi3small groups per kv head
    [q_{4g} .. q_{4g+3}, k_g, v_g] (spec §7.2), so query head 4g + j is slot j of group g.
    """
    B, T, _ = qkv_BTF.shape
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if cfg.family == "phi3small":
        z_BTKSH = qkv_BTF.reshape(B, T, K, cfg.q_per_kv + 2, H)
        q_BTNH = z_BTKSH[:, :, :, : cfg.q_per_kv].reshape(B, T, N, H)
        return q_BTNH, z_BTKSH[:, :, :, -2], z_BTKSH[:, :, :, -1]
    return split_fused_qkv(qkv_BTF, (N, K, H))  # GPUs take layers.qkv_rope, the same split with RoPE


def window_bound(cfg: ModelConfig) -> int | None:
    """Largest visible distance i - j, from the sliding window and its convention."""
    if cfg.sliding_window is None:
        return None
    return cfg.sliding_window if cfg.sliding_window_mode == "flash" else cfg.sliding_window - 1


def qkv_split(cfg: ModelConfig) -> tuple[tuple[int, int, int], int]:
    """The fused [q | k | v] kernel's pieces, and into how many device slices tensor parallelism cuts each
    (1: no split; phi-3-small's groups [q.. k v] per kv head already keep each device's heads together)."""
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    return (N * H, K * H, K * H), 1 if cfg.family == "phi3small" else shd.even_shards("activation_heads", (N, K))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        D = cfg.hidden_size
        self.qkv_proj = Linear(D, cfg.qkv_features, bias=cfg.has_bias, cfg=cfg, rngs=rngs)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, D, bias=cfg.has_bias, cfg=cfg, rngs=rngs)

    def __call__(self, x_BTD, cos_BTH, sin_BTH, *, segment_ids_BT=None, layout=None, impl: str = "auto",
                 kv_cache=None, regrouped: bool = False):
        """Self-attention output [B, T, D]; with `kv_cache` = (k_LBSKH, v_LBSKH, layer, lengths_B, positions_BT)
        (every layer's cache stacked), the new keys and values are written into this layer's slots first
        and (output, (k_LBSKH, v_LBSKH)) is returned. positions_BT None: a prefill into an empty cache,
        where the new tokens attend among themselves. `regrouped`: see `Linear.split`."""
        cfg = self.cfg
        N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        B, T = x_BTD.shape[:2]
        sizes, shards = qkv_split(cfg)
        if shards > 1:  # tensor parallelism: each device projects onto its own heads of q, k and v
            q_BTF, k_BTF, v_BTF = self.qkv_proj.split(x_BTD, sizes, shards, "activation_heads", regrouped)
            q_BTNH, k_BTKH = q_BTF.reshape(B, T, N, H), k_BTF.reshape(B, T, K, H)
            v_BTKH = v_BTF.reshape(B, T, K, H)
            q_BTNH, k_BTKH = apply_rope(q_BTNH, cos_BTH, sin_BTH), apply_rope(k_BTKH, cos_BTH, sin_BTH)
        elif cfg.family != "phi3small" and fused_backward():
            qkv_BTF = self.qkv_proj(x_BTD)
            q_BTNH, k_BTKH, v_BTKH = qkv_rope(qkv_BTF, cos_BTH, sin_BTH, (cfg.num_heads, cfg.num_kv_heads,
                                                                       cfg.head_dim))
        else:
            q_BTNH, k_BTKH, v_BTKH = split_qkv(cfg, self.qkv_proj(x_BTD))
            q_BTNH, k_BTKH = apply_rope(q_BTNH, cos_BTH, sin_BTH), apply_rope(k_BTKH, cos_BTH, sin_BTH)
        q_BTNH = shd.constrain(q_BTNH, shd.ACT_BTNH)
        k_BTKH = shd.constrain(k_BTKH, shd.ACT_BTKH)
        v_BTKH = shd.constrain(v_BTKH, shd.ACT_BTKH)
        window = None if layout is not None else window_bound(cfg)
        if kv_cache is None:
            mask = Mask(q_segment_ids=segment_ids_BT, causal=True, window=window, layout=layout)
        else:
            k_LBSKH, v_LBSKH, layer, lengths_B, positions_BT = kv_cache
            k_LBSKH = cache.write_layer(k_LBSKH, k_BTKH, layer, lengths_B)
            v_LBSKH = cache.write_layer(v_LBSKH, v_BTKH, layer, lengths_B)
            if positions_BT is None:
                mask = Mask(causal=True, window=window, layout=layout)
            else:
                k_BTKH, v_BTKH = cache.layer_of(k_LBSKH, layer), cache.layer_of(v_LBSKH, layer)
                # Cache slot s holds position s (kv_index None); slots past a row's last written token lie
                # after its queries, so causality hides them.
                mask = Mask(q_index=positions_BT, causal=True, window=window, layout=layout)
        o_BTNH = attention(q_BTNH, k_BTKH, v_BTKH, mask, scale=cfg.attn_scale, impl=impl)
        o_BTNH = shd.constrain(o_BTNH, shd.ACT_BTNH)
        out_BTD = self.o_proj(o_BTNH.reshape(B, T, N * H))
        return out_BTD if kv_cache is None else (out_BTD, (k_LBSKH, v_LBSKH))
