"""attention(q, k, v, mask, impl=...): the one attention entry point every model layer calls.

Implementations:
- "xla": plain JAX, runs anywhere: `reference_attention`'s values with a hand-written backward pass
  (`xla_attention`); `reference_attention` under autodiff is what every path is tested against.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, dense layouts); packed documents
  (segment ids) through cuDNN's packed layout, one sequence per document (`segment_runs`).
- "pallas": the block-sparse Pallas kernels of `pallas_kernels.blocksparse` for block-sparse masks (their
  TPU decode kernel for one-token steps against a KV cache: q_index set, kv_index None), and
  JAX's splash-attention kernels (`ops/splash.py`) for dense causal self-attention on TPU where the
  sequence is a multiple of 128 (on a CPU host the TPU kernels run in Pallas' interpreter, for tests);
  other dense masks take cuDNN on GPU, else XLA.
- "auto": on GPU cuDNN for dense masks, Pallas for block-sparse masks where the Mosaic GPU kernels take
  the inputs (bf16/f16, head_dim 64 or 128, 64-token blocks); on TPU the Pallas kernels (splash for
  dense masks it supports); XLA otherwise.

Shapes: q [B, T, N, H], k and v [B, S, K, H] with K dividing N (grouped-query attention: query head n
reads kv head n // (N // K)). The mask is described, not materialised: a causal flag, an optional window,
segment ids for packed documents, and an optional block-sparse layout; each implementation turns the
description into whatever it needs.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from phi3_jax.ops import splash

IMPLS = ("auto", "xla", "cudnn", "pallas")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mask:
    """Which keys each query may see.

    q_index / kv_index: token index within the row ([B, T] / [B, S] or [T] / [S]); default arange. Causality,
      the window and the block-sparse layout are defined on these indices (for a KV cache, q_index is the
      absolute position of the new tokens).
    q_segment_ids / kv_segment_ids: packed documents; a query sees only keys of its own segment. Documents
      are contiguous runs of one id (as the packer writes them): cuDNN's packed layout takes each run as
      one document.
    window: a key at distance q_index - kv_index > window is hidden.
    layout: a `pallas_kernels.blocksparse.Layout`; its per-head pattern is applied on top.
    """
    q_index: Any = None
    kv_index: Any = None
    q_segment_ids: Any = None
    kv_segment_ids: Any = None
    causal: bool = dataclasses.field(default=True, metadata=dict(static=True))
    window: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    layout: Any = dataclasses.field(default=None, metadata=dict(static=True))


def attention(q_BTNH, k_BSKH, v_BSKH, mask: Mask | None = None, *, scale: float | None = None,
              impl: str = "auto"):
    """Softmax attention; returns [B, T, N, H] in q's dtype. Softmax runs in float32."""
    mask = mask or Mask()
    N, K = q_BTNH.shape[2], k_BSKH.shape[2]
    if N % K:
        raise ValueError(f"attention: {N} query heads are not a multiple of {K} kv heads")
    if impl not in IMPLS:
        raise ValueError(f"attention: impl={impl!r} is not one of {IMPLS}")
    scale = q_BTNH.shape[-1] ** -0.5 if scale is None else scale
    if impl == "auto":
        impl = _auto_impl(q_BTNH, k_BSKH, mask)
    if impl == "pallas" and mask.layout is not None and _is_cache_decode(q_BTNH, mask):
        return _pallas_decode(q_BTNH, k_BSKH, v_BSKH, mask, scale)
    if impl == "pallas" and mask.layout is not None:
        return _pallas_blocksparse(q_BTNH, k_BSKH, v_BSKH, mask, scale)
    if impl == "pallas":
        if _kernel_backend()[0] == "tpu" and splash.supports(q_BTNH, k_BSKH, mask):
            return _pallas_splash(q_BTNH, k_BSKH, v_BSKH, mask, scale)
        impl = "cudnn" if _cudnn_ok(q_BTNH, mask) else "xla"
    if impl == "cudnn":
        return _cudnn(q_BTNH, k_BSKH, v_BSKH, mask, scale)
    return xla_attention(q_BTNH, k_BSKH, v_BSKH, mask, scale)


def _auto_impl(q_BTNH, k_BSKH, mask: Mask) -> str:
    backend = jax.default_backend()
    if mask.layout is not None:
        if _is_cache_decode(q_BTNH, mask):
            return "pallas" if backend == "tpu" else "xla"
        return "pallas" if _is_self_attention(mask) and _blocksparse_kernel_ok(q_BTNH, mask, backend) else "xla"
    if backend == "tpu" and splash.supports(q_BTNH, k_BSKH, mask):
        return "pallas"
    return "cudnn" if _cudnn_ok(q_BTNH, mask) else "xla"


