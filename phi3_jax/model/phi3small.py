"""Phi-3-small: presets, tiny CPU variants and the Hugging Face `phi3small` config.json mapping.

The architecture itself (LayerNorm with bias, biased linears, grouped qkv, the interleaved "gegelu" MLP,
muP multipliers, tied embeddings, alternating block-sparse / dense attention) lives in the shared decoder
and is switched on by `family="phi3small"` (spec §3.2, §5). This module only says which numbers the
released checkpoints use and how their config.json reads and writes.

Importing this module registers the presets (`presets.register_preset`) and the config reader / writer
(`hf_config.FROM_HF["phi3small"]`, `hf_config.TO_HF["phi3small"]`); `phi3_jax.model` imports it.
"""
from __future__ import annotations

from typing import Any

from phi3_jax.model.config import ConfigError, ModelConfig, longrope_mscale
from phi3_jax.model.hf_config import FROM_HF, TO_HF, check_fields
from phi3_jax.model.presets import register_preset

VOCAB_SIZE = 100352
ENDOFTEXT_ID = 100257

# Spec §8.2: the 91 ids the remote model masks in its logits ("dummy_token_indices" of the tokenizer):
# the unused cl100k slot 100256, the three FIM specials, the placeholders 100264-100265 and everything
# from 100267 to the end of the 100352-row vocabulary (100276 <|endofprompt|> included).
DUMMY_TOKEN_IDS: tuple[int, ...] = (100256, 100258, 100259, 100260, 100264, 100265) + tuple(range(100267, VOCAB_SIZE))
assert len(DUMMY_TOKEN_IDS) == 91

# Released Phi-3-small-8k / -128k (spec §2.2); bfloat16 checkpoints.
_SMALL = dict(
    family="phi3small", vocab_size=VOCAB_SIZE, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
    head_dim=128, intermediate_size=14336, norm_eps=1e-5, tie_embeddings=True, rope_theta=1e6,
    max_position_embeddings=8192, original_max_position_embeddings=8192,
    embedding_multiplier=10.0, attn_scale_multiplier=1.0, logit_divisor=8.0, gegelu_limit=20.0,
    dummy_token_ids=DUMMY_TOKEN_IDS, blocksparse_block_size=64, blocksparse_local_blocks=16,
    blocksparse_vert_stride=8, blocksparse_homo_head=False, dense_attention_every_n_layers=2,
    bos_token_id=ENDOFTEXT_ID, eos_token_id=ENDOFTEXT_ID, pad_token_id=None,
    embd_dropout=0.1, resid_attn_dropout=0.0, resid_mlp_dropout=0.1,  # released training config (training only)
    param_dtype="bfloat16", dtype="bfloat16",
)
# The 128k factor lists differ per checkpoint revision: they come from the checkpoint's config.json.
# Magnitude factors follow the remote positional_embedding.py rules (spec §4): short 1.0 unless the
# config gives short_mscale, long sqrt(1 + ln(max/L0)/ln(L0)) unless it gives long_mscale.
_SMALL_128K = dict(_SMALL, max_position_embeddings=131072, original_max_position_embeddings=8192,
                   rope_scaling="longrope", rope_short_mscale=1.0,
                   rope_long_mscale=longrope_mscale(131072, 8192))

# Tiny variants: every phi-3-small code path (grouped qkv with 2 q heads per kv head, gegelu, muP
# multipliers, tied head, sparse/dense alternation with sparsity from token 4 * 16 = 64 on) at CPU size.
_TINY = dict(
    _SMALL, vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
    intermediate_size=256, max_position_embeddings=1024, original_max_position_embeddings=1024,
    dummy_token_ids=(), blocksparse_block_size=16, blocksparse_local_blocks=4, blocksparse_vert_stride=2,
    bos_token_id=1, eos_token_id=1, pad_token_id=0, param_dtype="float32", dtype="float32",
)
_TINY_LONG = dict(
    _TINY, max_position_embeddings=2048, original_max_position_embeddings=256, rope_scaling="longrope",
    rope_short_factor=tuple(1.0 + 0.05 * k for k in range(16)),
    rope_long_factor=tuple(1.0 + 0.5 * k for k in range(16)),
    rope_short_mscale=1.0, rope_long_mscale=longrope_mscale(2048, 256),
)

PRESETS = {
    "phi-3-small-8k": _SMALL,
    "phi-3-small-128k": _SMALL_128K,
    "phi-3-small-tiny": _TINY,
    "phi-3-small-tiny-long": _TINY_LONG,
}
for _name, _fields in PRESETS.items():
    register_preset(_name, _fields)


# --------------------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------------------

