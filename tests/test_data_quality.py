"""Quality scorers and the quality-filtered source a later phase can use."""

import numpy as np
import pytest

from phi3_jax.data import (DataError, HeuristicScorer, LogisticScorer, TextbookSource, default_data_config,
                           make_scorer, register_scorer, source_documents)
from phi3_jax.data.quality import train_logistic_scorer_on_textbook


@pytest.fixture(scope="module")
def held_out():
    src = TextbookSource(num_docs=600, seed=99, low_quality_fraction=0.5)  # not the scorer's training seed
    return [src[i] for i in range(600)]


@pytest.fixture(scope="module")
def logistic():
    return train_logistic_scorer_on_textbook(num_docs=800, seed=5)


def _accuracy(scorer, docs):
    return np.mean([(scorer.score(d) >= 0.5) == bool(d["quality"]) for d in docs])


def test_heuristic_scorer(held_out):
    h = HeuristicScorer()
    assert _accuracy(h, held_out) > 0.85
    for defect in ("no_solution", "spam"):  # missing worked answers and boilerplate are caught outright
        assert all(h.score(d) < 0.5 for d in held_out if d["defect"] == defect)
    # So is a wrong arithmetic result, even after right steps ("So a + b = c" false).
    wrong_sums = [d for d in held_out if d["defect"] == "wrong_answer" and d["topic"] == "arithmetic"]
    assert wrong_sums and all(h.score(d) < 0.5 for d in wrong_sums)
    steps_right_sum_wrong = ("Exercise 1: What is 15 + 17?\nSolution: 5 + 7 = 12; 1 + 1 + 1 = 3. So 15 + 17 = 33.\n"
                             "Answer: 33\n")
    assert h.score({"text": steps_right_sum_wrong}) == 0.0
    assert h.score({"text": steps_right_sum_wrong.replace("33", "32")}) == 1.0
    assert h.score({"text": ""}) == 0.0
    assert h.score({"text": "Exercise 1: What is 2 + 2?\nSolution: 2 + 2 = 5.\nAnswer: 5\n"}) < 0.5
    assert h.score({"text": "Exercise 1: What is 2 + 2?\nSolution: 2 + 2 = 4.\nAnswer: 4\n"}) == 1.0


def test_logistic_scorer(held_out, logistic, tmp_path):
    assert _accuracy(logistic, held_out) > 0.85
    scores = [logistic.score(d) for d in held_out[:50]]
    assert all(0.0 <= s <= 1.0 for s in scores)
    path = tmp_path / "q.npz"
    logistic.save(path)
    again = LogisticScorer.load(path)
    assert [again.score(d) for d in held_out[:50]] == pytest.approx(scores, abs=1e-6)
    with pytest.raises(DataError, match="quality model file not found"):
        LogisticScorer.load(tmp_path / "missing.npz")


def _kept(cfg, name, n=150):
    docs = source_documents(cfg, name, "train")
    return [d for d in (docs[i] for i in range(n)) if d is not None]


@pytest.mark.parametrize("scorer", ["heuristic", "logistic"])
def test_filtered_source_keeps_good_documents(scorer):
    cfg = default_data_config()
    cfg.sources[0]["num_docs"] = 2000
    cfg.textbook.low_quality_fraction = 0.4
    cfg.quality.scorer = scorer
    cfg.quality.train_docs = 800
    base, kept = _kept(cfg, "textbook"), _kept(cfg, "textbook_hq")
    assert len(base) == 150 and 60 < len(kept) < 150
    base_q = np.mean([d["quality"] for d in base])
    kept_q = np.mean([d["quality"] for d in kept])
    # Both scorers miss some wrong answers in prose (only arithmetic can be re-checked), so "kept" is
    # clearly better than the base, not perfect.
    assert base_q < 0.7 and kept_q > 0.8 and kept_q > base_q + 0.2, (base_q, kept_q)
    # A filtered source is a subset of its base, same indices.
    full = source_documents(cfg, "textbook", "train")
    filt = source_documents(cfg, "textbook_hq", "train")
    assert all(filt[i] is None or filt[i] == full[i] for i in range(40))


def test_scorer_registry():
    class Short:
        def score(self, doc):
            return 1.0 if len(doc["text"]) < 400 else 0.0

    register_scorer("short", lambda **_: Short())
    assert make_scorer("short").score({"text": "x"}) == 1.0
    cfg = default_data_config()
    cfg.quality.scorer = "short"
    assert all(len(d["text"]) < 400 for d in _kept(cfg, "textbook_hq", 60))
    with pytest.raises(DataError, match="unknown quality scorer 'magic'"):
        make_scorer("magic")