def _blocksparse_kernel_ok(q_BTNH, mask: Mask, backend: str) -> bool:
    if backend == "tpu":
        return True
    if backend == "gpu":  # the Mosaic GPU kernels take bf16/f16 and head_dim 64/128 only
        from pallas_kernels.blocksparse import gpu

        return gpu.supports(q_BTNH.dtype, q_BTNH.shape[-1], mask.layout)
    return False


def _kernel_backend() -> tuple[str, bool]:
    """(pallas_kernels backend, interpret) on this platform; without an accelerator the TPU kernel runs in
    Pallas' interpreter."""
    platform = jax.default_backend()
    return (platform, False) if platform in ("gpu", "tpu") else ("tpu", True)


def _is_cache_decode(q_BTNH, mask: Mask) -> bool:
    """One new token per row against a KV cache whose slot s holds position s (the decode kernel's case)."""
    return (q_BTNH.shape[1] == 1 and mask.q_index is not None and mask.kv_index is None and mask.causal
            and mask.window is None and mask.q_segment_ids is None and mask.kv_segment_ids is None)


def _is_self_attention(mask: Mask) -> bool:
    return mask.q_index is None and mask.kv_index is None


def _cudnn_ok(q_BTNH, mask: Mask) -> bool:
    return (jax.default_backend() == "gpu" and q_BTNH.dtype in (jnp.bfloat16, jnp.float16)
            and mask.layout is None and _is_self_attention(mask) and q_BTNH.shape[-1] % 8 == 0)


def _index(idx, length: int, batch: int):
    if idx is None:
        idx = jnp.arange(length, dtype=jnp.int32)
    idx = jnp.asarray(idx, jnp.int32)
    return jnp.broadcast_to(idx, (batch, length)) if idx.ndim == 1 else idx


def dense_mask(mask: Mask, batch: int, q_len: int, kv_len: int, num_heads: int):
    """Boolean [B, N or 1, T, S]: True where query t may see key s."""
    q_BT = _index(mask.q_index, q_len, batch)
    k_BS = _index(mask.kv_index, kv_len, batch)
    allowed_BTS = jnp.ones((batch, q_len, kv_len), bool)
    dist_BTS = q_BT[:, :, None] - k_BS[:, None, :]
    if mask.causal:
        allowed_BTS &= dist_BTS >= 0
    if mask.window is not None:
        allowed_BTS &= dist_BTS <= mask.window
    if mask.q_segment_ids is not None:
        kv_seg = mask.kv_segment_ids if mask.kv_segment_ids is not None else mask.q_segment_ids
        allowed_BTS &= mask.q_segment_ids[:, :, None] == kv_seg[:, None, :]
    allowed_BNTS = allowed_BTS[:, None]
    if mask.layout is not None:
        if mask.layout.num_heads != num_heads:
            raise ValueError(f"attention: layout has {mask.layout.num_heads} heads, q has {num_heads}")
        layout_BNTS = jax.vmap(mask.layout.token_mask)(q_BT, k_BS)
        allowed_BNTS = allowed_BNTS & layout_BNTS
    return allowed_BNTS


def reference_attention(q_BTNH, k_BSKH, v_BSKH, mask: Mask, scale: float):
    """Softmax attention as written, differentiated by autodiff: the reference every path is tested against."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    _, p_BKGTS, l_BKGT1 = _unnormalised_softmax(_masked_scores(q_BTNH.reshape(B, T, K, N // K, H), k_BSKH,
                                                               mask, scale))
    o_BTKGH = jnp.einsum("bkgts,bskh->btkgh", (p_BKGTS / l_BKGT1).astype(v_BSKH.dtype), v_BSKH,
                         preferred_element_type=jnp.float32)
    return o_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)


# One query a row (a decode step): products and sums over the keys, kept in the cache's [B, S, K, ...]
# order, not batched matmuls. XLA:CPU transposes every layer's [B, S, K, H] cache to batch its matmul by
# (B, K), a pass that costs more than the product (an 8-layer width-512 model at batch 4, cache of 8192
# slots: 463 -> 150-170 ms a token); on GPUs XLA compiles either form to reductions over the cache.
def _one_query_fwd(q_B1NH, k_BSKH, v_BSKH, mask: Mask, scale: float):
    """_xla_attention_fwd's (output [B, 1, N, H], logsumexp [B, K, G, 1, 1]) for one query a row."""
    B, _, N, H = q_B1NH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // K
    q_B1KGH = q_B1NH.reshape(B, 1, K, G, H).astype(jnp.float32)
    s_BSKG = jnp.sum(q_B1KGH * k_BSKH[:, :, :, None].astype(jnp.float32), -1) * scale
    allowed_BNS = dense_mask(mask, B, 1, S, N)[:, :, 0]
    allowed_BSKG = jnp.moveaxis(allowed_BNS, 1, 2).reshape(B, S, -1, 1 if allowed_BNS.shape[1] == 1 else G)
    m_B1KG, p_BSKG, l_B1KG = _unnormalised_softmax(jnp.where(allowed_BSKG, s_BSKG, -jnp.inf), axis=1)
    pv_BSKG = p_BSKG.astype(v_BSKH.dtype).astype(jnp.float32)
    o_B1KGH = jnp.sum(pv_BSKG[..., None] * v_BSKH[:, :, :, None].astype(jnp.float32), 1, keepdims=True)
    o_B1NH = (o_B1KGH / l_B1KG[..., None]).reshape(B, 1, N, H).astype(q_B1NH.dtype)
    lse_BKG11 = (m_B1KG + jnp.log(l_B1KG))[:, 0, :, :, None, None]
    return o_B1NH, lse_BKG11


