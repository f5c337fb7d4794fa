"""Phi-3-small block-sparse attention: layout, plain-JAX reference, Pallas TPU / GPU kernels, decode.

Importing this package needs only jax and numpy; kernel modules load when their backend is asked for.
"""
from pallas_kernels.blocksparse.api import blocksparse_attention
from pallas_kernels.blocksparse.layout import EMPTY, FULL, PARTIAL, Layout, visit_lists

__all__ = ["EMPTY", "FULL", "PARTIAL", "Layout", "blocksparse_attention", "visit_lists"]
