"""Statistics of the token stream a model is trained on.

`unigram_entropy` is the loss (per token) of the best model that ignores context: predicting every
token from its overall frequency. A language model that learns anything must get its loss well below
it; a training run that plateaus near it has learned only token frequencies.
"""

from __future__ import annotations

import itertools
import math
from typing import Mapping

import numpy as np


def token_counts(data, num_batches: int = 100) -> np.ndarray:
    """Counts per token id. `data`: an array/list of ids, or an iterable of batches (dicts with
    `targets` and `loss_mask`: only the predicted tokens are counted, as the loss sees them)."""
    if isinstance(data, np.ndarray) or (isinstance(data, (list, tuple)) and data and not isinstance(data[0], Mapping)):
        ids = np.asarray(data).reshape(-1).astype(np.int64)
        return np.bincount(ids) if ids.size else np.zeros(0, np.int64)
    counts = np.zeros(0, np.int64)
    for batch in itertools.islice(iter(data), num_batches):
        ids = np.asarray(batch["targets"])[np.asarray(batch["loss_mask"]) > 0].astype(np.int64)
        c = np.bincount(ids)
        if len(c) > len(counts):
            counts = np.pad(counts, (0, len(c) - len(counts)))
        counts[:len(c)] += c
    return counts


def unigram_entropy(data, num_batches: int = 100, unit: str = "nats") -> float:
    """Entropy of the unigram token distribution, in nats (comparable to a cross-entropy loss computed
    with natural logs) or bits. Takes a pipeline iterator (consumes up to num_batches batches: pass a
    fresh one, not the training iterator), an iterable of batches, or token ids."""
    if unit not in ("nats", "bits"):
        raise ValueError(f"unit must be 'nats' or 'bits', got {unit!r}")
    counts = token_counts(data, num_batches)
    total = counts.sum()
    if total == 0:
        raise ValueError("unigram_entropy: no tokens")
    p = counts[counts > 0] / total
    h = float(-(p * np.log(p)).sum())
    return h / math.log(2) if unit == "bits" else h
