"""Preference pairs (DPO): pair records, textbook_chat pairs, and rows with pair k as segments 2k - 1 (chosen)
and 2k (rejected)."""

import itertools
import json
import logging
import re

import grain
import numpy as np
import pytest

from phi3_jax.data import (Alignment, DataError, TextbookChatSource, default_data_config, make_pipeline, make_source,
                           make_tokenizer)
from phi3_jax.data.packing import ROW_KEYS, TokenizePair, pack_pairs

SEQ, BATCH = 256, 4
CHAT_SEQ = 1024  # textbook_chat pairs are 300-1300 bytes
TOK = make_tokenizer("byte")
USER, REPLY = {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4.\nAnswer: 4"}
RECORDS = [  # TRL's forms: whole conversations; a prompt string and reply strings; prompt and reply messages
    {"chosen": [USER, REPLY], "rejected": [USER, {"role": "assistant", "content": "Answer: 5"}]},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven.", "topic": "colours"},
    {"prompt": [{"role": "system", "content": "Be brief."}, USER], "chosen": [REPLY],
     "rejected": [{"role": "assistant", "content": "I don't know."}]},
    {"chosen": [USER, REPLY, {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "6"}],
     "rejected": [USER, REPLY, {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "33"}]},
]


def _conversations(record):
    """The (chosen, rejected) conversations a record stands for."""
    prompt = record.get("prompt", [])
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tuple(prompt + ([{"role": "assistant", "content": record[k]}] if isinstance(record[k], str) else record[k])
                 for k in ("chosen", "rejected"))


def _jsonl_cfg(path, **top):
    cfg = default_data_config()
    cfg.sources = [{"name": "prefs", "kind": "jsonl", "path": str(path)}]
    cfg.phases = [{"name": "dpo", "tokens": 0}]
    cfg.eval_fraction, cfg.read_threads = 0.0, 0
    for k, v in top.items():
        cfg[k] = v
    return cfg


def _chat_cfg(num_docs=300, **top):
    cfg = default_data_config()
    cfg.sources = [{"name": "chat", "kind": "textbook_chat", "num_docs": num_docs}]
    cfg.phases = [{"name": "a", "tokens": 3 * CHAT_SEQ * BATCH}, {"name": "b", "tokens": 0}]
    cfg.read_threads = 0
    for k, v in top.items():
        cfg[k] = v
    return cfg


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _same(xs, ys):
    return len(xs) == len(ys) and all(np.array_equal(x[k], y[k]) for x, y in zip(xs, ys) for k in ROW_KEYS)


def _rows(batches):
    return [{k: b[k][r] for k in b} for b in batches for r in range(len(b["inputs"]))]


def _segment_tokens(row, s, window_last_in_segment):
    """Segment s's tokens and where they sit. The last token of a window is only a target, so a segment that
    reaches it has one token more than its inputs (window_last_in_segment says whether it does)."""
    (idx,) = np.nonzero(row["segment_ids"] == s)
    assert np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx))), "a segment is contiguous"
    ids = row["inputs"][idx].tolist() + ([int(row["targets"][idx[-1]])] if window_last_in_segment else [])
    return idx, ids


def _cut(pair, chosen_len):
    """An encoded pair ((ids, trained), (ids, trained)) whose chosen conversation has `chosen_len` tokens in a row:
    as it is, or with the same number of tokens cut from each conversation's start (after a leading bos)."""
    cut = len(pair[0][0]) - chosen_len
    if cut <= 0:
        return pair
    keep = int(pair[0][0][0] == TOK.bos_id)
    return tuple((ids[:keep] + ids[keep + cut:], tr[:keep] + tr[keep + cut:]) for ids, tr in pair)


