"""Flat visit schedules for the TPU kernels: one grid step per non-empty (query tile, key tile) pair.

A schedule is a 1-D int32 array per distinct pattern, scalar-prefetched into SMEM. Each entry packs

    bits 0-1 kind (EMPTY / PARTIAL / FULL)   bit 2 first of its row   bit 3 last of its row
    bits 4-8 query head within its kv group  bits 9-19 key tile       bits 20-30 query tile

"Row" is the accumulator the kernel is building: a query tile (forward, dq) or a key tile (dk, dv).
Entries of one row are consecutive, so the output block stays resident while it accumulates. Shorter
schedules are padded with copies of their last entry marked EMPTY (no compute, no new DMA).
"""
from __future__ import annotations

import functools

import numpy as np

from pallas_kernels.blocksparse.layout import EMPTY, Layout

KIND_BITS, FIRST_BIT, LAST_BIT = 0x3, 2, 3
GROUP_SHIFT, GROUP_BITS = 4, 5
K_SHIFT, Q_SHIFT, TILE_BITS = 9, 20, 11
MAX_TILES = 1 << TILE_BITS
# SMEM is 1 MiB on v4/v5/v6 (16 KiB on v2/v3); longer schedules are split into several kernel calls.
MAX_SCHEDULE_WORDS = 128 * 1024


def encode(q_tile, k_tile, kind, first, last, group_index):
    return ((np.asarray(q_tile, np.int64) << Q_SHIFT) | (np.asarray(k_tile, np.int64) << K_SHIFT)
            | (np.asarray(group_index, np.int64) << GROUP_SHIFT) | (np.asarray(last, np.int64) << LAST_BIT)
            | (np.asarray(first, np.int64) << FIRST_BIT) | np.asarray(kind, np.int64)).astype(np.int32)


def decode(entry):
    """(q_tile, k_tile, kind, first, last, group_index) from a packed entry (numpy or traced scalar)."""
    return ((entry >> Q_SHIFT) & (MAX_TILES - 1), (entry >> K_SHIFT) & (MAX_TILES - 1), entry & KIND_BITS,
            (entry >> FIRST_BIT) & 1, (entry >> LAST_BIT) & 1, (entry >> GROUP_SHIFT) & ((1 << GROUP_BITS) - 1))


def _check(n_q: int, n_k: int, group: int):
    if max(n_q, n_k) > MAX_TILES:
        raise ValueError(f"{max(n_q, n_k)} tiles exceed the schedule's {MAX_TILES}; use larger tiles")
    if group > 1 << GROUP_BITS:
        raise ValueError(f"q_heads per kv head = {group} exceeds {1 << GROUP_BITS}")


def _pad_rows(rows: list[np.ndarray]) -> np.ndarray:
    """Stacks schedules of unequal length, padding each with its last entry turned EMPTY."""
    width = max(len(r) for r in rows)
    out = np.empty((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
        filler = r[-1] & ~np.int32(KIND_BITS | (1 << FIRST_BIT) | (1 << LAST_BIT)) | EMPTY
        out[i, len(r):] = filler
    return out


def _row_flags(row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    first = np.ones(row_ids.size, bool)
    first[1:] = row_ids[1:] != row_ids[:-1]
    last = np.ones(row_ids.size, bool)
    last[:-1] = row_ids[1:] != row_ids[:-1]
    return first, last


@functools.lru_cache(maxsize=32)
def q_major(layout: Layout, seq_len: int, block_q: int, block_k: int):
    """Forward / dq schedule: (int32 [P, T] schedules, int32 [num_heads] pattern of each head)."""
    kinds_PQK, head_to_pattern = layout.pattern_tile_kinds(seq_len, block_q, block_k)
    _check(*kinds_PQK.shape[1:], 1)
    rows = []
    for kinds_QK in kinds_PQK:
        q_i, k_i = np.nonzero(kinds_QK != EMPTY)  # sorted by query tile, then key tile
        first, last = _row_flags(q_i)
        rows.append(encode(q_i, k_i, kinds_QK[q_i, k_i], first, last, 0))
    return _frozen(_pad_rows(rows)), _frozen(head_to_pattern.astype(np.int32))


@functools.lru_cache(maxsize=32)
def k_major(layout: Layout, seq_len: int, block_q: int, block_k: int, kv_heads: int):
    """dk / dv schedule over the query heads of each kv head.

    Returns (int32 [GS, T] schedules, int32 [kv_heads] schedule of each kv head): for every key tile, the
    query tiles that visit it for query head 0 of the group, then head 1, ...; kv heads whose group has
    the same tuple of patterns share a schedule.
    """
    kinds_PQK, head_to_pattern = layout.pattern_tile_kinds(seq_len, block_q, block_k)
    group = layout.num_heads // kv_heads
    _check(*kinds_PQK.shape[1:], group)
    group_sets, kv_to_set = np.unique(head_to_pattern.reshape(kv_heads, group), axis=0, return_inverse=True)
    rows = []
    for patterns in group_sets:
        kinds_GKQ = np.swapaxes(kinds_PQK[patterns], 1, 2)
        k_i, g_i, q_i = np.nonzero(np.swapaxes(kinds_GKQ, 0, 1) != EMPTY)  # sorted by key tile, head, query
        if np.unique(k_i).size != kinds_GKQ.shape[1]:
            raise AssertionError("every key tile must be visited (its diagonal tile always is)")
        first, last = _row_flags(k_i)
        rows.append(encode(q_i, k_i, kinds_GKQ[g_i, k_i, q_i], first, last, g_i))
    return _frozen(_pad_rows(rows)), _frozen(kv_to_set.reshape(-1).astype(np.int32))


def split_rows(sched_PT: np.ndarray, by: str, max_words: int | None = None) -> list[np.ndarray]:
    """Splits schedules into consecutive chunks of at most `max_words` entries in all, cutting only where
    every pattern's row (query tile for q-major, key tile for k-major) ends, so no accumulator spans two
    kernel calls. `by` is "q" for q_major schedules, "k" for k_major ones."""
    max_words = MAX_SCHEDULE_WORDS if max_words is None else max_words
    n_sched, width = sched_PT.shape
    if n_sched * width <= max_words:
        return [sched_PT]
    q_tile, k_tile, kind, _, _, _ = decode(sched_PT.astype(np.int64))
    row = {"q": q_tile, "k": k_tile}[by]
    row = np.where(kind == EMPTY, np.iinfo(np.int64).max, row)  # padding belongs to no row
    n_rows = int(row[row < np.iinfo(np.int64).max].max()) + 1
    # ends[p, r]: entries of pattern p with row id < r.
    ends = np.stack([np.searchsorted(r, np.arange(n_rows + 1), side="left") for r in row])
    budget = max(1, max_words // n_sched)
    chunks, start_row = [], 0
    while start_row < n_rows:
        stop = start_row + 1
        while stop < n_rows and (ends[:, stop + 1] - ends[:, start_row]).max() <= budget:
            stop += 1
        chunks.append(_pad_rows([sched_PT[p, ends[p, start_row]:ends[p, stop]] for p in range(n_sched)]))
        start_row = stop
    return chunks


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a
