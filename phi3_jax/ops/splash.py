"""Dense causal attention on TPU through JAX's splash-attention kernels (Pallas Mosaic TPU).

Splash never materialises the [T, S] scores (XLA attention keeps them for the backward pass), so the
dense layers of a long-sequence training step need memory linear in T. GQA runs the MQA form of the
kernel once per kv head (vmapped), the batch is vmapped too; segment ids restrict attention to a packed
document; a window uses splash's LocalMask (keys q - window .. q, the `Mask.window` convention).

Splash tiles the sequence, so it takes self-attention with T a multiple of 128; `supports` says whether
a call qualifies and callers fall back to XLA otherwise (short prompts, generation).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_BLOCKS = (512, 256, 128)  # largest that divides T is used for every kernel tile


def supports(q_BTNH, k_BSKH, mask) -> bool:
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    return (mask.causal and mask.layout is None and mask.q_index is None and mask.kv_index is None
            and mask.kv_segment_ids is None and T == S and T % _BLOCKS[-1] == 0)


@functools.lru_cache(maxsize=32)
def _kernel(seq: int, group: int, window: int | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if window is None:
        one_head = sm.CausalMask((seq, seq))
    else:
        one_head = sm.LocalMask((seq, seq), window_size=(window, 0), offset=0)
    b = next(b for b in _BLOCKS if seq % b == 0)
    blocks = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                           block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    # The kernel keeps its mask tables as arrays and is cached across traces: build them concretely even
    # when first called inside a trace (e.g. a shard_map body), so no tracer is cached.
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mqa_single_device(sm.MultiHeadMask([one_head] * group), block_sizes=blocks,
                                                interpret=interpret)


def attention(q_BTNH, k_BSKH, v_BSKH, mask, scale: float, *, interpret: bool = False):
    """Softmax attention of `mask` (see `supports`) with the splash kernels; returns [B, T, N, H]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    kernel = _kernel(T, N // K, mask.window, bool(interpret))
    # Splash takes heads first and no scale argument: q is scaled before the kernel.
    q_BKGTH = (q_BTNH * jnp.asarray(scale, q_BTNH.dtype)).reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
    k_BKSH, v_BKSH = (x.transpose(0, 2, 1, 3) for x in (k_BSKH, v_BSKH))

    def one_row(q_KGTH, k_KSH, v_KSH, seg_T):
        segments = None if seg_T is None else sk.SegmentIds(q=seg_T, kv=seg_T)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(q_KGTH, k_KSH, v_KSH)

    seg_BT = None if mask.q_segment_ids is None else mask.q_segment_ids.astype(jnp.int32)
    o_BKGTH = jax.vmap(one_row)(q_BKGTH, k_BKSH, v_BKSH, seg_BT)  # None is an empty pytree: nothing mapped
    return o_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q_BTNH.dtype)