def _check_pair_rows(rows, expected, encoded=None):
    """Every row obeys the pair convention, and each pair's segments are the chosen and rejected encode_chat ids
    of one of `expected` [(chosen, rejected)] (or of `encoded` [((ids, trained), (ids, trained))]). Returns the
    indices of the pairs seen."""
    encoded = encoded or [tuple(TOK.encode_chat(c) for c in pair) for pair in expected]
    seen = []
    for row in rows:
        seg, pos, mask = row["segment_ids"], row["positions"], row["loss_mask"]
        assert set(row) == set(ROW_KEYS) and row["inputs"].shape == seg.shape
        n_real = int((seg > 0).sum())
        assert (seg[:n_real] > 0).all() and not seg[n_real:].any(), "padding only at the end"
        assert not mask[n_real:].any() and not pos[n_real:].any() and (row["inputs"][n_real:] == TOK.pad_id).all()
        top = int(seg.max())
        assert top % 2 == 0 and np.array_equal(np.unique(seg[seg > 0]), np.arange(1, top + 1)), "whole pairs only"
        # Only the last segment of a full row can run into the window's last token.
        runs_on = n_real == len(seg) and row["targets"][-1] != TOK.pad_id
        for k in range(1, top // 2 + 1):
            halves = [(s, *_segment_tokens(row, s, runs_on and s == top)) for s in (2 * k - 1, 2 * k)]
            (_, _, chosen_ids), (_, _, rejected_ids) = halves
            matches = [i for i, pair in enumerate(encoded)
                       if [ids for ids, _ in _cut(pair, len(chosen_ids))] == [chosen_ids, rejected_ids]]
            assert matches, f"pair {k} of a row is not one of the records' conversations"
            seen.append(matches[0])
            assert halves[1][1][0] == halves[0][1][-1] + 1, "the rejected conversation follows its chosen one"
            for (s, idx, _), (_, trained) in zip(halves, _cut(encoded[matches[0]], len(chosen_ids))):
                assert np.array_equal(pos[idx], np.arange(len(idx))), "positions restart in every segment"
                # loss_mask[t] = target t in the same segment and trained: the next token's trained mark.
                want = np.array(trained[1:len(idx) + 1] + [0] * (len(idx) + 1 - len(trained)), np.float32)
                assert np.array_equal(mask[idx], want), f"segment {s} loss mask"
    return seen


def test_jsonl_pair_records_pack_by_the_convention(tmp_path):
    cfg = _jsonl_cfg(_write(tmp_path / "prefs.jsonl", RECORDS))
    src = make_source("jsonl", path=str(tmp_path / "prefs.jsonl"), pairs=True)
    doc = src[1]
    assert doc["chosen"] == [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    assert doc["text"] == "Name a colour.\n\nBlue." and doc["source"] == "jsonl" and doc["topic"] == "colours"
    expected = [_conversations(r) for r in RECORDS]
    assert [(src[i]["chosen"], src[i]["rejected"]) for i in range(len(src))] == expected
    rows = _rows(itertools.islice(make_pipeline(cfg, TOK, SEQ, BATCH, seed=0, pairs=True), 6))
    seen = _check_pair_rows(rows, expected)
    assert set(seen) == set(range(len(RECORDS))) and max(int(r["segment_ids"].max()) for r in rows) >= 4
    assert sum(r["loss_mask"].sum() for r in rows) > 0


def test_add_bos_is_per_conversation(tmp_path):
    cfg = _jsonl_cfg(_write(tmp_path / "prefs.jsonl", RECORDS), add_bos=True)
    row = _rows([next(make_pipeline(cfg, TOK, SEQ, BATCH, seed=0, pairs=True))])[0]
    starts = np.r_[True, row["segment_ids"][1:] != row["segment_ids"][:-1]] & (row["segment_ids"] > 0)
    assert (row["inputs"][starts] == TOK.bos_id).all() and starts.sum() >= 2


def test_textbook_chat_pairs_differ_only_in_the_last_answer():
    plain, pairs = TextbookChatSource(num_docs=400, seed=3), TextbookChatSource(num_docs=400, seed=3, pairs=True)
    again = TextbookChatSource(num_docs=400, seed=3, pairs=True)
    assert [pairs[i] for i in (7, 399, 0)] == [again[i] for i in (7, 399, 0)]  # deterministic in (seed, index)
    arithmetic = logic = 0
    for i in range(400):
        doc, conversation = pairs[i], plain[i]
        assert doc["chosen"] == conversation["messages"] and doc["text"] == conversation["text"]
        assert doc["source"] == "textbook_chat" and doc["audience"] == conversation["audience"]
        assert doc["rejected"][:-1] == doc["chosen"][:-1] and doc["rejected"][-1]["role"] == "assistant"
        question = doc["chosen"][-2]["content"]
        good, bad = doc["chosen"][-1]["content"], doc["rejected"][-1]["content"]
        steps, good_answer = good.rsplit("\nAnswer: ", 1)
        bad_steps, bad_answer = bad.rsplit("\nAnswer: ", 1)
        assert good_answer != bad_answer
        m = re.search(r"What is (\d+) ([-+x/]) (\d+)", question)
        if m:
            x, op, y = int(m[1]), m[2], int(m[3])
            right = {"+": x + y, "-": x - y, "x": x * y, "/": x // y}[op]
            number = re.compile(r"So .+ = (\d+)(.*)\.$")
            (g, g_rest), (b, b_rest) = number.search(steps).groups(), number.search(bad_steps).groups()
            assert int(g) == right and good_answer == f"{g}{g_rest}"
            assert int(b) != right and bad_answer == f"{b}{b_rest}" and g_rest == b_rest
            assert bad_steps == steps[:len(steps) - len(f"{g}{g_rest}.")] + f"{b}{b_rest}."  # same worked steps
            arithmetic += 1
        else:
            assert bad_steps == steps
            logic += 1
    assert arithmetic > 100 and logic > 50


@pytest.mark.parametrize("record,error", [
    ({"chosen": [USER, REPLY]}, r"bad.jsonl:2: no field 'rejected'"),
    ({"prompt": "hi", "rejected": "no"}, r"bad.jsonl:2: no field 'chosen'"),
    ({"chosen": "yes", "rejected": "no"}, r"bad.jsonl:2: field 'chosen' is a reply string, which needs a 'prompt'"),
    ({"chosen": [USER, REPLY], "rejected": "no"}, r"bad.jsonl:2: field 'rejected' is a reply string, which needs"),
    ({"chosen": [USER, REPLY], "rejected": [USER]},
     r"bad.jsonl:2: field 'rejected': the conversation must end with an assistant message; it ends with a user"),
    ({"chosen": [], "rejected": [USER, REPLY]}, r"bad.jsonl:2: field 'chosen': the conversation must end with an "
                                                r"assistant message; it is empty"),
    ({"prompt": "hi", "chosen": 3, "rejected": "no"},
     r"bad.jsonl:2: field 'chosen' must be a string \(the reply\) or a list of chat messages, got int"),
    ({"prompt": {"role": "user"}, "chosen": "a", "rejected": "b"},
     r"bad.jsonl:2: field 'prompt' must be a string or a list of chat messages, got dict"),
    ({"prompt": [{"role": "bot", "content": "hi"}], "chosen": "a", "rejected": "b"},
     r"bad.jsonl:2: field 'prompt': chat message 0: unknown role 'bot'"),
    ({"chosen": [USER, {"role": "assistant", "content": 4}], "rejected": [USER, REPLY]},
     r"bad.jsonl:2: field 'chosen': chat message 1: content must be str, got int"),
    ([USER, REPLY], r"bad.jsonl:2: expected a JSON object, got list"),
])
def test_malformed_pair_records_name_line_and_field(tmp_path, record, error):
    src = make_source("jsonl", path=str(_write(tmp_path / "bad.jsonl", [RECORDS[0], record])), pairs=True)
    assert src[0]["chosen"] == RECORDS[0]["chosen"]
    with pytest.raises(DataError, match=error):
        src[1]


def test_array_record_pairs(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = tmp_path / "prefs.array_record"
    w = ArrayRecordWriter(str(path), "group_size:1")
    for r in RECORDS + [{"prompt": "hi", "chosen": "a"}]:
        w.write(json.dumps(r).encode())
    w.close()
    src = make_source("array_record", path=str(path), pairs=True)  # no field needed
    assert [(src[i]["chosen"], src[i]["rejected"]) for i in range(len(RECORDS))] == [_conversations(r) for r in RECORDS]
    with pytest.raises(DataError, match=r"array_record record 4: no field 'rejected'"):
        src[4]


def _pair_of_length(n):
    """A pair of exactly n tokens (byte tokenizer: a reply's characters are its tokens)."""
    chosen, rejected = [USER, REPLY], [USER, {"role": "assistant", "content": ""}]
    missing = n - len(TOK.encode_chat(chosen)[0]) - len(TOK.encode_chat(rejected)[0])
    return chosen, [USER, {"role": "assistant", "content": "y" * missing}]


def test_a_pair_longer_than_a_row_is_dropped_with_a_warning(caplog):
    # A full window (seq_len + 1 tokens: its last token only a target) fits; one token more does not.
    pairs = [_conversations(r) for r in RECORDS[:2]] + [_pair_of_length(SEQ + 2), _pair_of_length(SEQ + 1)] + \
        [_conversations(r) for r in RECORDS[2:]]
    docs = [{"chosen": c, "rejected": r} for c, r in pairs]
    units = grain.MapDataset.source(docs).map(TokenizePair(TOK)).to_iter_dataset()
    with caplog.at_level(logging.WARNING, logger="phi3_jax.data.packing"):
        rows = list(pack_pairs(units, SEQ, TOK.pad_id, num_bins=2, seed=0, truncate=False))
    assert sorted(_check_pair_rows(rows, pairs)) == [0, 1, 3, 4, 5]
    full = [r for r in rows if (r["segment_ids"] > 0).all()]
    assert len(full) == 1 and full[0]["loss_mask"][-1] == 0 and full[0]["targets"][-1] == TOK.eos_id
    assert [m for m in caplog.messages if "preference pair" in m] == [
        "dropped a preference pair of 258 tokens: rows hold seq_len + 1 = 257, a pair is packed whole, and "
        "data.pair_overflow is 'drop' (1 dropped so far in this stream)"]


@pytest.mark.parametrize("add_bos", [False, True])
def test_a_pair_longer_than_a_row_loses_the_start_of_its_shared_prompt(caplog, add_bos):
    system = {"role": "system", "content": "Context: " + "the quick brown fox. " * 8}
    long_prompt = [system, {"role": "user", "content": "What is 2 + 2? Say it briefly."}]
    long_pair = (long_prompt + [REPLY], long_prompt + [{"role": "assistant", "content": "2 + 2 = 5.\nAnswer: 5"}])
    too_long = tuple([USER, {"role": "assistant", "content": c * 140}] for c in "xy")
    pairs = [_conversations(RECORDS[0]), long_pair, too_long, _conversations(RECORDS[1])]
    tok = TokenizePair(TOK, add_bos=add_bos)
    units = [tok.map({"chosen": c, "rejected": r}) for c, r in pairs]
    encoded = []
    for u in units:  # the units' conversations as (ids, trained) pairs, before any cut
        rej = u["rejected"] == 1
        encoded.append(tuple((u["tokens"][m].tolist(), u["trained"][m].tolist()) for m in (~rej, rej)))
    n_long = len(units[1]["tokens"])
    assert n_long > SEQ + 1 and len(units[2]["tokens"]) > SEQ + 1 and len(units[0]["tokens"]) <= SEQ + 1
    # Expected by hand: the same `cut` tokens leave each conversation, right after its bos where it has one.
    cut, keep = -(-(n_long - SEQ - 1) // 2), int(add_bos)
    (c_ids, c_tr), (r_ids, r_tr) = encoded[1]
    assert c_ids[:keep + cut] == r_ids[:keep + cut], "the cut lies in the shared prompt"
    encoded[1] = tuple((ids[:keep] + ids[keep + cut:], tr[:keep] + tr[keep + cut:])
                       for ids, tr in ((c_ids, c_tr), (r_ids, r_tr)))
    with caplog.at_level(logging.WARNING, logger="phi3_jax.data.packing"):
        rows = list(pack_pairs(grain.MapDataset.source(units).to_iter_dataset(), SEQ, TOK.pad_id, num_bins=2,
                               seed=0, bos_id=TOK.bos_id))
    assert sorted(_check_pair_rows(rows, None, encoded)) == [0, 1, 3]
    assert sum(len(ids) for ids, _ in encoded[1]) in (SEQ, SEQ + 1)
    assert encoded[1][0][0][-len(REPLY["content"]) - 2:] == c_ids[-len(REPLY["content"]) - 2:]
    if add_bos:
        assert encoded[1][0][0][0] == encoded[1][1][0][0] == TOK.bos_id
    assert [m for m in caplog.messages if "preference pair" in m] == [
        f"cut the start of a preference pair's shared prompt: {n_long} -> {n_long - 2 * cut} tokens to fit rows of "
        f"seq_len + 1 = 257 (1 cut so far in this stream)",
        f"dropped a preference pair of {len(units[2]['tokens'])} tokens: rows hold seq_len + 1 = 257, a pair is "
        f"packed whole, even with its shared prompt cut (1 dropped so far in this stream)"]


def test_pair_overflow_is_checked():
    with pytest.raises(DataError, match=r"data.pair_overflow: unknown value 'truncate'; known: "
                                        r"\('truncate_prompt', 'drop'\)"):
        make_pipeline(_chat_cfg(pair_overflow="truncate"), TOK, CHAT_SEQ, BATCH, seed=0, pairs=True)


def test_textbook_chat_pairs_truncated_to_short_rows():
    # Most textbook_chat pairs are longer than 512 tokens: truncated, nearly all of them fit; dropped, few do.
    seen = {}
    for overflow in ("truncate_prompt", "drop"):
        cfg = _chat_cfg(num_docs=40, pair_overflow=overflow, eval_fraction=0.5, eval_max_docs=20)
        rows = _rows(make_pipeline(cfg, TOK, 512, BATCH, seed=0, split="eval", pairs=True))
        seen[overflow] = sum(int(r["segment_ids"].max()) // 2 for r in rows)
    assert seen["truncate_prompt"] >= 18 and seen["drop"] <= 10, seen


def test_training_pairs_that_never_fit_a_row_are_an_error(tmp_path):
    # Training repeats its pairs without end: with none short enough it would search for ever.
    long_reply = "x" * SEQ
    cfg = _jsonl_cfg(_write(tmp_path / "long.jsonl", [{"prompt": "hi", "chosen": long_reply, "rejected": "no"}] * 3))
    with pytest.raises(DataError, match=r"source 'prefs': none of the first 3 preference pairs fits a row of "
                                        r"seq_len \+ 1 = 257 tokens"):
        make_pipeline(cfg, TOK, SEQ, BATCH, seed=0, pairs=True)


def test_determinism_and_state_resume():
    cfg = _chat_cfg()
    a = list(itertools.islice(make_pipeline(cfg, TOK, CHAT_SEQ, BATCH, seed=5, pairs=True), 6))
    b = list(itertools.islice(make_pipeline(cfg, TOK, CHAT_SEQ, BATCH, seed=5, pairs=True), 6))
    c = list(itertools.islice(make_pipeline(cfg, TOK, CHAT_SEQ, BATCH, seed=6, pairs=True), 6))
    assert _same(a, b) and not _same(a, c)
    it = make_pipeline(cfg, TOK, CHAT_SEQ, BATCH, seed=5, pairs=True)
    list(itertools.islice(it, 2))
    state = json.loads(json.dumps(it.get_state()))  # as grain's Orbax handler stores it
    expected = list(itertools.islice(it, 4))  # across the phase boundary (3 steps)
    fresh = make_pipeline(cfg, TOK, CHAT_SEQ, BATCH, seed=5, pairs=True)
    fresh.set_state(state)
    assert _same(list(itertools.islice(fresh, 4)), expected) and fresh.phase_name == "b"
    src = TextbookChatSource(num_docs=300, seed=0, pairs=True)
    _check_pair_rows(_rows(a), [(src[i]["chosen"], src[i]["rejected"]) for i in range(300)])


def test_eval_split_of_pairs_is_padded_and_whole():
    cfg = _chat_cfg(eval_fraction=0.05)
    batches = list(make_pipeline(cfg, TOK, CHAT_SEQ, BATCH, seed=0, split="eval", pairs=True))
    assert batches and all(b["inputs"].shape == (BATCH, CHAT_SEQ) for b in batches)
    src = TextbookChatSource(num_docs=300, seed=0, pairs=True)
    rows = [r for r in _rows(batches) if r["segment_ids"].any()]  # the last batch is padded with empty rows
    seen = _check_pair_rows(rows, [(src[i]["chosen"], src[i]["rejected"]) for i in range(300)])
    held_out = set(range(285, 300))
    long = {i for i in held_out if len(TokenizePair(TOK).map(src[i])["tokens"]) > CHAT_SEQ + 1}
    assert long and sorted(seen) == sorted(held_out), "every held-out pair, the long ones with their prompts cut"


@pytest.mark.parametrize("kind,extra", [("textbook", {}), ("stdlib", {}), ("text", {"path": "."})])
def test_pairs_from_a_source_kind_that_has_none_is_an_error(kind, extra):
    cfg = default_data_config()
    cfg.sources = [{"name": "docs", "kind": kind, **extra}]
    cfg.phases = [{"tokens": 0}]
    with pytest.raises(DataError, match=rf"source 'docs': a {kind} source cannot hold preference pairs; sources "
                                        r"of pairs are textbook_chat, jsonl, array_record, tfds, or filtered"):
        make_pipeline(cfg, TOK, SEQ, BATCH, seed=0, pairs=True)


def test_filtered_pairs_need_a_pair_base():
    cfg = default_data_config()  # textbook_hq filters the textbook source
    with pytest.raises(DataError, match="source 'textbook': a textbook source cannot hold preference pairs"):
        make_pipeline(cfg, TOK, SEQ, BATCH, seed=0, pairs=True)
    cfg = _chat_cfg()
    cfg.sources.append({"name": "chat_hq", "kind": "filtered", "base": "chat"})
    cfg.phases = [{"tokens": 0, "weights": {"chat_hq": 1.0}}]
    row = _rows([next(make_pipeline(cfg, TOK, CHAT_SEQ, BATCH, seed=0, pairs=True))])[0]
    assert row["segment_ids"].max() >= 2


def test_pairs_refuse_a_block_sparse_alignment(tmp_path):
    # First-fit places pairs at any offset; block-sparse rows longer than the dense window need aligned pieces.
    cfg = _jsonl_cfg(_write(tmp_path / "prefs.jsonl", RECORDS))
    with pytest.raises(DataError, match=r"preference pairs on this model need seq_len <= 200"):
        make_pipeline(cfg, TOK, SEQ, BATCH, seed=0, pairs=True, align=Alignment(64, 200))
    rows = _rows([next(make_pipeline(cfg, TOK, SEQ, BATCH, seed=0, pairs=True, align=Alignment(64, SEQ)))])
    _check_pair_rows(rows, [_conversations(r) for r in RECORDS])