def _masked_scores(q_BTKGH, k_BSKH, mask: Mask, scale: float):
    """float32 scores q.k * scale, -inf where the mask hides the key: [B, K, G, T, S]."""
    B, T, K, G, _ = q_BTKGH.shape
    S = k_BSKH.shape[1]
    s_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * scale
    allowed_BNTS = dense_mask(mask, B, T, S, K * G)
    allowed_BKGTS = allowed_BNTS.reshape(B, -1, 1 if allowed_BNTS.shape[1] == 1 else G, T, S)
    return jnp.where(allowed_BKGTS, s_BKGTS, -jnp.inf)


def _unnormalised_softmax(s_BKGTS, axis: int = -1):
    """(row max m, exp(s - m), row sum l) in float32 over the keys' `axis`; a query with no visible key
    gets m = 0 and zeros (divided by l >= 1e-30), not NaN."""
    m_BKGT1 = jnp.max(s_BKGTS, axis=axis, keepdims=True)
    m_BKGT1 = jnp.where(jnp.isfinite(m_BKGT1), m_BKGT1, 0.0)
    p_BKGTS = jnp.exp(s_BKGTS - m_BKGT1)
    return m_BKGT1, p_BKGTS, jnp.maximum(jnp.sum(p_BKGTS, axis=axis, keepdims=True), 1e-30)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def xla_attention(q_BTNH, k_BSKH, v_BSKH, mask: Mask, scale: float):
    """reference_attention's values with a hand-written backward pass: it keeps only the output and the
    rows' logsumexp and recomputes the probabilities, where autodiff of the reference keeps several
    [B, N, T, S] float32 tensors (mask select, exponentials, probabilities) and walks each back in its own
    pass. The plain-XLA path is what CPUs train with."""
    return _xla_attention_fwd(q_BTNH, k_BSKH, v_BSKH, mask, scale)[0]


def _xla_attention_fwd(q_BTNH, k_BSKH, v_BSKH, mask: Mask, scale: float):
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    if T == 1:
        o_BTNH, lse_BKGT1 = _one_query_fwd(q_BTNH, k_BSKH, v_BSKH, mask, scale)
        return o_BTNH, (q_BTNH, k_BSKH, v_BSKH, mask, o_BTNH, lse_BKGT1)
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    m_BKGT1, p_BKGTS, l_BKGT1 = _unnormalised_softmax(_masked_scores(q_BTKGH, k_BSKH, mask, scale))
    # Normalising the [T, H] output instead of the [T, S] probabilities saves a pass over the scores.
    o_BTKGH = jnp.einsum("bkgts,bskh->btkgh", p_BKGTS.astype(v_BSKH.dtype), v_BSKH,
                         preferred_element_type=jnp.float32)
    o_BTKGH = o_BTKGH / jnp.moveaxis(l_BKGT1, 3, 1)
    o_BTNH = o_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)
    lse_BKGT1 = m_BKGT1 + jnp.log(l_BKGT1)
    return o_BTNH, (q_BTNH, k_BSKH, v_BSKH, mask, o_BTNH, lse_BKGT1)


