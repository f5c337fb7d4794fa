"""Documents -> token ids -> packed rows of `seq_len` with next-token targets.

A row is a dict of 1-D numpy arrays of length seq_len:
  inputs       int32  token ids fed to the model
  targets      int32  the token that follows each input in the packed stream
  segment_ids  int32  1, 2, ... for each document piece within the row; 0 on padding
  positions    int32  position within the piece, 0 at each piece's first token
  loss_mask    float32

Documents are tokenized as [bos?] ids [eos] and packed into windows of seq_len + 1 tokens; a row is
window[:-1] as inputs and window[1:] as targets, so every target inside the row is available. A
conversation (a document with "messages") is tokenized by the tokenizer's chat template instead
(`Tokenizer.encode_chat`), which marks the tokens of the assistant's replies as trained.

Loss-mask rule: loss_mask[t] = 1 exactly when input t and target t belong to the same document piece
(segment_ids equal and non-zero) and target t is a trained token. Every token of a text document is
trained; in a conversation only the assistant's replies are. So the loss is on predicting every next
token of a text document including its closing eos (of a conversation: every token of its replies), and
never on the eos -> next-document transition, which no context predicts and which the attention mask
(tokens attend only within their segment) hides anyway. Padding is 0.

Packing methods (both from grain.experimental):
  "concat"    ConcatThenSplitIterDataset: documents concatenated and cut every seq_len + 1 tokens, so
              a long document continues in the next row as a new piece (positions restart at 0; the
              model sees no context from the previous row). No padding in an endless stream.
  "first_fit" FirstFitPackIterDataset: documents are first cut into pieces of at most seq_len + 1,
              then whole pieces are placed into `num_bins` open rows; rows are padded, pieces never split.

Preference pairs (DPO): `TokenizePair` makes one unit of a pair document, its chosen conversation's tokens
then its rejected one's, and `pack_pairs` places whole units first-fit (FirstFitPackIterDataset, windows of
seq_len + 1 tokens as above). The k-th pair of a row (k = 1, 2, ...) is segment 2k - 1 (chosen) followed
right after by segment 2k (rejected): pair index = (segment + 1) // 2, chosen where the segment is odd.
Positions restart at 0 in each of the two segments, and the loss-mask rule is the one above. A pair is
never split, so a unit longer than seq_len + 1 tokens cannot be placed as it is. With `truncate` (the
default; data.pair_overflow="truncate_prompt") it loses the start of the prefix its two conversations share
(the prompt, and the last reply up to where the two replies differ), the same tokens from both and after a
leading bos, until it fits: the prompt's end stays, as in TRL's "keep_end" truncation. Trained tokens in
the shared prefix add the same log-ratio to both conversations, so cutting them changes the DPO margin only
through the context. A unit that does not fit even with the whole shared prefix cut (or any too-long unit,
without `truncate`) is dropped. Both are logged (the first time, then every 1000th).

Block-sparse models (phi-3-small) apply their attention pattern by row position, the kernels' tiles, while
each document should see the pattern of its own positions, as it does alone at inference. The two agree
for a piece that starts at a multiple of the pattern's period (block size x vertical stride) or that fits
the dense local window. `pack(..., align=Alignment(...))` ("concat" only) keeps every longer piece on such
an offset: the gap before it is filled with following documents short enough to sit anywhere, and padded
(segment 0, no loss) where none fits. `phi3_jax.train_data.packing_alignment(model_cfg)` gives a model's
Alignment; the trainer applies it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import grain
import grain.experimental as gexp
import numpy as np

from phi3_jax.data.errors import DataError

log = logging.getLogger(__name__)

PACKING_METHODS = ("concat", "first_fit")
ROW_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
_GAP = -1  # token of alignment padding in the packed stream; rows_from_window turns it into padding


@dataclasses.dataclass(frozen=True)
class Alignment:
    """A piece longer than `max_unaligned` tokens starts at a row offset that is a multiple of `period`."""
    period: int
    max_unaligned: int

    def __post_init__(self):
        if self.period < 1 or self.max_unaligned < 1:
            raise DataError(f"alignment period and max_unaligned must be positive, got {self}")


class Tokenize(grain.transforms.Map):
    """doc dict -> {"tokens": int32 [n], "trained": int32 [n]}: [bos?] encode(text) [eos], all trained; or a
    conversation's `encode_chat` ids (bos and eos added where its template leaves them out), the replies
    trained."""

    def __init__(self, tokenizer, add_bos: bool = False, add_eos: bool = True):
        self.tokenizer, self.add_bos, self.add_eos = tokenizer, add_bos, add_eos

    def chat(self, messages) -> tuple[list[int], list[int]]:
        """A conversation's (ids, trained), with bos and eos added where its template leaves them out."""
        bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
        ids, trained = self.tokenizer.encode_chat(messages)
        if self.add_bos and ids[:1] != [bos]:
            ids, trained = [bos] + ids, [0] + trained
        if self.add_eos and ids[-1:] != [eos]:
            ids, trained = ids + [eos], trained + [0]
        return ids, trained

    def map(self, doc: dict) -> dict:
        bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
        if "messages" in doc:
            ids, trained = self.chat(doc["messages"])
        else:
            ids = self.tokenizer.encode(doc["text"])
            if self.add_bos:
                ids = [bos] + ids
            if self.add_eos:
                ids = ids + [eos]
            trained = [1] * len(ids)
        return {"tokens": np.asarray(ids, dtype=np.int32), "trained": np.asarray(trained, dtype=np.int32)}