# Every field of Phi3SmallConfig (remote configuration_phi3_small.py) with its default there.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 100352, "max_position_embeddings": 8192, "rope_embedding_base": 1e6,
    "rope_position_scale": 1.0, "rope_scaling": None, "hidden_size": 4096, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "gegelu", "gegelu_limit": 20.0,
    "gegelu_pad_to_256": True, "ff_dim_multiplier": None, "ff_intermediate_size": 14336,
    "blocksparse_homo_head_pattern": False, "blocksparse_block_size": 64, "blocksparse_num_local_blocks": 16,
    "blocksparse_vert_stride": 8, "blocksparse_triton_kernel_block_size": 64,
    "dense_attention_every_n_layers": 2, "embedding_dropout_prob": 0.1, "attention_dropout_prob": 0.0,
    "ffn_dropout_prob": 0.1, "layer_norm_epsilon": 1e-5, "mup_use_scaling": True, "mup_width_multiplier": 8.0,
    "mup_embedding_multiplier": 10.0, "mup_attn_multiplier": 1.0, "bos_token_id": 100257,
    "eos_token_id": 100257, "reorder_and_upcast_attn": False, "pad_sequence_to_multiple_of_64": True,
}
# PretrainedConfig fields the released configs carry beside those: `tie_word_embeddings` (absent there,
# default true) and `attention_bias` (false there, ignored by the remote code: the biases ARE present).
_EXTRA = {"tie_word_embeddings", "attention_bias", "pad_token_id"}
_KNOWN = set(_DEFAULTS) | _EXTRA
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
_ROPE_KEYS = {"type", "rope_type", "short_factor", "long_factor", "original_max_position_embeddings",
              "short_mscale", "long_mscale"}


def _err(field: str, why: str) -> ConfigError:
    return ConfigError(f"config.json: {field}={why}")