def _xla_attention_bwd(scale: float, res, do_BTNH):
    q_BTNH, k_BSKH, v_BSKH, mask, o_BTNH, lse_BKGT1 = res
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    G = N // K
    q_BTKGH = q_BTNH.reshape(B, T, K, G, H)
    do_BTKGH = do_BTNH.reshape(B, T, K, G, H)
    p_BKGTS = jnp.exp(_masked_scores(q_BTKGH, k_BSKH, mask, scale) - lse_BKGT1)  # hidden keys: exactly 0
    dv_BSKH = jnp.einsum("bkgts,btkgh->bskh", p_BKGTS.astype(do_BTNH.dtype), do_BTKGH,
                         preferred_element_type=jnp.float32)
    dp_BKGTS = jnp.einsum("btkgh,bskh->bkgts", do_BTKGH, v_BSKH, preferred_element_type=jnp.float32)
    # sum_s p_ts dp_ts = do_t . o_t: the softmax backward's row term without a pass over [T, S].
    delta_BKGT = jnp.einsum("btkgh,btkgh->bkgt", do_BTKGH.astype(jnp.float32),
                            o_BTNH.reshape(B, T, K, G, H).astype(jnp.float32))
    ds_BKGTS = p_BKGTS * (dp_BKGTS - delta_BKGT[..., None])
    dq_BTKGH = jnp.einsum("bkgts,bskh->btkgh", ds_BKGTS.astype(q_BTNH.dtype), k_BSKH,
                          preferred_element_type=jnp.float32) * scale
    dk_BSKH = jnp.einsum("bkgts,btkgh->bskh", ds_BKGTS.astype(q_BTNH.dtype), q_BTKGH,
                         preferred_element_type=jnp.float32) * scale
    return (dq_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype), dk_BSKH.astype(k_BSKH.dtype),
            dv_BSKH.astype(v_BSKH.dtype), None)


xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


# Rows with at most this many documents take cuDNN's packed layout; a batch with a row holding more takes a
# dense [B, 1, T, S] segment mask (both are compiled; `lax.cond` picks one per step). The packed kernels
# keep float32 softmax statistics for [B * M, N, T] (M slots per row), so M sets their residual memory:
# at 16, a quarter of the bf16 [B, 1, T, T] mask's for 32 heads at T = 4096. 0 turns the packed layout off.
CUDNN_MAX_SEGMENTS = 16


def segment_runs(segment_ids_BT, max_segments: int):
    """cuDNN's packed ("ragged") description of rows of contiguous documents, each document a run of equal
    segment ids: (lengths [B, M], starts [B, M + 1], fits) with M = max_segments; entries past a row's
    last run are -1, and `fits` says whether every row has at most M runs (else the runs past M are left
    out and the description is incomplete)."""
    B, T = segment_ids_BT.shape
    new_BT = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    run_BT = jnp.cumsum(new_BT, axis=1, dtype=jnp.int32) - 1
    runs_B = run_BT[:, -1] + 1
    lengths_BM = jnp.zeros((B, max_segments), jnp.int32).at[jnp.arange(B)[:, None], run_BT].add(1, mode="drop")
    starts_BM = jnp.cumsum(lengths_BM, axis=1, dtype=jnp.int32) - lengths_BM
    used_BM = jnp.arange(max_segments)[None] < runs_B[:, None]
    starts_BM1 = jnp.concatenate([jnp.where(used_BM, starts_BM, -1), jnp.full((B, 1), -1, jnp.int32)], axis=1)
    return jnp.where(used_BM, lengths_BM, -1), starts_BM1, jnp.all(runs_B <= max_segments)


def _cudnn(q_BTNH, k_BSKH, v_BSKH, mask: Mask, scale: float):
    window = None if mask.window is None else (mask.window, 0)

    def dense(q_BTNH, k_BSKH, v_BSKH, q_seg_BT=None, kv_seg_BS=None):
        seg_mask = None if q_seg_BT is None else (q_seg_BT[:, :, None] == kv_seg_BS[:, None, :])[:, None]
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=seg_mask, scale=scale,
                                            is_causal=mask.causal, local_window_size=window,
                                            implementation="cudnn")

    if mask.q_segment_ids is None:
        return dense(q_BTNH, k_BSKH, v_BSKH)
    kv_seg = mask.kv_segment_ids if mask.kv_segment_ids is not None else mask.q_segment_ids
    if mask.kv_segment_ids is not None or q_BTNH.shape[1] != k_BSKH.shape[1] or CUDNN_MAX_SEGMENTS < 1:
        return dense(q_BTNH, k_BSKH, v_BSKH, mask.q_segment_ids, kv_seg)
    # Packed documents: cuDNN's packed layout runs each document as its own sequence (causality and the
    # window restart at its first token, as positions do), where a [B, 1, T, S] mask costs a pass over
    # it and computes every tile of the row's causal triangle.
    lengths_BM, starts_BM1, fits = segment_runs(mask.q_segment_ids, CUDNN_MAX_SEGMENTS)

    def packed(q_BTNH, k_BSKH, v_BSKH, q_seg_BT, kv_seg_BS):
        return _cudnn_packed(q_BTNH, k_BSKH, v_BSKH, lengths_BM, starts_BM1, mask.causal, mask.window, scale)

    # The fallback recomputes its forward pass for the backward one: its [B, 1, T, S] mask is then no
    # residual that the packed branch would have to write zeros for at every step.
    return jax.lax.cond(fits, packed, jax.checkpoint(dense), q_BTNH, k_BSKH, v_BSKH, mask.q_segment_ids, kv_seg)


