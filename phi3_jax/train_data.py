"""The trainer's view of the data pipeline: which rows of the global batch this process loads.

The global batch is cut into `num_shards` equal slices ("data shards"); shard s is what
`phi3_jax.data.make_pipeline(..., process_index=s, process_count=num_shards)` yields. Each process loads
the shards its devices hold under the batch sharding and concatenates them, so:

- with one shard per process (the default), every process reads only its own documents;
- the global batch depends only on (data config, seed, num_shards), never on the number of processes:
  a run with `train.data_shards=2` sees the same batches on one process as on two (which is how the
  multi-process test compares against a single-process run);
- a process whose devices hold replicated rows (e.g. a mesh whose only split across processes is
  `tensor`) loads the same shards as its peers.

`DataFeed.get_state()` / `set_state()` hold every shard iterator's grain state (JSON bytes), which is what
grain's Orbax CheckpointHandler stores per process.
"""
from __future__ import annotations

import itertools
import json
from typing import Sequence

import jax
import numpy as np

from phi3_jax import sharding as shd
from phi3_jax.data import Alignment, eval_source_names, make_pipeline


def packing_alignment(model_cfg, seq_len: int | None = None) -> Alignment | None:
    """Where a block-sparse model's packed documents may start: its pattern repeats every block_size x
    vert_stride tokens, and a piece of at most (local_blocks - 1) x block_size + 1 tokens lies inside the
    dense local window wherever it starts. None for a model without block-sparse layers, or for rows of
    `seq_len` tokens that no piece can outgrow the window in."""
    if not any(model_cfg.layer_is_sparse(i) for i in range(model_cfg.layer_period)):
        return None
    b = model_cfg.blocksparse_block_size
    align = Alignment(period=b * model_cfg.blocksparse_vert_stride,
                      max_unaligned=(model_cfg.blocksparse_local_blocks - 1) * b + 1)
    return None if seq_len is not None and seq_len <= align.max_unaligned else align


def process_row_range(mesh, global_batch: int, seq_len: int) -> tuple[int, int]:
    """[start, stop) rows of the global batch held by this process's devices (must be contiguous)."""
    sharding = shd.batch_sharding(mesh, 2)
    idx = sharding.addressable_devices_indices_map((global_batch, seq_len))
    rows = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop) for s in idx.values()})
    start, stop = rows[0][0], rows[-1][1]
    covered = sum(b - a for a, b in rows)
    if covered != stop - start:
        raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {rows}; "
                         "order the mesh so that each process holds one block of the batch")
    return start, stop


def shard_ids(mesh, global_batch: int, seq_len: int, num_shards: int) -> list[int]:
    """The data shards this process loads."""
    if global_batch % num_shards:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by the number of data shards "
                         f"({num_shards})")
    per = global_batch // num_shards
    start, stop = process_row_range(mesh, global_batch, seq_len)
    if start % per or stop % per:
        raise ValueError(f"this process holds rows [{start}, {stop}) of the batch, which do not align with "
                         f"{num_shards} data shards of {per} rows; set train.data_shards to a multiple of "
                         f"{global_batch // (stop - start)}")
    return list(range(start // per, stop // per))


class DataStateMismatch(ValueError):
    """A checkpointed data-iterator state that belongs to another split of the global batch."""


class DataFeed:
    """Concatenated batches of this process's data shards; checkpointable. `pairs`: rows of preference pairs
    (see `phi3_jax.data.make_pipeline`)."""

    def __init__(self, data_cfg, tokenizer, seq_len: int, global_batch: int, seed: int, shards: Sequence[int],
                 num_shards: int, split: str = "train", align: Alignment | None = None, pairs: bool = False,
                 eval_sources: Sequence[str] | None = None):
        self.shards, self.num_shards = list(shards), int(num_shards)
        self._iters = [make_pipeline(data_cfg, tokenizer, seq_len, global_batch, seed, process_index=s,
                                     process_count=num_shards, split=split, align=align, pairs=pairs,
                                     eval_sources=eval_sources)
                       for s in self.shards]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self._iters]
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> bytes:
        return json.dumps({"num_shards": self.num_shards, "shards": self.shards,
                           "states": [it.get_state() for it in self._iters]}).encode()

    def set_state(self, state: bytes) -> None:
        d = json.loads(state.decode() if isinstance(state, bytes) else state)
        if d.get("num_shards") != self.num_shards or d.get("shards") != self.shards:
            raise DataStateMismatch(f"data iterator state is for shards {d.get('shards')} of {d.get('num_shards')}, "
                             f"this run loads shards {self.shards} of {self.num_shards} (train.data_shards or "
                             "the process count changed)")
        for it, s in zip(self._iters, d["states"]):
            it.set_state(s)

    def start_prefetch(self) -> None:  # called by grain's CheckpointHandler after set_state
        pass

    @property
    def phase_index(self) -> int | None:
        """The data phase of the last batch read (0 before the first)."""
        return getattr(self._iters[0], "phase_index", None)

    @property
    def phase_name(self) -> str | None:
        return getattr(self._iters[0], "phase_name", None)


def eval_batches(data_cfg, tokenizer, seq_len: int, global_batch: int, shards: Sequence[int], num_shards: int,
                 max_batches: int, align: Alignment | None = None,
                 pairs: bool = False) -> dict[str, list[dict[str, np.ndarray]]]:
    """{source name: up to `max_batches` held-out batches of that source alone (this process's rows)} for
    every source the eval split holds: the same batches at every evaluation. Each source is read on its own
    so that every one is evaluated, however long the held-out tails before it are."""
    out = {}
    for name in eval_source_names(data_cfg):
        feed = DataFeed(data_cfg, tokenizer, seq_len, global_batch, 0, shards, num_shards, split="eval", align=align,
                        pairs=pairs, eval_sources=[name])
        out[name] = list(itertools.islice(feed, max_batches))
    return out