class TokenizePair(Tokenize):
    """pair doc -> one unit, int32 [n] each: "tokens" and "trained" (the chosen conversation's, then the
    rejected one's, each as `Tokenize` has a conversation), "rejected" (1 on the rejected conversation's
    tokens) and "pair_positions" (position within its own conversation)."""

    def map(self, doc: dict) -> dict:
        (chosen, chosen_trained), (rejected, rejected_trained) = self.chat(doc["chosen"]), self.chat(doc["rejected"])
        return {"tokens": np.asarray(chosen + rejected, np.int32),
                "trained": np.asarray(chosen_trained + rejected_trained, np.int32),
                "rejected": np.repeat(np.int32([0, 1]), [len(chosen), len(rejected)]),
                "pair_positions": np.concatenate([np.arange(len(chosen)), np.arange(len(rejected))]).astype(np.int32)}


PAIR_FEATURES = ("tokens", "trained", "rejected", "pair_positions")


def _all_trained(doc: dict) -> dict:
    return doc if "trained" in doc else {**doc, "trained": np.ones(len(doc["tokens"]), np.int32)}


class _ChunkDocument(gexp.FlatMapTransform):
    """Cut one tokenized document into pieces of at most `length` tokens (for first-fit packing)."""

    def __init__(self, length: int):
        self.length = length
        self.max_fan_out = 1 << 30  # unused by the iterator flat map; documents can be arbitrarily long

    def flat_map(self, element: dict) -> list[dict]:
        t, w = element["tokens"], element["trained"]
        return [{"tokens": t[i:i + self.length], "trained": w[i:i + self.length]}
                for i in range(0, max(len(t), 1), self.length)]


class _AlignedDocumentsIterator(grain.DatasetIterator):
    """Documents in stream order, except that a long piece due at an unaligned offset waits while the
    gap before it fills with the following short documents (then with one padding element).

    The state is a "clean" point (the parent's state and the row offset where nothing is held back but
    possibly the next document, which the parent gives again) and the number of elements given out since:
    at most one gap's worth. set_state replays from the clean point.
    """

    def __init__(self, parent: grain.DatasetIterator, window: int, align: Alignment):
        super().__init__(parent)
        self._window, self._align = window, align
        self._start(parent.get_state(), 0)

    def _start(self, parent_state, offset: int) -> None:
        self._clean, self._since = (parent_state, offset), 0
        self._elements = self._generate(offset)

    def _generate(self, offset: int):
        """Yields (element, the clean point after it, or None inside a gap)."""
        W, P, M = self._window, self._align.period, self._align.max_unaligned
        carry = None  # (parent state before it, document): read while filling a gap, placed next
        while True:
            doc = carry[1] if carry is not None else next(self._parent, None)
            carry = None
            if doc is None:
                return
            n = len(doc["tokens"])
            if offset % P == 0 or min(n, W - offset) <= M:
                offset = (offset + n) % W
                yield doc, (self._parent.get_state(), offset)
                continue
            while offset % P:
                gap = min(offset + P - offset % P, W) - offset
                state = self._parent.get_state()
                nxt = next(self._parent, None)
                if nxt is not None and len(nxt["tokens"]) <= min(gap, M):
                    offset = (offset + len(nxt["tokens"])) % W
                    yield nxt, None
                    continue
                carry = None if nxt is None else (state, nxt)
                offset = (offset + gap) % W
                yield {"tokens": np.full(gap, _GAP, np.int32), "trained": np.zeros(gap, np.int32)}, None
            offset = (offset + n) % W
            yield doc, (self._parent.get_state() if carry is None else carry[0], offset)

    def __next__(self) -> dict:
        element, clean = next(self._elements)
        if clean is None:
            self._since += 1
        else:
            self._clean, self._since = clean, 0
        return element

    def get_state(self) -> dict:
        return {"parent": self._clean[0], "offset": self._clean[1], "since": self._since}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._start(state["parent"], int(state["offset"]))
        for _ in range(int(state["since"])):
            next(self)


