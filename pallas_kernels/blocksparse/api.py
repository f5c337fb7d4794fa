"""Public entry point: one signature for every backend."""
from __future__ import annotations

from pallas_kernels.blocksparse.layout import Layout

BACKENDS = ("reference", "tpu", "gpu")


def blocksparse_attention(q, k, v, *, layout: Layout, sm_scale=None, segment_ids=None,
                          backend: str = "reference", interpret: bool = False, **kernel_options):
    """Causal block-sparse self-attention with grouped KV heads.

    q: [batch, seq, q_heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim]; q_heads must equal
    `layout.num_heads` and be a multiple of kv_heads (query head h reads kv head h // (q_heads // kv_heads)).
    sm_scale defaults to 1/sqrt(head_dim). segment_ids: optional int [batch, seq]; tokens attend only
    within their segment. Returns q's shape and dtype. `kernel_options` (e.g. block_q, block_k) go to the
    kernel backends only.
    """
    if backend == "reference":
        if kernel_options:
            raise TypeError(f"backend='reference' takes no kernel options, got {sorted(kernel_options)}")
        from pallas_kernels.blocksparse import reference
        return reference.blocksparse_attention(q, k, v, layout=layout, sm_scale=sm_scale,
                                               segment_ids=segment_ids)
    if backend == "tpu":
        from pallas_kernels.blocksparse import tpu
        return tpu.blocksparse_attention(q, k, v, layout=layout, sm_scale=sm_scale,
                                         segment_ids=segment_ids, interpret=interpret, **kernel_options)
    if backend == "gpu":
        from pallas_kernels.blocksparse import gpu
        return gpu.blocksparse_attention(q, k, v, layout=layout, sm_scale=sm_scale,
                                         segment_ids=segment_ids, interpret=interpret, **kernel_options)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
