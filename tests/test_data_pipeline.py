"""The pipeline end to end: phases, mixture shares, determinism, checkpointed state, processes, eval."""

import itertools
import json
import re

import numpy as np
import pytest

from phi3_jax.data import (Alignment, DataError, TextbookSource, default_data_config, make_pipeline, make_tokenizer,
                           phase_schedule, source_documents, unigram_entropy)

SEQ, BATCH = 64, 8
TPS = SEQ * BATCH  # tokens per step
TOK = make_tokenizer("byte")


def _cfg(phases=None, **top):
    cfg = default_data_config()
    cfg.sources[0]["num_docs"] = 3000  # textbook
    cfg.phases = phases or [
        {"name": "a", "tokens": 3 * TPS + 1, "weights": {"textbook": 0.7, "stdlib": 0.3}},  # 4 steps
        {"name": "b", "tokens": 2 * TPS, "weights": {"textbook_hq": 1.0}},
    ]
    for k, v in top.items():
        cfg[k] = v
    cfg.read_threads = 0  # no read-ahead threads: tests stay light on 2 cores
    return cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(xs, ys):
    return len(xs) == len(ys) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                      for x, y in zip(xs, ys))


def test_batch_format():
    b = next(make_pipeline(_cfg(), TOK, SEQ, BATCH, seed=0))
    assert set(b) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    for k, v in b.items():
        assert v.shape == (BATCH, SEQ) and v.dtype == (np.float32 if k == "loss_mask" else np.int32)
    assert b["inputs"].max() < TOK.vocab_size and 0.5 < b["loss_mask"].mean() <= 1.0


def test_phase_boundaries_follow_token_budgets():
    cfg = _cfg()
    assert phase_schedule(cfg, SEQ, BATCH) == [("a", 0, 4), ("b", 4, 2)]
    it = make_pipeline(cfg, TOK, SEQ, BATCH, seed=0, with_source_ids=True)
    seen = []
    for b in it:
        seen.append((it.phase_name, set(b["source_id"].tolist())))
    assert [p for p, _ in seen] == ["a"] * 4 + ["b"] * 2  # then the iterator ends
    assert all(s <= {0, 1} for _, s in seen[:4]) and all(s == {2} for _, s in seen[4:])


def test_mixture_shares_match_weights():
    # Each phase's token shares within 1% (relative) of its weights: a budgeted phase, then an unbounded one.
    phases = [{"name": "a", "tokens": 40 * 16 * SEQ, "weights": {"textbook": 0.7, "stdlib": 0.3}},
              {"name": "b", "tokens": 0, "weights": {"textbook": 0.6, "stdlib": 0.3, "textbook_hq": 0.1}}]
    it = make_pipeline(_cfg(phases), TOK, SEQ, 16, seed=0, with_source_ids=True)
    tokens = {"a": np.zeros(3), "b": np.zeros(3)}
    for b in itertools.islice(it, 100):
        np.add.at(tokens[it.phase_name], b["source_id"], (b["segment_ids"] > 0).sum(axis=1))
    for phase in phases:
        t = tokens[phase["name"]]
        assert t.sum() > 0.9 * 16 * SEQ * (40 if phase["name"] == "a" else 60), phase["name"]
        share = t / t.sum()
        want = np.array([phase["weights"].get(n, 0.0) for n in ("textbook", "stdlib", "textbook_hq")])
        np.testing.assert_allclose(share, want, rtol=0.01, atol=1e-12, err_msg=phase["name"])


def test_same_seed_same_batches_different_seed_different():
    cfg = _cfg()
    a = _take(make_pipeline(cfg, TOK, SEQ, BATCH, seed=3), 5)
    b = _take(make_pipeline(cfg, TOK, SEQ, BATCH, seed=3), 5)
    c = _take(make_pipeline(cfg, TOK, SEQ, BATCH, seed=4), 5)
    assert _same(a, b) and not _same(a, c)


@pytest.mark.parametrize("packing,align", [("concat", None), ("first_fit", None), ("concat", Alignment(16, 9))])
def test_state_restore_continues_identically(packing, align):
    cfg = _cfg(packing=packing)
    it = make_pipeline(cfg, TOK, SEQ, BATCH, seed=0, align=align)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # as grain's Orbax handler stores it
    expected = list(it)  # 3 more in phase a, 2 in phase b
    assert len(expected) == 3
    fresh = make_pipeline(cfg, TOK, SEQ, BATCH, seed=0, align=align)
    fresh.set_state(state)
    assert fresh.step == 3 and _same(list(fresh), expected)
    if align is not None:  # a block-sparse model's rows: long pieces at multiples of 16, padding between
        seg = np.concatenate([b["segment_ids"] for b in expected])
        assert (seg == 0).any()
        for row in seg:
            for s in np.unique(row[row > 0]):
                (idx,) = np.nonzero(row == s)
                assert idx[0] % align.period == 0 or len(idx) <= align.max_unaligned