def _cudnn_packed(q_BTNH, k_BSKH, v_BSKH, lengths_BM, starts_BM1, causal: bool, window: int | None, scale: float):
    # jax.nn.dot_product_attention does not take segment offsets; its cuDNN back-end does.
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa

    mask_type = cudnn_fa.MaskType.PADDING_CAUSAL if causal else cudnn_fa.MaskType.PADDING
    return cudnn_fa.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, q_seqlen=lengths_BM, kv_seqlen=lengths_BM, q_offsets=starts_BM1,
        kv_offsets=starts_BM1, scale=scale, mask_type=mask_type, qkv_layout="BTNH",
        sliding_window_length=None if window is None else window + 1)


def _pallas_blocksparse(q_BTNH, k_BSKH, v_BSKH, mask: Mask, scale: float):
    from pallas_kernels.blocksparse import blocksparse_attention

    if mask.window is not None or not mask.causal:
        raise ValueError("attention: block-sparse kernels are causal and take no window")
    from phi3_jax.sharding import batch_parallel, head_shards

    backend, interpret = _kernel_backend()
    # A tensor-parallel mesh keeps heads split around the kernel where every slice of heads has the same
    # patterns (the kernels index patterns by local head); otherwise each device gathers all heads.
    local_layout = mask.layout.shard(head_shards(q_BTNH, k_BSKH, v_BSKH))

    def kernel(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=None):
        return blocksparse_attention(q_BTNH, k_BSKH, v_BSKH, layout=local_layout or mask.layout, sm_scale=scale,
                                     segment_ids=segment_ids_BT, backend=backend, interpret=interpret)

    # Mosaic kernels cannot be partitioned by XLA: on a mesh each device runs the kernel on its own rows.
    segments = () if mask.q_segment_ids is None else (mask.q_segment_ids,)
    return batch_parallel(kernel, q_BTNH, k_BSKH, v_BSKH, *segments, split_heads=local_layout is not None)


def _pallas_splash(q_BTNH, k_BSKH, v_BSKH, mask: Mask, scale: float):
    from phi3_jax.sharding import batch_parallel

    _, interpret = _kernel_backend()

    def kernel(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=None):
        m = dataclasses.replace(mask, q_segment_ids=segment_ids_BT)
        return splash.attention(q_BTNH, k_BSKH, v_BSKH, m, scale, interpret=interpret)

    segments = () if mask.q_segment_ids is None else (mask.q_segment_ids,)
    # Every head has the same mask, so a tensor-parallel mesh keeps its heads split around the kernel.
    return batch_parallel(kernel, q_BTNH, k_BSKH, v_BSKH, *segments, split_heads=True)


def _pallas_decode(q_BTNH, k_BSKH, v_BSKH, mask: Mask, scale: float):
    """The block-sparse decode kernel: reads only the cache blocks the heads' patterns need."""
    from pallas_kernels.blocksparse.decode import blocksparse_decode
    from phi3_jax.sharding import batch_parallel

    backend, interpret = _kernel_backend()
    if backend != "tpu":
        raise ValueError("attention: the block-sparse decode kernel runs on TPU (or interpreted on CPU); "
                         "use impl='xla' on GPU")

    def kernel(q_BTNH, k_BSKH, v_BSKH, positions_BT):
        o_BNH = blocksparse_decode(q_BTNH[:, 0], k_BSKH, v_BSKH, positions_BT[:, 0] + 1, layout=mask.layout,
                                   sm_scale=scale, backend="tpu", interpret=interpret)
        return o_BNH[:, None].astype(q_BTNH.dtype)

    positions_BT = jnp.broadcast_to(jnp.asarray(mask.q_index, jnp.int32), q_BTNH.shape[:2])
    return batch_parallel(kernel, q_BTNH, k_BSKH, v_BSKH, positions_BT)
