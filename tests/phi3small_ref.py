"""A float64 numpy phi-3-small written only from spec/phi3-family.md (§3.2, §4, §5.2, §7.2, §8.2).

Independent of phi3_jax: it reads a `phi3small` config.json dict and checkpoint tensors by their
Hugging Face names. Keyword switches revert one of the spec §11 traps each, so that tests can show the
model differs from the reverted reference while it matches the correct one.
"""
from __future__ import annotations

import math

import numpy as np

F32_MIN = float(np.finfo(np.float32).min)

# Spec §8.2 logit mask, written out from the list there (not from the model code).
DUMMY_IDS_100352 = [100256, 100258, 100259, 100260, 100264, 100265] + list(range(100267, 100352))


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def rope_cos_sin(hf, head_dim, seq_len):
    """cos, sin [T, head_dim] (spec §4) for positions 0..T-1; LongRoPE picks factors by T vs L0."""
    theta = float(hf.get("rope_embedding_base", 1e6))
    k = np.arange(head_dim // 2, dtype=np.float64)
    f, m = np.ones(head_dim // 2), 1.0
    rs = hf.get("rope_scaling")
    if rs:
        l0, max_pos = rs["original_max_position_embeddings"], hf["max_position_embeddings"]
        if seq_len > l0:
            f = np.asarray(rs["long_factor"], np.float64)
            lm = rs.get("long_mscale")
            m = lm if lm and lm > 0 else math.sqrt(1 + math.log(max_pos / l0) / math.log(l0))
        else:
            f = np.asarray(rs["short_factor"], np.float64)
            sm = rs.get("short_mscale")
            m = sm if sm and sm > 0 else 1.0
    inv = 1.0 / (f * theta ** (2 * k / head_dim))
    ang = np.arange(seq_len, dtype=np.float64)[:, None] * inv
    ang = np.concatenate([ang, ang], -1)
    return np.cos(ang) * m, np.sin(ang) * m


def rope(x_TNH, cos, sin):
    half = x_TNH.shape[-1] // 2
    rot = np.concatenate([-x_TNH[..., half:], x_TNH[..., :half]], -1)
    return x_TNH * cos[:, None] + rot * sin[:, None]


def sparse_mask(hf, n_heads, seq_len, head_offsets="global"):
    """bool [heads, T, T], spec §5.2. head_offsets="global" is the spec; "kv" uses the kv-head index
    (trap: heads sharing a kv head get one pattern); "none" gives every head head 0's pattern."""
    B, L, V = hf["blocksparse_block_size"], hf["blocksparse_num_local_blocks"], hf["blocksparse_vert_stride"]
    homo = hf.get("blocksparse_homo_head_pattern", False)
    s = 0 if homo else max(1, V // n_heads)
    h = np.arange(n_heads)
    if head_offsets == "kv":
        h = h // (n_heads // hf["num_key_value_heads"])
    elif head_offsets == "none":
        h = np.zeros_like(h)
    pos = np.arange(seq_len)
    qb, kb = pos[:, None] // B, pos[None, :] // B
    causal = pos[None, :] <= pos[:, None]
    local = (qb - kb) < L
    vert = ((kb[None] + h[:, None, None] * s + 1) % V) == 0
    return causal[None] & (local[None] | vert)


def forward(hf, tensors, ids, *, scale="mup", qkv="grouped", mlp="interleaved", head_offsets="global",
            dense_layers="odd", divide_logits=True, mask_dummy=True, embed_mult=True, plus_one=True,
            dummy=None):
    """float64 logits [T, vocab] for one sequence at positions 0..T-1 (no cache).

    dummy: ids to mask; default spec §8.2's 91 ids when vocab_size is 100352, else none.
    """
    t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    D, nH, nKV = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"]
    hd, L, eps = D // nH, hf["num_hidden_layers"], hf.get("layer_norm_epsilon", 1e-5)
    T = len(ids)
    E = t["model.embed_tokens.weight"]
    h = E[ids] * (hf.get("mup_embedding_multiplier", 10.0) if embed_mult else 1.0)
    cos, sin = rope_cos_sin(hf, hd, T)
    causal = np.tril(np.ones((T, T), bool))[None]
    sparse = sparse_mask(hf, nH, T, head_offsets)
    n = hf.get("dense_attention_every_n_layers", 2)
    limit = hf.get("gegelu_limit", 20.0)
    for layer in range(L):
        p = f"model.layers.{layer}."
        a = layer_norm(h, t[p + "input_layernorm.weight"], t[p + "input_layernorm.bias"], eps)
        z = a @ t[p + "self_attn.query_key_value.weight"].T + t[p + "self_attn.query_key_value.bias"]
        if qkv == "grouped":  # spec §7.2: per kv group g, [q_{4g}..q_{4g+3}, k_g, v_g]
            z = z.reshape(T, nKV, nH // nKV + 2, hd)
            q, k, v = z[:, :, :-2].reshape(T, nH, hd), z[:, :, -2], z[:, :, -1]
        else:  # trap: the phi3 [Q | K | V] order
            q = z[:, : nH * hd].reshape(T, nH, hd)
            k = z[:, nH * hd:(nH + nKV) * hd].reshape(T, nKV, hd)
            v = z[:, (nH + nKV) * hd:].reshape(T, nKV, hd)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        rep = nH // nKV
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)  # query head i reads kv head i // rep
        mup = scale == "mup" and hf.get("mup_use_scaling", True)
        sc = hf.get("mup_attn_multiplier", 1.0) / hd if mup else hd ** -0.5
        s = np.einsum("tnh,snh->nts", q, k) * sc
        dense = (layer + 1) % n == 0 if dense_layers == "odd" else layer % n == 0
        s = np.where(causal if dense else sparse, s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("nts,snh->tnh", s, v).reshape(T, nH * hd)
        h = h + o @ t[p + "self_attn.dense.weight"].T + t[p + "self_attn.dense.bias"]
        m = layer_norm(h, t[p + "post_attention_layernorm.weight"], t[p + "post_attention_layernorm.bias"], eps)
        z = m @ t[p + "mlp.up_proj.weight"].T + t[p + "mlp.up_proj.bias"]
        if mlp == "interleaved":  # even features: gelu branch, odd: linear branch
            g, lin = z[:, 0::2], z[:, 1::2]
        else:  # trap: [gate | up] halves as in phi3
            g, lin = np.split(z, 2, axis=-1)
        g = np.minimum(g, limit)
        lin = np.clip(lin, -limit, limit)
        y = g / (1 + np.exp(-1.702 * g)) * (lin + (1.0 if plus_one else 0.0))
        h = h + y @ t[p + "mlp.down_proj.weight"].T + t[p + "mlp.down_proj.bias"]
    hf_ = layer_norm(h, t["model.final_layernorm.weight"], t["model.final_layernorm.bias"], eps)
    head = t["lm_head.weight"] if "lm_head.weight" in t else E
    logits = hf_ @ head.T
    if divide_logits:
        logits = logits / hf.get("mup_width_multiplier", 8.0)
    if dummy is None:
        dummy = DUMMY_IDS_100352 if hf["vocab_size"] == 100352 else []
    if mask_dummy and len(dummy):
        logits[:, list(dummy)] = F32_MIN
    return logits