def test_state_restore_at_phase_boundary():
    cfg = _cfg()
    it = make_pipeline(cfg, TOK, SEQ, BATCH, seed=0)
    _take(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    expected = list(it)
    fresh = make_pipeline(cfg, TOK, SEQ, BATCH, seed=0)
    fresh.set_state(state)
    got = list(fresh)
    assert len(got) == 2 and _same(got, expected) and fresh.phase_name == "b"
    other = _cfg([{"name": "x", "tokens": 0}])
    with pytest.raises(DataError, match="state is for phases"):
        make_pipeline(other, TOK, SEQ, BATCH, seed=0).set_state(state)


def test_processes_get_disjoint_slices_of_the_global_batch(tmp_path):
    cfg = _cfg()
    parts = [_take(make_pipeline(cfg, TOK, SEQ, BATCH, seed=0, process_index=p, process_count=2,
                                 with_source_ids=True), 4) for p in range(2)]
    for p0, p1 in zip(*parts):
        assert p0["inputs"].shape == (BATCH // 2, SEQ)
        assert np.array_equal(p0["source_id"], p1["source_id"])  # the same source in each row slot
    with pytest.raises(DataError, match="multiple of process_count"):
        make_pipeline(cfg, TOK, SEQ, 7, seed=0, process_count=2)

    # Documents that name themselves: process p reads training documents p, p + 2, ... and no other.
    path = tmp_path / "numbered.jsonl"
    path.write_text("".join(json.dumps({"text": f"<doc {i:03d}> " * 3}) + "\n" for i in range(60)))
    numbered = default_data_config()
    numbered.sources = [{"name": "numbered", "kind": "jsonl", "path": str(path)}]
    numbered.phases = [{"name": "only", "tokens": 0, "weights": {"numbered": 1.0}}]
    numbered.read_threads = 0
    train = {int(d["text"][5:8]) for d in source_documents(numbered, "numbered", "train")}
    assert 50 <= len(train) < 60  # the held-out tail is not read

    def seen(**kw):
        it = make_pipeline(numbered, TOK, SEQ, BATCH, seed=0, **kw)
        rows = [TOK.decode(row) for b in _take(it, 12) for row in b["inputs"]]
        return {int(m) for row in rows for m in re.findall(r"<doc (\d+)>", row)}

    by_process = [seen(process_index=p, process_count=2) for p in range(2)]
    for p, got in enumerate(by_process):
        assert got == {i for i in train if i % 2 == p}, p  # 12 steps read each process's half in full
    assert seen() == train


def test_state_through_json_with_nothing_held_over_drops_no_document():
    # At step 0 no stream holds a piece over; grain marks that with a tuple, which JSON makes a list.
    cfg = _cfg()
    want = _take(make_pipeline(cfg, TOK, SEQ, BATCH, seed=0), 3)
    it = make_pipeline(cfg, TOK, SEQ, BATCH, seed=0)
    state = json.loads(json.dumps(it.get_state()))
    _take(it, 2)
    it.set_state(state)
    assert _same(_take(it, 3), want)
    assert want[0]["segment_ids"][0, 0] == 1  # the first row starts with the first document, not the second


def test_a_filtered_source_that_keeps_nothing_in_a_process_share_says_so(tmp_path):
    # Only document 0 passes the filter: process 1's share (documents 1, 3, ...) would search for ever.
    good = "Title: Notes\n\nThis is a well formed sentence about numbers.\n"
    spam = "CLICK HERE to subscribe!!!\nCLICK HERE to subscribe!!!\nbuy now buy now\n"
    path = tmp_path / "f.jsonl"
    path.write_text("".join(json.dumps({"text": good if i == 0 else spam}) + "\n" for i in range(10)))
    cfg = default_data_config()
    cfg.sources = [{"name": "j", "kind": "jsonl", "path": str(path), "weight": 0.0},
                   {"name": "hq", "kind": "filtered", "base": "j"}]
    cfg.phases = [{"tokens": 0, "weights": {"hq": 1.0}}]
    cfg.eval_fraction = 0.0
    assert next(make_pipeline(cfg, TOK, 32, 2, seed=0, process_index=0, process_count=2))["inputs"].shape == (1, 32)
    with pytest.raises(DataError, match=r"source 'hq': quality threshold 0.5 keeps none of the first 5 documents "
                                        r"of 'j' \(process 1's share\)"):
        make_pipeline(cfg, TOK, 32, 2, seed=0, process_index=1, process_count=2)
    # The held-out tail may keep nothing: its eval stream is empty, not an error.
    cfg.eval_fraction = 0.1
    assert list(make_pipeline(cfg, TOK, 32, 2, seed=0, split="eval", eval_sources=["hq"])) == []


def test_a_later_phase_source_without_its_field_fails_when_the_pipeline_is_built(tmp_path):
    path = tmp_path / "later.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    cfg = _cfg([{"name": "a", "tokens": TPS, "weights": {"textbook": 1.0}},
                {"name": "b", "tokens": 0, "weights": {"later": 1.0}}])
    cfg.sources = list(cfg.sources) + [{"name": "later", "kind": "jsonl", "path": str(path)}]
    cfg.eval_fraction = 0.0
    with pytest.raises(DataError, match=r"later\.jsonl:1: no field 'text' \(fields: \['body'\]\)"):
        make_pipeline(cfg, TOK, SEQ, BATCH, seed=0)