class _AlignedDocuments(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, window: int, align: Alignment):
        super().__init__(parent)
        self._window, self._align = window, align

    def __iter__(self) -> _AlignedDocumentsIterator:
        return _AlignedDocumentsIterator(self._parent.__iter__(), self._window, self._align)

    def __str__(self) -> str:
        return f"_AlignedDocuments(window={self._window}, {self._align})"


def rows_from_window(window: dict, pad_id: int) -> dict[str, np.ndarray]:
    """A packed window of seq_len + 1 tokens -> one training row (see the module docstring)."""
    tok = np.asarray(window["tokens"], dtype=np.int32)
    seg = np.asarray(window["tokens_segment_ids"], dtype=np.int32)
    pos = np.asarray(window["tokens_positions"], dtype=np.int32)
    if (tok == _GAP).any():  # alignment padding: segment 0, the documents renumbered 1, 2, ...
        seg = np.where(tok == _GAP, 0, seg)
        seg = np.where(seg > 0, np.searchsorted(np.unique(seg[seg > 0]), seg) + 1, 0).astype(np.int32)
    seg_in, seg_tg = seg[:-1], seg[1:]
    real = seg_in != 0
    loss_mask = (real & (seg_in == seg_tg) & (np.asarray(window["trained"])[1:] != 0)).astype(np.float32)
    return {
        "inputs": np.where(real, tok[:-1], pad_id).astype(np.int32),
        "targets": np.where(seg_tg != 0, tok[1:], pad_id).astype(np.int32),
        "segment_ids": seg_in.copy(),
        "positions": np.where(real, pos[:-1], 0).astype(np.int32),
        "loss_mask": loss_mask,
    }


class _ToRow(grain.transforms.Map):
    def __init__(self, pad_id: int, extra: dict[str, Any] | None = None):
        self.pad_id, self.extra = pad_id, dict(extra or {})

    def map(self, window: dict) -> dict:
        row = rows_from_window(window, self.pad_id)
        for k, v in self.extra.items():
            row[k] = np.asarray(v, dtype=np.int32)
        return row


def pack(tokens_ds: grain.IterDataset, seq_len: int, pad_id: int, *, method: str = "concat",
         num_bins: int = 16, seed: int = 0, extra: dict[str, Any] | None = None,
         align: Alignment | None = None) -> grain.IterDataset:
    """{"tokens", "trained"?} documents (without "trained": every token trained) -> rows (ROW_KEYS, plus
    constant int32 `extra` fields such as source_id); `align`: where long pieces may start (see the module
    docstring)."""
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    window = seq_len + 1
    tokens_ds = tokens_ds.map(_all_trained)
    lengths = {"tokens": window, "trained": window}
    if align is not None and seq_len > align.max_unaligned:  # else every piece fits the dense local window
        if method != "concat":
            raise DataError(f"data.packing={method!r} places pieces at any row offset, and this model's "
                            f"block-sparse attention needs pieces longer than {align.max_unaligned} tokens at "
                            f"multiples of {align.period}: use data.packing='concat'")
        tokens_ds = _AlignedDocuments(tokens_ds, window, align)
    if method == "concat":
        packed = gexp.ConcatThenSplitIterDataset(tokens_ds, length_struct=lengths)
    elif method == "first_fit":
        pieces = gexp.FlatMapIterDataset(tokens_ds, _ChunkDocument(window))
        packed = gexp.FirstFitPackIterDataset(pieces, length_struct=lengths, num_packing_bins=num_bins,
                                              seed=seed, shuffle_bins=True)
    else:
        raise DataError(f"unknown packing method {method!r}; known: {PACKING_METHODS}")
    return packed.map(_ToRow(pad_id, extra))


PAIR_OVERFLOW = ("truncate_prompt", "drop")


