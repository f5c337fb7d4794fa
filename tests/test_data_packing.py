"""Packing: no token may attend across documents; segment ids, positions and loss mask follow the rule."""

import itertools

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi3_jax.data import Alignment, DataError, TextbookSource, attention_mask, make_tokenizer, pack
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


def _check_row_invariants(b, eos, pad_id, all_trained=True):
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
        # The loss mask rule: 1 exactly where the target belongs to the same segment (and is trained).
        assert not mask[r][~real].any() and np.all(b["inputs"][r][~real] == pad_id)
        assert np.all(mask[r][real & nxt_same] == 1) if all_trained else \
            not mask[r][:-1][(real & ~nxt_same)[:-1]].any()  # the last target's segment is outside the row


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


def _conversations(n=24):
    from phi3_jax.data.textbook import TextbookChatSource

    src, text = TextbookChatSource(num_docs=n, seed=2), TextbookSource(num_docs=n, seed=2)
    # Conversations between text documents: one stream mixes both kinds of document.
    return [src[i] if i % 2 else {"text": text[i]["text"][:90]} for i in range(n)]


@pytest.mark.parametrize("method", ["concat", "first_fit", "aligned"])
def test_conversations_train_on_the_replies_only(method):
    """A conversation's loss covers exactly its assistant replies (and their <|end|>), in every packing; the
    text documents packed beside it keep the loss on every next token."""
    tok = make_tokenizer("byte")
    docs = _conversations()
    align = Alignment(period=32, max_unaligned=20) if method == "aligned" else None
    ds = grain.MapDataset.source(docs).map(Tokenize(tok)).to_iter_dataset()
    rows = list(itertools.islice(pack(ds, SEQ, tok.pad_id, method="first_fit" if method == "first_fit" else "concat",
                                      num_bins=4, seed=0, align=align), 60))
    b = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    if method != "aligned":  # alignment pads inside rows; the invariants above assume padding at the end
        _check_row_invariants(b, tok.eos_id, tok.pad_id, all_trained=False)
    # Each document's tokens and trained flags from the tokenizer alone, as strings (byte ids < 320) to search.
    expected = []
    for d in docs:
        if "messages" in d:
            ids, trained = tok.encode_chat(d["messages"])
            assert ids[-1] == tok.eos_id and not trained[-1] and 0 < sum(trained) < len(ids)
        else:
            ids = tok.encode(d["text"]) + [tok.eos_id]
            trained = [1] * len(ids)
        expected.append(("".join(map(chr, ids)), trained))
    losses = {"reply": 0, "prompt": 0}
    for r in range(len(rows)):
        seg = b["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            at = np.nonzero(seg == s)[0]
            n, key = len(at), "".join(map(chr, b["inputs"][r][at]))
            got = b["loss_mask"][r][at].astype(int).tolist()
            options = []  # the loss each place this piece can come from gives it
            for text, tr in expected:
                o = text.find(key)
                while o >= 0:
                    # Inside the piece the target is the next token; the last input's target is the row's
                    # last window token, in the piece only when the document goes on there.
                    last = tr[o + n] if at[-1] == SEQ - 1 and o + n < len(text) else 0
                    options.append(list(tr[o + 1:o + n]) + [last])
                    o = text.find(key, o + 1)
            assert options, f"row {r} segment {s} is not a run of any document"
            assert got in options, (r, s)
            losses["reply"] += sum(got)
            losses["prompt"] += got.count(0)
    assert losses["reply"] and losses["prompt"]


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


# ---- alignment for block-sparse models --------------------------------------------------------------------

ALIGN = Alignment(period=8, max_unaligned=5)  # e.g. blocks of 4 tokens, stride 2, 2 local blocks


def _random_docs(n=200, seed=0):
    """Unique documents of 2-5, 6-39 and 40-199 tokens, ids >= 2, each ending with eos = 1."""
    rng = np.random.RandomState(seed)
    docs = []
    for _ in range(n):
        length = int(rng.choice([rng.randint(2, 6), rng.randint(6, 40), rng.randint(40, 200)]))
        t = rng.randint(2, 250, length).astype(np.int32)
        t[-1] = 1
        docs.append({"tokens": t})
    return docs


def _packed(docs, align, n_rows=60, seq=SEQ):
    ds = grain.MapDataset.source(docs).to_iter_dataset()
    rows = list(itertools.islice(pack(ds, seq, 0, align=align), n_rows))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _pieces(seg_row):
    """(start, length) of each segment in a row."""
    ids = np.unique(seg_row[seg_row > 0])
    return [(int(np.argmax(seg_row == s)), int((seg_row == s).sum())) for s in ids]


def test_aligned_pieces_see_their_own_block_sparse_pattern():
    from pallas_kernels.blocksparse import Layout

    layout = Layout(block_size=4, local_blocks=2, vert_stride=2, num_heads=2)
    b = _packed(_random_docs(), ALIGN)
    seg, pos = b["segment_ids"], b["positions"]
    for r in range(len(seg)):
        for start, length in _pieces(seg[r]):
            assert start % ALIGN.period == 0 or length <= ALIGN.max_unaligned, (r, start, length)
            assert np.array_equal(pos[r, start:start + length], np.arange(length))  # contiguous, from 0

    def masks(b):  # the kernels' pattern (row positions) and each document's own (its positions)
        same = jnp.asarray(attention_mask(b["segment_ids"]))[:, None]
        rows = jnp.arange(SEQ)
        by_row = layout.token_mask(rows, rows)[None] & same
        by_doc = jax.vmap(lambda p: layout.token_mask(p, p))(jnp.asarray(b["positions"])) & same
        return np.asarray(by_row), np.asarray(by_doc)

    by_row, by_doc = masks(b)
    assert np.array_equal(by_row, by_doc)
    by_row, by_doc = masks(_packed(_random_docs(), None))
    assert not np.array_equal(by_row, by_doc)  # without alignment long documents see a shifted pattern

    # Padding only before long pieces, less than a period each; segments numbered 1, 2, ... with no gaps.
    assert 0 < (seg == 0).mean() < 0.1
    for r in range(len(seg)):
        ids = np.unique(seg[r][seg[r] > 0])
        assert np.array_equal(ids, np.arange(1, len(ids) + 1))
        assert not b["loss_mask"][r][seg[r] == 0].any() and np.all(b["inputs"][r][seg[r] == 0] == 0)


def test_aligned_packing_keeps_every_document_whole_and_moves_only_short_ones_ahead():
    docs = _random_docs()
    b = _packed(docs, ALIGN)
    # The stream without its padding: each window's inputs plus its last target, the padding dropped.
    stream = np.concatenate([np.r_[b["inputs"][r][b["segment_ids"][r] > 0],
                                   b["targets"][r][-1:][b["targets"][r][-1:] > 0]] for r in range(len(b["inputs"]))])
    ends = np.nonzero(stream == 1)[0]
    got = np.split(stream, ends + 1)[:-1]
    index = {tuple(d["tokens"]): i for i, d in enumerate(docs)}
    order = [index[tuple(g)] for g in got]  # KeyError: a document was cut or merged
    assert len(set(order)) == len(order) and len(order) > 30
    assert set(range(min(set(range(len(docs))) - set(order)))) <= set(order)  # none skipped
    for a, i in enumerate(order):
        for j in order[a + 1:]:
            if j < i:  # i overtook the long document j that waited for an aligned offset
                assert len(docs[i]["tokens"]) <= ALIGN.max_unaligned < len(docs[j]["tokens"])
    assert order != sorted(order)


def test_aligned_packing_resumes_from_any_state():
    docs = _random_docs(seed=1)

    def fresh():
        return iter(pack(grain.MapDataset.source(docs).to_iter_dataset(), SEQ, 0, align=ALIGN))

    it, states, rows = fresh(), [], []
    for _ in range(30):
        states.append(it.get_state())
        rows.append(next(it))
    for i in range(0, 30, 4):
        again = fresh()
        again.set_state(states[i])
        for j in range(i, min(i + 6, 30)):
            row = next(again)
            assert all(np.array_equal(row[k], rows[j][k]) for k in row), (i, j)


def test_aligned_documents_state_replays_at_most_one_gap():
    # Only long documents: each one waits for an aligned offset. The state must still point close behind
    # the stream (a resume replays `since` elements), not back to the first document.
    from phi3_jax.data.packing import _AlignedDocuments

    docs = [d for d in _random_docs(400, seed=2) if len(d["tokens"]) > ALIGN.max_unaligned]
    it = iter(_AlignedDocuments(grain.MapDataset.source(docs).to_iter_dataset(), SEQ + 1, ALIGN))
    out, since = [], []
    for _ in range(len(docs)):
        out.append(next(it))
        since.append(it.get_state()["since"])
    assert max(since) <= 2 and sum(e["tokens"][0] == -1 for e in out) > 20  # many gaps, short replays


def test_alignment_refuses_first_fit():
    ds = grain.MapDataset.source(_random_docs(5)).to_iter_dataset()
    with pytest.raises(DataError, match="data.packing='concat'"):
        pack(ds, SEQ, 0, method="first_fit", align=ALIGN)
    pack(ds, ALIGN.max_unaligned, 0, method="first_fit", align=ALIGN)  # rows too short for any long piece
