"""Weighted mixtures of packed rows, and a sequence of phases each with its own mixture and budget.

Mixing is per packed row: every row comes from one source, and grain's deterministic mix picks the
source of row k from the weights alone (no random draw), so a source's share of rows — and, with
unpadded "concat" packing, of tokens — matches its weight to within a fraction of a percent at any
scale, and is the same on every process.

A phase's token budget counts global-batch token slots (global_batch_size * seq_len per step,
padding included): the phase lasts ceil(tokens / tokens_per_step) steps and every process switches on
the same step, whatever its local data looks like.

`PhasedIterDataset` is a grain IterDataset; its iterator's get_state()/set_state() hold the phase,
the step and the current phase's own grain state, so a restored iterator continues with exactly the
batches the original would have produced (also across a phase boundary). The state is JSON-friendly,
as grain's Orbax checkpoint handler requires.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import grain
import numpy as np

from phi3_jax.data.errors import DataError


def mix_rows(streams: Sequence[grain.IterDataset], weights: Sequence[float]) -> grain.IterDataset:
    """Interleave row streams in proportion to `weights` (all > 0)."""
    if len(streams) != len(weights) or not streams:
        raise DataError(f"mix_rows: {len(streams)} streams but {len(weights)} weights")
    if any(w <= 0 for w in weights):
        raise DataError(f"mix_rows: weights must be > 0, got {list(weights)}")
    if len(streams) == 1:
        return streams[0]
    # grain turns weights into integer proportions scaled so the smallest is 100: shares exact to ~1%
    # of the smallest weight; normalising first keeps the numbers readable in its repr.
    total = float(sum(weights))
    return grain.IterDataset.mix(list(streams), [w / total for w in weights])


def steps_for_tokens(tokens: int, tokens_per_step: int) -> int | None:
    """Steps a budget lasts; None for an unbounded (0) budget."""
    return None if tokens == 0 else max(1, math.ceil(tokens / tokens_per_step))


class _PhasedIterator(grain.DatasetIterator):
    def __init__(self, names: Sequence[str], steps: Sequence[int | None], iterators: Sequence[grain.DatasetIterator]):
        super().__init__(list(iterators))
        self._names, self._steps, self._iters = list(names), list(steps), list(iterators)
        self._phase, self._in_phase, self._step = 0, 0, 0

    def __next__(self) -> Any:
        while (self._phase < len(self._iters) and self._steps[self._phase] is not None
               and self._in_phase >= self._steps[self._phase]):
            self._phase, self._in_phase = self._phase + 1, 0
        if self._phase >= len(self._iters):
            raise StopIteration
        batch = next(self._iters[self._phase])
        self._in_phase += 1
        self._step += 1
        return batch

    # Information for the training loop's logs.
    @property
    def step(self) -> int:
        """Batches produced so far."""
        return self._step

    @property
    def phase_index(self) -> int:
        """Phase of the last batch produced (0 before the first)."""
        return min(self._phase, len(self._names) - 1)

    @property
    def phase_name(self) -> str:
        return self._names[self.phase_index]

    def get_state(self) -> dict:
        inner = self._iters[self._phase].get_state() if self._phase < len(self._iters) else None
        return {"phase": self._phase, "step_in_phase": self._in_phase, "step": self._step, "inner": inner,
                "phase_names": list(self._names)}

    def set_state(self, state: dict) -> None:
        state = _slices_as_tuples(state)
        if list(state.get("phase_names", self._names)) != self._names:
            raise DataError(f"data iterator state is for phases {state.get('phase_names')}, "
                            f"but the config has {self._names}")
        self._phase, self._in_phase, self._step = int(state["phase"]), int(state["step_in_phase"]), int(state["step"])
        if self._phase < len(self._iters):
            self._iters[self._phase].set_state(state["inner"])

    def __str__(self) -> str:
        return f"PhasedIterator(phases={self._names}, steps={self._steps})"


def _slices_as_tuples(state: Any) -> Any:
    """`state` with grain's concat-packing "remainder_slices" back as tuples. JSON (grain's checkpoint handler,
    the trainer's DataFeed) stores them as lists, and grain tells "nothing held over" by comparing with the
    tuple (-1, -1): a list there reads one document as a held-over piece and drops it."""
    if isinstance(state, dict):
        return {k: ({f: tuple(v) if isinstance(v, list) else v for f, v in s.items()}
                    if k == "remainder_slices" and isinstance(s, dict) else _slices_as_tuples(s))
                for k, s in state.items()}
    if isinstance(state, list):
        return [_slices_as_tuples(s) for s in state]
    return state


class PhasedIterDataset(grain.IterDataset):
    """Phases in order: (name, steps or None = unbounded, IterDataset of batches)."""

    def __init__(self, phases: Sequence[tuple[str, int | None, grain.IterDataset]]):
        if not phases:
            raise DataError("PhasedIterDataset needs at least one phase")
        for name, steps, _ in phases[:-1]:
            if steps is None:
                raise DataError(f"phase {name!r}: only the last phase may be unbounded")
        super().__init__([ds for _, _, ds in phases])
        self._phases = list(phases)

    @property
    def phase_steps(self) -> list[tuple[str, int | None]]:
        return [(name, steps) for name, steps, _ in self._phases]

    def __iter__(self) -> _PhasedIterator:
        return _PhasedIterator([n for n, _, _ in self._phases], [s for _, s, _ in self._phases],
                               [iter(ds) for _, _, ds in self._phases])

    def __str__(self) -> str:
        return f"PhasedIterDataset({self.phase_steps})"


def derive_seed(*parts: int) -> int:
    """A 32-bit seed (what grain's shuffle takes) from integers, e.g. (seed, phase, source)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class _ChainIterator(grain.DatasetIterator):
    def __init__(self, iterators: Sequence[grain.DatasetIterator]):
        super().__init__(list(iterators))
        self._iters, self._k = list(iterators), 0

    def __next__(self) -> Any:
        while self._k < len(self._iters):
            try:
                return next(self._iters[self._k])
            except StopIteration:
                self._k += 1
        raise StopIteration

    def get_state(self) -> dict:
        inner = self._iters[self._k].get_state() if self._k < len(self._iters) else None
        return {"index": self._k, "inner": inner}

    def set_state(self, state: dict) -> None:
        self._k = int(state["index"])
        if self._k < len(self._iters):
            self._iters[self._k].set_state(state["inner"])


class ChainIterDataset(grain.IterDataset):
    """Finite datasets one after another (the eval split: each source packed on its own, in order)."""

    def __init__(self, parents: Sequence[grain.IterDataset]):
        super().__init__(list(parents))
        self._chain = list(parents)

    def __iter__(self) -> _ChainIterator:
        return _ChainIterator([iter(p) for p in self._chain])

    def __str__(self) -> str:
        return f"ChainIterDataset({len(self._chain)} parents)"
