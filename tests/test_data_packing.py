"""Packing: no token may attend across documents; segment ids, positions and loss mask follow the rule."""

import itertools

import grain
import numpy as np
import pytest

from phi3_jax.data import DataError, TextbookSource, attention_mask, make_tokenizer, pack
from phi3_jax.data.packing import Tokenize

SEQ = 64


def _docs(n=40):
    src = TextbookSource(num_docs=n, seed=1)
    # Mixed lengths: short snippets (several per row) and whole lessons (several rows each).
    return [{"text": src[i]["text"][: (25 if i % 3 == 0 else None)]} for i in range(n)]


def _rows(method, docs, tok, n_rows):
    ds = grain.MapDataset.source(docs).map(Tokenize(tok)).to_iter_dataset()
    rows = list(itertools.islice(pack(ds, SEQ, tok.pad_id, method=method, num_bins=4, seed=0), n_rows))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _check_row_invariants(b, eos, pad_id):
    seg, pos, mask = b["segment_ids"], b["positions"], b["loss_mask"]
    assert b["inputs"].dtype == b["targets"].dtype == seg.dtype == pos.dtype == np.int32
    assert mask.dtype == np.float32 and b["inputs"].shape == (len(seg), SEQ)
    for r in range(len(seg)):
        s, p = seg[r], pos[r]
        real = s > 0
        # Segments are numbered 1, 2, ... left to right; padding (0) only at the end.
        n_real = real.sum()
        assert real[:n_real].all() and not real[n_real:].any()
        assert s[0] == 1 and np.all(np.diff(s[:n_real]) >= 0) and np.all(np.diff(s[:n_real]) <= 1)
        # Positions restart at 0 with every segment and count up within it.
        starts = np.r_[True, s[1:] != s[:-1]] & real
        expect = np.zeros(SEQ, np.int64)
        for t in range(1, SEQ):
            expect[t] = 0 if starts[t] else expect[t - 1] + 1
        assert np.array_equal(p[real], expect[real]) and not p[~real].any()
        # An eos is the last token of its document: nothing follows it inside its segment, and its
        # target (the next document's first token) carries no loss.
        is_eos = (b["inputs"][r] == eos) & real
        nxt_same = np.r_[s[1:] == s[:-1], False]
        assert not (is_eos & nxt_same).any()
        assert not mask[r][is_eos].any()
        # The loss mask rule: 1 exactly where the target belongs to the same segment.
        assert not mask[r][~real].any() and np.all(b["inputs"][r][~real] == pad_id)
        assert np.all(mask[r][real & nxt_same] == 1)


@pytest.mark.parametrize("method", ["concat", "first_fit"])
def test_segments_positions_and_loss_mask(method):
    tok = make_tokenizer("byte")
    b = _rows(method, _docs(), tok, 30)
    _check_row_invariants(b, tok.eos_id, tok.pad_id)
    assert (b["segment_ids"].max(axis=1) > 1).any()  # rows really hold several documents
    if method == "first_fit":
        assert (b["segment_ids"] == 0).any()  # pieces are never split, so rows are padded


def test_concat_rows_are_the_document_stream_and_attention_stays_inside_documents():
    tok = make_tokenizer("byte")
    docs = _docs()
    ids = [tok.encode(d["text"]) + [tok.eos_id] for d in docs]
    stream = np.concatenate(ids)
    doc_of = np.repeat(np.arange(len(ids)), [len(x) for x in ids])
    n_rows = 20
    b = _rows("concat", docs, tok, n_rows)
    # Row r is the window stream[r*(SEQ+1) : (r+1)*(SEQ+1)], inputs = window[:-1], targets = window[1:].
    for r in range(n_rows):
        w = stream[r * (SEQ + 1):(r + 1) * (SEQ + 1)]
        assert np.array_equal(b["inputs"][r], w[:-1]) and np.array_equal(b["targets"][r], w[1:])
        # The attention mask built from segment ids only joins tokens of the same document.
        docs_r = doc_of[r * (SEQ + 1):(r + 1) * (SEQ + 1) - 1]
        m = attention_mask(b["segment_ids"][r])
        qi, kj = np.nonzero(m)
        assert np.all(docs_r[qi] == docs_r[kj])
        assert np.all(kj <= qi)
        # ... and joins every causal pair of the same document within the row.
        same_doc = (docs_r[:, None] == docs_r[None, :]) & np.tril(np.ones((SEQ, SEQ), bool))
        assert np.array_equal(m, same_doc)
        # Loss: exactly the targets that continue the same document.
        tgt_doc = doc_of[r * (SEQ + 1) + 1:(r + 1) * (SEQ + 1)]
        assert np.array_equal(b["loss_mask"][r] > 0, docs_r == tgt_doc)


def test_attention_mask_batched_and_padding():
    seg = np.array([[1, 1, 2, 2, 0], [1, 2, 3, 0, 0]])
    m = attention_mask(seg)
    assert m.shape == (2, 5, 5)
    assert m[0, 1, 0] and not m[0, 2, 1] and m[0, 3, 2] and not m[0, 4].any() and not m[0, :, 4].any()
    assert np.array_equal(m[1], np.diag([True, True, True, False, False]))
    assert attention_mask(seg, causal=False)[0, 0, 1]


def test_bad_packing_arguments():
    tok = make_tokenizer("byte")
    ds = grain.MapDataset.source(_docs(3)).map(Tokenize(tok)).to_iter_dataset()
    with pytest.raises(DataError, match="unknown packing method 'best'"):
        pack(ds, SEQ, tok.pad_id, method="best")
    with pytest.raises(DataError, match="seq_len"):
        pack(ds, 1, tok.pad_id)