def _intermediate_size(hf: dict) -> int:
    """ff_intermediate_size, or ff_dim_multiplier * (hidden // 3) * 2 padded to 256 (Phi3SmallConfig)."""
    # As in Phi3SmallConfig, an absent ff_intermediate_size is 14336, so a multiplier needs it set to null.
    size, mult = hf.get("ff_intermediate_size", 14336), hf.get("ff_dim_multiplier")
    if size is None and mult is None:
        raise ConfigError("config.json: one of ff_intermediate_size / ff_dim_multiplier must be set")
    if size is not None and mult is not None:
        raise ConfigError(f"config.json: ff_intermediate_size={size} and ff_dim_multiplier={mult} are both set; "
                          "Phi3SmallConfig accepts only one")
    if size is not None:
        return int(size)
    size = int(mult) * (int(hf["hidden_size"]) // 3) * 2
    if hf.get("gegelu_pad_to_256", True):
        size = -(-size // 256) * 256
    return size


def _rope(hf: dict, max_pos: int, head_dim: int) -> dict[str, Any]:
    rs = hf.get("rope_scaling")
    if not rs:
        return dict(original_max_position_embeddings=max_pos)
    if not isinstance(rs, dict):
        raise _err("rope_scaling", f"{rs!r}: must be null or a dict")
    unknown = sorted(set(rs) - _ROPE_KEYS)
    if unknown:
        raise ConfigError(f"config.json: rope_scaling has unknown key(s) {unknown}; known: {sorted(_ROPE_KEYS)}")
    kind = rs.get("rope_type", rs.get("type", "su"))
    if kind not in ("su", "longrope"):
        raise _err("rope_scaling.type", f"{kind!r}: phi3small supports only LongRoPE ('su' / 'longrope')")
    for key in ("short_factor", "long_factor", "original_max_position_embeddings"):
        if rs.get(key) is None:
            raise ConfigError(f"config.json: rope_scaling is LongRoPE but has no {key!r}")
    l0 = int(rs["original_max_position_embeddings"])
    short, long_ = tuple(float(x) for x in rs["short_factor"]), tuple(float(x) for x in rs["long_factor"])
    for key, f in (("short_factor", short), ("long_factor", long_)):
        if len(f) != head_dim // 2:
            raise _err(f"rope_scaling.{key}", f"<{len(f)} entries>: must have head_dim/2 = {head_dim // 2}")
    # Remote positional_embedding.py: a given mscale is used if > 0; otherwise short 1.0, long sqrt formula.
    sm, lm = rs.get("short_mscale"), rs.get("long_mscale")
    short_m = float(sm) if sm is not None and sm > 0 else 1.0
    long_m = float(lm) if lm is not None and lm > 0 else longrope_mscale(max_pos, l0)
    return dict(rope_scaling="longrope", original_max_position_embeddings=l0, rope_short_factor=short,
                rope_long_factor=long_, rope_short_mscale=short_m, rope_long_mscale=long_m)


def phi3small_from_hf(hf: dict[str, Any]) -> ModelConfig:
    check_fields(hf, _KNOWN, tuple(_REQUIRED), "phi3small")
    get = lambda k: hf.get(k, _DEFAULTS.get(k))  # noqa: E731  (absent field: the Phi3SmallConfig default)

    if get("hidden_act") != "gegelu":
        raise _err("hidden_act", f"{get('hidden_act')!r}: the phi3small model supports only 'gegelu'")
    if get("gegelu_limit") is None:
        raise _err("gegelu_limit", "null: an unclamped gegelu is not supported; set a number (released: 20.0)")
    if float(get("rope_position_scale")) != 1.0:
        raise _err("rope_position_scale", f"{get('rope_position_scale')!r}: only 1.0 (the released value) is "
                   "supported")
    for key in ("embedding_dropout_prob", "attention_dropout_prob", "ffn_dropout_prob"):
        p = get(key)  # training-only dropout
        if p is None or isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
            raise _err(key, f"{p!r}: must be a probability in [0, 1)")
    if get("attention_dropout_prob"):
        raise _err("attention_dropout_prob", f"{get('attention_dropout_prob')!r}: dropout on attention "
                   "probabilities is not implemented (released: 0.0)")
    for key in ("reorder_and_upcast_attn", "pad_sequence_to_multiple_of_64", "gegelu_pad_to_256",
                "blocksparse_homo_head_pattern", "mup_use_scaling"):
        if not isinstance(get(key), bool):
            raise _err(key, f"{get(key)!r}: must be true or false")
    hidden, heads, layers = int(hf["hidden_size"]), int(hf["num_attention_heads"]), int(hf["num_hidden_layers"])
    if hidden % heads:
        raise _err("hidden_size", f"{hidden}: must be a multiple of num_attention_heads={heads}")
    head_dim = hidden // heads
    n_dense = get("dense_attention_every_n_layers")
    if not n_dense:
        raise _err("dense_attention_every_n_layers", f"{n_dense!r}: the remote model then makes every layer "
                   "block-sparse, which phi3_jax does not support (released: 2)")
    if layers % int(n_dense):
        raise _err("dense_attention_every_n_layers", f"{n_dense}: must divide num_hidden_layers={layers}")
    block, kernel_block = int(get("blocksparse_block_size")), int(get("blocksparse_triton_kernel_block_size"))
    # A kernel tile dividing the block gives the same token-level mask (the remote code Kronecker-expands
    # the block layout and re-applies causality, which token causality already implies); others differ.
    if kernel_block <= 0 or block % kernel_block:
        raise _err("blocksparse_triton_kernel_block_size", f"{kernel_block}: must divide "
                   f"blocksparse_block_size={block}")
    if "tie_word_embeddings" in hf and not isinstance(hf["tie_word_embeddings"], bool):
        raise _err("tie_word_embeddings", f"{hf['tie_word_embeddings']!r}: must be true or false")
    vocab = int(hf["vocab_size"])
    max_pos = int(get("max_position_embeddings"))
    emb_mult = get("mup_embedding_multiplier")
    width_mult = get("mup_width_multiplier")
    dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise _err("torch_dtype", f"{dtype!r}: must be one of float32, bfloat16, float16")
    eos = get("eos_token_id")
    return ModelConfig(
        family="phi3small", vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=int(hf["num_key_value_heads"]), head_dim=head_dim, intermediate_size=_intermediate_size(hf),
        norm_eps=float(get("layer_norm_epsilon")), tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        rope_theta=float(get("rope_embedding_base")), max_position_embeddings=max_pos,
        **_rope(hf, max_pos, head_dim),
        # Remote model: embeddings x multiplier if it is > 0; scores x mup_attn_multiplier / head_dim when
        # mup_use_scaling, else 1/sqrt(head_dim); logits / mup_width_multiplier if it is non-zero.
        embedding_multiplier=float(emb_mult) if emb_mult is not None and emb_mult > 0 else 1.0,
        attn_scale_multiplier=float(get("mup_attn_multiplier")) if get("mup_use_scaling") else None,
        logit_divisor=float(width_mult) if width_mult else 1.0,
        gegelu_limit=float(get("gegelu_limit")),
        # The remote model masks the tokenizer's dummy ids; they exist only in the 100352-row vocabulary.
        dummy_token_ids=DUMMY_TOKEN_IDS if vocab == VOCAB_SIZE else (),
        blocksparse_block_size=block, blocksparse_local_blocks=int(get("blocksparse_num_local_blocks")),
        blocksparse_vert_stride=int(get("blocksparse_vert_stride")),
        blocksparse_homo_head=bool(get("blocksparse_homo_head_pattern")),
        dense_attention_every_n_layers=int(n_dense),
        bos_token_id=get("bos_token_id"), eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"), initializer_range=float(hf.get("initializer_range", 0.02)),
        embd_dropout=float(get("embedding_dropout_prob")), resid_mlp_dropout=float(get("ffn_dropout_prob")),
        param_dtype=dtype, dtype=dtype,
    )


def phi3small_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json the remote Phi3SmallConfig loads and `phi3small_from_hf` reads back to `cfg`."""
    if cfg.hidden_size != cfg.num_heads * cfg.head_dim:
        raise ConfigError(f"ModelConfig.head_dim={cfg.head_dim}: the phi3small layout needs hidden_size = "
                          f"num_heads * head_dim = {cfg.num_heads * cfg.head_dim}")
    if cfg.dense_attention_every_n_layers == 0:
        raise ConfigError("ModelConfig.dense_attention_every_n_layers=0: phi3small config.json has no "
                          "all-dense setting (0 / null there means all layers block-sparse)")
    if cfg.dummy_token_ids not in ((), DUMMY_TOKEN_IDS) or bool(cfg.dummy_token_ids) != (cfg.vocab_size == VOCAB_SIZE):
        raise ConfigError("ModelConfig.dummy_token_ids: config.json cannot express them; the remote model masks "
                          f"the tokenizer's 91 dummy ids exactly when vocab_size={VOCAB_SIZE}")
    if cfg.embedding_multiplier <= 0:
        raise ConfigError("ModelConfig.embedding_multiplier must be positive for the phi3small layout")
    if cfg.resid_attn_dropout:
        raise ConfigError(f"ModelConfig.resid_attn_dropout={cfg.resid_attn_dropout}: the phi3small layout has no "
                          "dropout on the attention output (ffn_dropout_prob is the MLP's)")
    hf: dict[str, Any] = {
        "architectures": ["Phi3SmallForCausalLM"], "model_type": "phi3small",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "ff_intermediate_size": cfg.intermediate_size, "ff_dim_multiplier": None, "gegelu_pad_to_256": True,
        "hidden_act": "gegelu", "gegelu_limit": cfg.gegelu_limit, "layer_norm_epsilon": cfg.norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings, "rope_embedding_base": cfg.rope_theta,
        "rope_position_scale": 1.0, "rope_scaling": None,
        "dense_attention_every_n_layers": cfg.dense_attention_every_n_layers,
        "blocksparse_block_size": cfg.blocksparse_block_size,
        "blocksparse_triton_kernel_block_size": cfg.blocksparse_block_size,
        "blocksparse_num_local_blocks": cfg.blocksparse_local_blocks,
        "blocksparse_vert_stride": cfg.blocksparse_vert_stride,
        "blocksparse_homo_head_pattern": cfg.blocksparse_homo_head,
        "mup_use_scaling": cfg.attn_scale_multiplier is not None,
        "mup_attn_multiplier": 1.0 if cfg.attn_scale_multiplier is None else cfg.attn_scale_multiplier,
        "mup_embedding_multiplier": cfg.embedding_multiplier, "mup_width_multiplier": cfg.logit_divisor,
        "embedding_dropout_prob": cfg.embd_dropout, "attention_dropout_prob": 0.0,
        "ffn_dropout_prob": cfg.resid_mlp_dropout,
        "pad_sequence_to_multiple_of_64": True, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
        "initializer_range": cfg.initializer_range, "use_cache": True, "torch_dtype": cfg.param_dtype,
    }
    if cfg.pad_token_id is not None:
        hf["pad_token_id"] = cfg.pad_token_id
    if cfg.rope_scaling == "longrope":
        hf["rope_scaling"] = {
            "type": "su", "short_factor": list(cfg.rope_short_factor), "long_factor": list(cfg.rope_long_factor),
            "original_max_position_embeddings": cfg.original_max_position_embeddings,
            "short_mscale": cfg.rope_short_mscale, "long_mscale": cfg.rope_long_mscale,
        }
    elif cfg.original_max_position_embeddings != cfg.max_position_embeddings:
        raise ConfigError("ModelConfig.original_max_position_embeddings: without LongRoPE the phi3small layout "
                          "has no such field; set it equal to max_position_embeddings")
    return hf


FROM_HF["phi3small"] = phi3small_from_hf
TO_HF["phi3small"] = phi3small_to_hf
