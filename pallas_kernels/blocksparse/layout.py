"""Phi-3-small block-sparse attention layout (spec §5.2) and the metadata kernels iterate over.

Everything here is built from block indices with numpy (or jnp where positions are traced), never from
a token-level [S, S] mask: the 128k layout (2048 blocks x 32 heads) takes ~30 ms per distinct pattern
and ~0.1 s for the full per-head array (memory-bound: 134 MB), cached after the first call.

Heads only differ through `(h * step) mod vert_stride`, so at most `vert_stride` distinct patterns exist;
masks are built once per pattern and gathered per head.

Tile metadata uses three kinds per (head, query tile, key tile): EMPTY (skip), PARTIAL (apply the
token-level mask in the kernel) and FULL (every pair allowed, no mask needed). Kernel tiles must be a
multiple or a divisor of `block_size`.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax.numpy as jnp
import numpy as np

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Layout:
    """Block-sparse causal pattern; `num_heads` counts query heads and head indices are global."""

    block_size: int = 64
    local_blocks: int = 16
    vert_stride: int = 8
    num_heads: int = 32
    homo_head: bool = False

    def __post_init__(self):
        for name in ("block_size", "local_blocks", "vert_stride", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"Layout.{name} must be a positive int, got {value!r}")

    # ---- the formula -------------------------------------------------------------------------------

    @property
    def head_step(self) -> int:
        """`head_sliding_step` of spec §5.2: 0 for homogeneous heads, else max(1, V // nH)."""
        return 0 if self.homo_head else max(1, self.vert_stride // self.num_heads)

    def head_offsets(self) -> np.ndarray:
        """[num_heads] int: c_h = (h * step + 1) mod V; head h sees key blocks kb with (kb + c_h) % V == 0."""
        return (np.arange(self.num_heads) * self.head_step + 1) % self.vert_stride

    def vertical_residues(self) -> np.ndarray:
        """[num_heads] int: the residue kb mod V of the vertical ("strided") key blocks each head sees."""
        return (-self.head_offsets()) % self.vert_stride

    def _patterns(self) -> tuple[np.ndarray, np.ndarray]:
        """(distinct head offsets [P], index of each head's pattern [num_heads])."""
        offsets, head_to_pattern = np.unique(self.head_offsets(), return_inverse=True)
        return offsets, head_to_pattern.reshape(-1)

    def shard(self, parts: int) -> "Layout | None":
        """The layout of each of `parts` equal, contiguous slices of the heads (tensor parallelism), or None
        where the slices do not all repeat one pattern sequence (then a kernel needs the global head index).

        Heads only differ through their vertical offset, so with the released layout (stride 8, 32 heads)
        any slice of a multiple of 8 heads is the same layout with fewer heads.
        """
        if parts == 1:
            return self
        if self.num_heads % parts:
            return None
        local = dataclasses.replace(self, num_heads=self.num_heads // parts)
        same = (self.head_offsets().reshape(parts, -1) == local.head_offsets()[None]).all()
        return local if same else None

    # ---- block level -------------------------------------------------------------------------------

    def block_mask(self, num_blocks: int) -> np.ndarray:
        """bool [num_heads, num_blocks, num_blocks]: block_allowed(h, qb, kb). Cached, read-only."""
        return _block_mask(self, int(num_blocks))

    def pattern_block_mask(self, num_blocks: int) -> tuple[np.ndarray, np.ndarray]:
        """(bool [P, nb, nb] per distinct pattern, int [num_heads] pattern index of each head)."""
        offsets, head_to_pattern = self._patterns()
        return _pattern_masks(self, int(num_blocks), tuple(offsets.tolist())), head_to_pattern

    def num_blocks(self, seq_len: int) -> int:
        return -(-int(seq_len) // self.block_size)

    # ---- token level -------------------------------------------------------------------------------

    def token_mask(self, q_positions, k_positions) -> jnp.ndarray:
        """bool [num_heads, Sq, Sk]: (j <= i) and block_allowed(h, i // B, j // B) on absolute positions."""
        q_pos = jnp.asarray(q_positions, jnp.int32)
        k_pos = jnp.asarray(k_positions, jnp.int32)
        qb = (q_pos // self.block_size)[:, None]
        kb = (k_pos // self.block_size)[None, :]
        causal = k_pos[None, :] <= q_pos[:, None]
        local = (qb - kb) < self.local_blocks
        c_H = jnp.asarray(self.head_offsets(), jnp.int32)[:, None, None]
        vertical = ((kb[None] + c_H) % self.vert_stride) == 0
        return causal[None] & (local[None] | vertical)

    def density(self, seq_len: int) -> np.ndarray:
        """float64 [num_heads]: allowed pairs / causal pairs for a length-`seq_len` sequence (spec §5.3)."""
        n = int(seq_len)
        nb = self.num_blocks(n)
        sizes = np.minimum(self.block_size, n - np.arange(nb) * self.block_size).astype(np.float64)
        masks_PQK, head_to_pattern = self.pattern_block_mask(nb)
        off_diag_P = np.einsum("pqk,q,k->p", masks_PQK.astype(np.float64), sizes, sizes)
        # Replace the diagonal's |b|^2 by its causal count |b|(|b|+1)/2 (diagonal blocks are always allowed).
        allowed_P = off_diag_P - np.sum(sizes * sizes) + np.sum(sizes * (sizes + 1) / 2)
        return allowed_P[head_to_pattern] / (n * (n + 1) / 2)

    def decode_key_counts(self, position: int) -> np.ndarray:
        """int [num_heads]: keys visible to one query at absolute `position` (itself included)."""
        p = int(position)
        qb = p // self.block_size
        masks_PQK, head_to_pattern = self.pattern_block_mask(qb + 1)
        sizes = np.full(qb + 1, self.block_size, np.int64)
        sizes[qb] = p % self.block_size + 1
        return (masks_PQK[:, qb, :].astype(np.int64) @ sizes)[head_to_pattern]

    def key_block_mask(self, q_positions, num_kv_blocks: int) -> jnp.ndarray:
        """bool [..., num_heads, num_kv_blocks]: key blocks a query at each (traced) position reads."""
        qb = (jnp.asarray(q_positions, jnp.int32) // self.block_size)[..., None, None]
        kb = jnp.arange(num_kv_blocks, dtype=jnp.int32)
        c_H = jnp.asarray(self.head_offsets(), jnp.int32)[:, None]
        vertical = ((kb + c_H) % self.vert_stride) == 0
        return (kb <= qb) & (((qb - kb) < self.local_blocks) | vertical)

    # ---- kernel tile metadata ----------------------------------------------------------------------

    def tile_kinds(self, seq_len: int, block_q: int, block_k: int) -> np.ndarray:
        """int8 [num_heads, ceil(S/block_q), ceil(S/block_k)] of EMPTY / PARTIAL / FULL.

        Self-attention on a sequence padded to the tiles; padded keys only meet padded queries (causality),
        so tiles holding padding need no extra kind. Read-only.
        """
        kinds_PQK, head_to_pattern = self.pattern_tile_kinds(seq_len, block_q, block_k)
        return _gather_heads(kinds_PQK, head_to_pattern)

    def pattern_tile_kinds(self, seq_len: int, block_q: int, block_k: int) -> tuple[np.ndarray, np.ndarray]:
        """(int8 [P, nq, nk] tile kinds per distinct pattern, int [num_heads] pattern of each head)."""
        _, head_to_pattern = self._patterns()
        return _tile_kinds(self, int(seq_len), int(block_q), int(block_k)), head_to_pattern

    def kv_tile_lists(self, seq_len: int, block_q: int, block_k: int):
        """Key tiles each (head, query tile) visits, in increasing order, padded: see `visit_lists`."""
        kinds_PQK, head_to_pattern = self.pattern_tile_kinds(seq_len, block_q, block_k)
        return tuple(_gather_heads(a, head_to_pattern) for a in visit_lists(kinds_PQK))

    def q_tile_lists(self, seq_len: int, block_q: int, block_k: int):
        """Query tiles that visit each (head, key tile), in increasing order, padded (for dk/dv)."""
        kinds_PQK, head_to_pattern = self.pattern_tile_kinds(seq_len, block_q, block_k)
        lists = visit_lists(np.swapaxes(kinds_PQK, 1, 2))
        return tuple(_gather_heads(a, head_to_pattern) for a in lists)

    def kv_block_lists(self, num_blocks: int):
        """`kv_tile_lists` with tiles equal to layout blocks: (ids, kinds, counts) per (head, q block)."""
        n = int(num_blocks) * self.block_size
        return self.kv_tile_lists(n, self.block_size, self.block_size)


def visit_lists(kinds_HQK: np.ndarray):
    """Compacts non-EMPTY entries along the last axis into padded lists.

    Returns (ids int32 [H, Q, M], kinds int8 [H, Q, M], counts int32 [H, Q]) with M = max(1, max count).
    Entries past `counts` repeat the last valid id (or 0 for an empty row) with kind EMPTY, so a kernel
    whose input index follows `ids` keeps the same tile resident instead of fetching a new one.
    """
    h_n, q_n, k_n = kinds_HQK.shape
    visit_HQK = kinds_HQK != EMPTY
    counts_HQ = visit_HQK.sum(-1).astype(np.int32)
    width = max(1, int(counts_HQ.max(initial=0)))
    h_i, q_i, k_i = np.nonzero(visit_HQK)  # row-major: sorted by (h, q), then k
    row = h_i * q_n + q_i
    starts = np.concatenate([[0], np.cumsum(counts_HQ.reshape(-1))[:-1]])
    slot = np.arange(row.size) - starts[row]
    ids = np.zeros((h_n * q_n, width), np.int32)
    kinds = np.zeros((h_n * q_n, width), np.int8)
    ids[row, slot] = k_i
    kinds[row, slot] = kinds_HQK[h_i, q_i, k_i]
    # Pad with the last valid id so a pipelined fetch of the padding is a no-op.
    last = ids[np.arange(h_n * q_n), np.maximum(counts_HQ.reshape(-1) - 1, 0)]
    pad = np.arange(width)[None, :] >= counts_HQ.reshape(-1, 1)
    ids = np.where(pad, last[:, None], ids)
    return ids.reshape(h_n, q_n, width), kinds.reshape(h_n, q_n, width), counts_HQ


@functools.lru_cache(maxsize=16)
def _pattern_masks(layout: Layout, num_blocks: int, offsets: tuple[int, ...]) -> np.ndarray:
    qb = np.arange(num_blocks)[:, None]
    kb = np.arange(num_blocks)[None, :]
    causal = qb >= kb
    local = causal & ((qb - kb) < layout.local_blocks)
    c_P = np.asarray(offsets)[:, None]
    vertical_PK = ((np.arange(num_blocks)[None, :] + c_P) % layout.vert_stride) == 0
    masks = local[None] | (causal[None] & vertical_PK[:, None, :])
    masks.setflags(write=False)
    return masks


@functools.lru_cache(maxsize=4)
def _block_mask(layout: Layout, num_blocks: int) -> np.ndarray:
    masks_PQK, head_to_pattern = layout.pattern_block_mask(num_blocks)
    return _gather_heads(masks_PQK, head_to_pattern)


def _gather_heads(per_pattern: np.ndarray, head_to_pattern: np.ndarray) -> np.ndarray:
    out = per_pattern[head_to_pattern]
    out.setflags(write=False)
    return out


def _check_tile(tile: int, block_size: int, name: str):
    if tile < 1 or (tile % block_size and block_size % tile):
        raise ValueError(f"{name}={tile} must be a multiple or a divisor of block_size={block_size}")


@functools.lru_cache(maxsize=16)
def _tile_kinds(layout: Layout, seq_len: int, block_q: int, block_k: int) -> np.ndarray:
    B = layout.block_size
    _check_tile(block_q, B, "block_q")
    _check_tile(block_k, B, "block_k")
    unit = math.gcd(B, block_q, block_k)
    n_q = -(-seq_len // block_q)
    n_k = -(-seq_len // block_k)
    units = max(n_q * block_q, n_k * block_k) // unit
    per_block = B // unit
    nb = -(-units // per_block)
    masks_PQK, _ = layout.pattern_block_mask(nb)
    # Unit grid: a unit pair lies inside one layout block pair.
    ub = np.arange(units) // per_block
    allowed = masks_PQK if per_block == 1 else masks_PQK[:, ub[:, None], ub[None, :]]
    allowed = allowed[:, :units, :units]
    uq = np.arange(units)[:, None]
    uk = np.arange(units)[None, :]
    # Fully allowed only strictly below the token diagonal: min q position >= max k position.
    below = uq * unit >= uk * unit + unit - 1
    full = allowed & below[None]
    rq, rk = block_q // unit, block_k // unit
    shape = (allowed.shape[0], n_q, rq, n_k, rk)
    any_allowed = allowed[:, : n_q * rq, : n_k * rk].reshape(shape).any(axis=(2, 4))
    all_full = full[:, : n_q * rq, : n_k * rk].reshape(shape).all(axis=(2, 4))
    kinds = np.where(all_full, FULL, np.where(any_allowed, PARTIAL, EMPTY)).astype(np.int8)
    kinds.setflags(write=False)
    return kinds
