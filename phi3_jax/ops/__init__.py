"""Stable numerical API the model calls; each op has a plain-JAX reference behind it."""
from phi3_jax.ops.attention import IMPLS, Mask, attention, dense_mask, reference_attention, xla_attention

__all__ = ["IMPLS", "Mask", "attention", "dense_mask", "reference_attention", "xla_attention"]
