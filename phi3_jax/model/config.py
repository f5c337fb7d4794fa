"""ModelConfig: every hyperparameter of the Phi-3 families, presets, and Hugging Face config.json mapping.

One frozen dataclass describes every variant; the decoder reads only this. Derived figures (parameter
count, training FLOPs per token) live here so that MFU and the model card agree with the weights.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

FAMILIES = ("phi3", "phi3small")
DTYPES = ("float32", "bfloat16", "float16")
WINDOW_MODES = ("flash", "hf")


class ConfigError(ValueError):
    """A model configuration field is missing, unknown or out of range; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str = "phi3"
    vocab_size: int = 32064
    hidden_size: int = 3072
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 96
    intermediate_size: int = 8192
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    # RoPE / LongRoPE (spec §4). Factor lists have head_dim/2 entries; the mscales multiply cos and sin.
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    rope_scaling: str | None = None  # None or "longrope"
    rope_short_factor: tuple[float, ...] = ()
    rope_long_factor: tuple[float, ...] = ()
    rope_short_mscale: float = 1.0
    rope_long_mscale: float = 1.0
    # Sliding window W of the 4k checkpoints: "flash" sees keys with i - j <= W (W + 1 keys, what the
    # original training code used); "hf" sees i - j < W (W keys, transformers' eager/SDPA masks).
    sliding_window: int | None = None
    sliding_window_mode: str = "flash"
    # phi3small: muP multipliers, gegelu MLP, biases, alternating dense / block-sparse attention (spec §3.2, §5).
    embedding_multiplier: float = 1.0
    attn_scale_multiplier: float | None = None  # None: 1/sqrt(head_dim); else multiplier / head_dim (muP)
    logit_divisor: float = 1.0
    gegelu_limit: float = 20.0
    dummy_token_ids: tuple[int, ...] = ()
    blocksparse_block_size: int = 64
    blocksparse_local_blocks: int = 16
    blocksparse_vert_stride: int = 8
    blocksparse_homo_head: bool = False
    dense_attention_every_n_layers: int = 0  # 0: every layer dense; 2: layers 1, 3, ... dense, the rest sparse
    # Token ids the checkpoint declares.
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 32000
    pad_token_id: int | None = 32000
    initializer_range: float = 0.02
    # Training-only dropout (inactive in eval, sampling and export checks): on the scaled embeddings, and on
    # the attention and MLP outputs before each residual add (HF phi3: embd_pdrop, resid_pdrop for both;
    # phi3small: embedding_dropout_prob, ffn_dropout_prob on the MLP output only).
    embd_dropout: float = 0.0
    resid_attn_dropout: float = 0.0
    resid_mlp_dropout: float = 0.0
    # Numerics and execution.
    param_dtype: str = "float32"
    dtype: str = "float32"
    attention_impl: str = "auto"
    scan_layers: bool = True
    remat: str = "none"  # "none" | "full" | "dots" (save matmul outputs, recompute the rest)

    def __post_init__(self):
        validate(self)

    # ----- derived shapes -----
    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def qkv_features(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def has_bias(self) -> bool:
        return self.family == "phi3small"

    @property
    def norm_type(self) -> str:
        return "layer" if self.family == "phi3small" else "rms"

    @property
    def attn_scale(self) -> float:
        if self.attn_scale_multiplier is None:
            return self.head_dim ** -0.5
        return self.attn_scale_multiplier / self.head_dim

    def layer_is_sparse(self, layer: int) -> bool:
        n = self.dense_attention_every_n_layers
        return n > 0 and (layer + 1) % n != 0

    @property
    def has_dropout(self) -> bool:
        return any(r > 0 for r in (self.embd_dropout, self.resid_attn_dropout, self.resid_mlp_dropout))

    @property
    def layer_period(self) -> int:
        """Layers per scan step: the attention pattern repeats with this period."""
        return self.dense_attention_every_n_layers or 1

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(names)}")
        d = dict(d)
        for key in ("rope_short_factor", "rope_long_factor", "dummy_token_ids"):
            if key in d and d[key] is not None:
                d[key] = tuple(d[key])
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = tuple(d["eos_token_id"])
        return cls(**d)

    # ----- derived figures -----
    def param_counts(self) -> dict[str, int]:
        """Parameters per part, computed from the shapes the decoder creates."""
        D, I, L = self.hidden_size, self.intermediate_size, self.num_layers
        b = 1 if self.has_bias else 0
        norm = D * (2 if self.norm_type == "layer" else 1)
        attn = D * self.qkv_features + b * self.qkv_features + self.num_heads * self.head_dim * D + b * D
        mlp = D * 2 * I + b * 2 * I + I * D + b * D
        counts = {
            "embedding": self.vocab_size * D,
            "attention": L * attn,
            "mlp": L * mlp,
            "norms": (2 * L + 1) * norm,
            "lm_head": 0 if self.tie_embeddings else self.vocab_size * D,
        }
        counts["total"] = sum(counts.values())
        return counts

    def param_count(self) -> int:
        return self.param_counts()["total"]

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward) at a given sequence length.

        Matmul weights count 6 FLOPs per parameter; attention scores and the weighted sum count
        2 * 2 * head_dim * heads * (keys attended) in the forward pass, averaged over the positions of a
        causal sequence (window and block-sparse layouts cap the keys seen).
        """
        c = self.param_counts()
        matmul_params = c["attention"] + c["mlp"] + self.vocab_size * self.hidden_size
        mean_keys = 0.0
        for layer in range(self.num_layers):
            mean_keys += self._mean_keys_attended(seq_len, sparse=self.layer_is_sparse(layer))
        attn_fwd = 4 * self.num_heads * self.head_dim * mean_keys
        return 6.0 * matmul_params + 3.0 * attn_fwd

    def _mean_keys_attended(self, seq_len: int, sparse: bool) -> float:
        T = seq_len
        if sparse:
            # Local window of blocks plus one strided block in vert_stride (spec §5.3 asymptote).
            B, Lb, V = self.blocksparse_block_size, self.blocksparse_local_blocks, self.blocksparse_vert_stride
            keys = [min(i + 1, Lb * B) + max(0, i + 1 - Lb * B) / V for i in range(0, T, max(1, T // 256))]
            return sum(keys) / len(keys)
        if self.sliding_window is not None and self.sliding_window < T:
            W = self.sliding_window + (1 if self.sliding_window_mode == "flash" else 0)
            return (sum(min(i + 1, W) for i in range(T))) / T
        return (T + 1) / 2


def validate(cfg: ModelConfig) -> None:
    def fail(field: str, why: str):
        raise ConfigError(f"ModelConfig.{field}={getattr(cfg, field)!r}: {why}")

    if cfg.family not in FAMILIES:
        fail("family", f"must be one of {FAMILIES}")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "intermediate_size", "max_position_embeddings", "original_max_position_embeddings"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            fail(name, "must be a positive integer")
    if cfg.num_heads % cfg.num_kv_heads:
        fail("num_kv_heads", f"must divide num_heads={cfg.num_heads}")
    if cfg.head_dim % 2:
        fail("head_dim", "must be even (RoPE rotates pairs)")
    for name in ("param_dtype", "dtype"):
        if getattr(cfg, name) not in DTYPES:
            fail(name, f"must be one of {DTYPES}")
    if cfg.rope_scaling not in (None, "longrope"):
        fail("rope_scaling", "must be None or 'longrope'")
    half = cfg.head_dim // 2
    for name in ("rope_short_factor", "rope_long_factor"):
        factors = getattr(cfg, name)
        if cfg.rope_scaling == "longrope" and factors and len(factors) != half:
            fail(name, f"must have head_dim/2 = {half} entries, has {len(factors)}")
        if cfg.rope_scaling is None and factors:
            fail(name, "is set but rope_scaling is None")
    if cfg.rope_theta <= 0:
        fail("rope_theta", "must be positive")
    if cfg.sliding_window is not None and cfg.sliding_window <= 0:
        fail("sliding_window", "must be positive or None")
    if cfg.sliding_window_mode not in WINDOW_MODES:
        fail("sliding_window_mode", f"must be one of {WINDOW_MODES}")
    if cfg.remat not in ("none", "full", "dots"):
        fail("remat", "must be 'none', 'full' or 'dots'")
    if cfg.attention_impl not in ("auto", "xla", "cudnn", "pallas"):
        fail("attention_impl", "must be one of auto, xla, cudnn, pallas")
    n = cfg.dense_attention_every_n_layers
    if n < 0 or (n and cfg.num_layers % n):
        fail("dense_attention_every_n_layers", f"must be 0 or divide num_layers={cfg.num_layers}")
    if n and cfg.family != "phi3small":
        fail("dense_attention_every_n_layers", "block-sparse layers exist only in the phi3small family")
    if any(not 0 <= i < cfg.vocab_size for i in cfg.dummy_token_ids):
        fail("dummy_token_ids", f"ids must lie in [0, vocab_size={cfg.vocab_size})")
    if cfg.logit_divisor <= 0:
        fail("logit_divisor", "must be positive")
    for name in ("embd_dropout", "resid_attn_dropout", "resid_mlp_dropout"):
        rate = getattr(cfg, name)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            fail(name, "must be a probability in [0, 1)")


def longrope_mscale(max_position_embeddings: int, original_max_position_embeddings: int) -> float:
    """The LongRoPE magnitude factor sqrt(1 + ln(s) / ln(L0)), s = max / L0 (1 when s <= 1)."""
    s = max_position_embeddings / original_max_position_embeddings
    if s <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(s) / math.log(original_max_position_embeddings))