def test_eval_split_is_held_out_finite_and_padded():
    cfg = _cfg()
    cfg.sources[0]["num_docs"] = 200
    cfg.eval_fraction = 0.05  # textbook: documents 190..199; stdlib: its last max(1, 5%) files
    held_out = source_documents(cfg, "textbook", "eval")
    assert len(held_out) == 10 and len(source_documents(cfg, "textbook", "train")) == 190
    assert held_out[0] == TextbookSource(num_docs=200, seed=0, low_quality_fraction=0.2)[190]
    batches = list(make_pipeline(cfg, TOK, SEQ, BATCH, seed=0, split="eval", eval_sources=["textbook"]))
    first = TOK.decode(batches[0]["inputs"][0])
    assert held_out[0]["text"].startswith(first)
    assert all(b["inputs"].shape == (BATCH, SEQ) for b in batches)
    assert (batches[-1]["segment_ids"] == 0).any()  # the last batch is padded, not dropped
    total = sum(int(b["loss_mask"].sum()) for b in batches)
    expected = sum(len(TOK.encode(held_out[i]["text"])) for i in range(10))  # every next-token target
    assert expected - len(batches) * BATCH <= total <= expected
    again = list(make_pipeline(cfg, TOK, SEQ, BATCH, seed=5, split="eval", eval_sources=["textbook"]))
    assert _same(batches, again)  # eval ignores the seed: fixed order
    # Two processes see the same number of eval steps.
    p = [list(make_pipeline(cfg, TOK, SEQ, BATCH, seed=0, split="eval", process_index=i, process_count=2,
                            eval_sources=["textbook"])) for i in range(2)]
    assert len(p[0]) == len(p[1]) == len(batches)
    assert np.array_equal(np.concatenate([p[0][0]["inputs"], p[1][0]["inputs"]]), batches[0]["inputs"])
    # By default eval covers every source some phase uses, each packed on its own.
    ids = {int(i) for b in make_pipeline(cfg, TOK, SEQ, BATCH, seed=0, split="eval", with_source_ids=True)
           for i in b["source_id"][b["segment_ids"].max(axis=1) > 0]}
    assert ids == {0, 1, 2}


def test_unigram_entropy():
    assert unigram_entropy(np.array([0, 1, 2, 3] * 10), unit="bits") == pytest.approx(2.0)
    assert unigram_entropy([5, 5, 5]) == 0.0
    h = unigram_entropy(make_pipeline(_cfg(), TOK, SEQ, BATCH, seed=0), num_batches=6, unit="bits")
    assert 3.0 < h < 6.0  # bytes of English and code
    assert unigram_entropy(make_pipeline(_cfg(), TOK, SEQ, BATCH, seed=0), num_batches=6) == pytest.approx(h * np.log(2))


def test_grain_checkpoint_handler_and_thread_prefetch(tmp_path):
    """The iterator saves/restores through grain's Orbax handler; thread prefetching keeps the batches."""
    import grain
    from etils import epath

    from phi3_jax.data import make_pipeline_dataset

    cfg = _cfg()
    cfg.read_threads = 2  # read-ahead threads must not change order or state
    it = make_pipeline(cfg, TOK, SEQ, BATCH, seed=0)
    first = _take(it, 2)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), item=it)
    expected = list(it)
    restored = handler.restore(epath.Path(tmp_path), item=make_pipeline(cfg, TOK, SEQ, BATCH, seed=0))
    assert _same(list(restored), expected)
    ds = make_pipeline_dataset(cfg, TOK, SEQ, BATCH, seed=0)
    prefetched = iter(grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=2))
    assert _same(list(prefetched), first + expected)


@pytest.mark.slow
def test_worker_processes_are_deterministic_and_restorable():
    cfg = _cfg(worker_processes=2)
    it = make_pipeline(cfg, TOK, SEQ, BATCH, seed=0, with_source_ids=True)
    head = _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    tail = list(it)
    assert len(tail) == 3 and all(set(b["source_id"].tolist()) == {2} for b in tail[1:])
    again = make_pipeline(cfg, TOK, SEQ, BATCH, seed=0, with_source_ids=True)
    assert _same(_take(again, 3), head)
    restored = make_pipeline(cfg, TOK, SEQ, BATCH, seed=0, with_source_ids=True)
    restored.set_state(state)
    assert _same(list(restored), tail)
    for i in (it, again, restored):
        i.close()