def fit_pair(unit: dict, window: int, *, truncate: bool = True, bos_id: int | None = None) -> dict | None:
    """A `TokenizePair` unit of at most `window` tokens, or None: the unit itself where it fits; with `truncate`,
    the unit less the start of its two conversations' shared prefix (after a leading `bos_id`), the same number
    of tokens from each, where that makes it fit (see the module docstring)."""
    n = len(unit["tokens"])
    if n <= window:
        return unit
    if not truncate:
        return None
    is_rejected = np.asarray(unit["rejected"]) == 1
    chosen, rejected = unit["tokens"][~is_rejected], unit["tokens"][is_rejected]
    m = min(len(chosen), len(rejected)) - 1  # each conversation keeps at least its last token
    differ = np.flatnonzero(chosen[:m] != rejected[:m])
    shared = int(differ[0]) if differ.size else max(m, 0)
    start = int(bos_id is not None and shared > 0 and chosen[0] == bos_id)
    cut = -(-(n - window) // 2)
    if cut > shared - start:
        return None
    keep = np.ones(n, bool)
    keep[start:start + cut] = False
    keep[len(chosen) + start:len(chosen) + start + cut] = False
    out = {k: np.asarray(v)[keep] for k, v in unit.items()}
    positions = [np.arange(len(chosen) - cut), np.arange(len(rejected) - cut)]
    out["pair_positions"] = np.concatenate(positions).astype(np.int32)
    return out


class _FitPair(gexp.FlatMapTransform):
    """A pair unit -> itself or its truncation where it fits a window (`fit_pair`), else nothing; logs both."""

    max_fan_out = 1

    def __init__(self, window: int, truncate: bool, bos_id: int | None):
        self.window, self.truncate, self.bos_id = window, truncate, bos_id
        self.truncated = self.dropped = 0

    def flat_map(self, unit: dict):
        fitted = fit_pair(unit, self.window, truncate=self.truncate, bos_id=self.bos_id)
        n = len(unit["tokens"])
        if fitted is None:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                how = "even with its shared prompt cut" if self.truncate else "and data.pair_overflow is 'drop'"
                log.warning("dropped a preference pair of %d tokens: rows hold seq_len + 1 = %d, a pair is packed "
                            "whole, %s (%d dropped so far in this stream)", n, self.window, how, self.dropped)
            return []
        if fitted is not unit:
            self.truncated += 1
            if self.truncated == 1 or self.truncated % 1000 == 0:
                log.warning("cut the start of a preference pair's shared prompt: %d -> %d tokens to fit rows of "
                            "seq_len + 1 = %d (%d cut so far in this stream)", n, len(fitted["tokens"]), self.window,
                            self.truncated)
        return [fitted]


class _ToPairRow(_ToRow):
    """A window of pair units -> a row: unit k's chosen tokens become segment 2k - 1, its rejected ones 2k."""

    def map(self, window: dict) -> dict:
        unit = np.asarray(window["tokens_segment_ids"], np.int32)
        segments = np.where(unit > 0, 2 * unit - 1 + np.asarray(window["rejected"]), 0).astype(np.int32)
        return super().map({**window, "tokens_segment_ids": segments, "tokens_positions": window["pair_positions"]})


def pack_pairs(units_ds: grain.IterDataset, seq_len: int, pad_id: int, *, num_bins: int = 16, seed: int = 0,
               extra: dict[str, Any] | None = None, truncate: bool = True,
               bos_id: int | None = None) -> grain.IterDataset:
    """`TokenizePair` units -> rows (ROW_KEYS, plus constant int32 `extra` fields): every pair whole in one row,
    packed first-fit; a unit longer than seq_len + 1 tokens is cut to fit (`truncate`, keeping a leading `bos_id`)
    or dropped (see the module docstring)."""
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    window = seq_len + 1
    packed = gexp.FirstFitPackIterDataset(gexp.FlatMapIterDataset(units_ds, _FitPair(window, truncate, bos_id)),
                                          length_struct={k: window for k in PAIR_FEATURES},
                                          num_packing_bins=num_bins, seed=seed, shuffle_bins=True)
    return packed.map(_ToPairRow(pad_id, extra))


def attention_mask(segment_ids: np.ndarray, causal: bool = True) -> np.ndarray:
    """[..., T] segment ids -> [..., T, T] bool: query i may attend key j. Same non-zero segment only
    (and j <= i when causal); this is the mask the model must build from a packed batch."""
    seg = np.asarray(segment_ids)
    mask = (seg[..., :, None] == seg[..., None, :]) & (seg[..., :, None] != 0)
    if causal:
        t = seg.shape[-1]
        mask &= np.tril(np.ones((t, t), dtype=bool))
    return mask
