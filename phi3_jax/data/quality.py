"""Document quality scorers: `score(doc) -> float` in [0, 1], higher is better.

Two are built in:
- `HeuristicScorer`: text statistics — well-formed lines, repeated lines and spam markers, whether
  exercises come with worked answers, and whether stated arithmetic (`a + b = c`) is actually true (a false
  conclusion, "So a + b = c", scores 0).
- `LogisticScorer`: logistic regression on hashed word 1- and 2-grams, trained on labelled documents;
  `train_logistic_scorer_on_textbook` trains one on the synthetic generator's own quality labels.

Any object with `score(doc) -> float` plugs in: pass it to the pipeline, or `register_scorer` a factory
so a config can name it.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np

from phi3_jax.data.errors import DataError


class QualityScorer(Protocol):
    def score(self, doc: Mapping) -> float: ...


_SPAM_WORDS = ("click here", "subscribe", "buy now", "limited offer", "share this page", "!!!")
_EQUATION = re.compile(r"(\d+(?: [-+x] \d+)+) = (\d+)\b")
_CONCLUSION = re.compile(r"\bSo (\d+(?: [-+x] \d+)+) = (\d+)\b")
_DIVISION = re.compile(r"(\d+) / (\d+) = (\d+) remainder (\d+)")
_GOOD_END = tuple(".?!:;,)]}\"'`") + tuple("0123456789")


def _true(lhs: str, rhs: str) -> bool:
    terms = lhs.split(" ")
    value = int(terms[0])
    for op, operand in zip(terms[1::2], terms[2::2]):  # left to right, as the lessons write them
        value = {"+": value + int(operand), "-": value - int(operand), "x": value * int(operand)}[op]
    return value == int(rhs)


def _false_conclusion(text: str) -> bool:
    """Whether a worked solution concludes ("So a + b = c") with a false result: right steps to a wrong
    answer still teach the wrong answer."""
    return any(not _true(lhs, rhs) for lhs, rhs in _CONCLUSION.findall(text))


def _equations_ok(text: str) -> tuple[int, int]:
    """(number of checkable equations, number that are true)."""
    total = ok = 0
    for lhs, rhs in _EQUATION.findall(text):
        total += 1
        ok += _true(lhs, rhs)
    for a, b, q, r in _DIVISION.findall(text):
        total += 1
        ok += int(b) * int(q) + int(r) == int(a) and int(r) < int(b)
    return total, ok


class HeuristicScorer:
    """Hand-written text statistics; no training, works on any text (prose or code)."""

    name = "heuristic"

    def score(self, doc: Mapping) -> float:
        text = doc["text"]
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if not lines:
            return 0.0
        # Well-formed lines: start like a sentence or code, and sentences (6+ words) end with punctuation
        # or a value. Shuffled words break both ends; code inside fences is exempt.
        prose, in_code = [], False
        for ln in lines:
            if ln.startswith("```"):
                in_code = not in_code
            elif not in_code:
                prose.append(ln)
        formed = [ln[:1].isupper() or not ln[:1].isalpha() for ln in prose]
        formed = [f and (len(ln.split()) < 6 or ln.rstrip().endswith(_GOOD_END)) for f, ln in zip(formed, prose)]
        form_score = float(np.mean(formed)) if formed else 1.0
        # Repetition and spam: boilerplate lines repeated verbatim.
        dup_frac = 1.0 - len(set(lines)) / len(lines)
        lower = text.lower()
        spam_hits = sum(lower.count(w) for w in _SPAM_WORDS)
        spam_score = max(0.0, 1.0 - 2.0 * dup_frac) * (0.5 ** min(spam_hits, 4))
        # Worked answers: an exercise without a solution teaches little.
        n_ex = len(re.findall(r"^Exercise\b", text, re.M))
        n_ans = len(re.findall(r"^(Answer|Solution):", text, re.M))
        answer_score = 1.0 if n_ex == 0 else min(1.0, n_ans / n_ex)
        # Stated arithmetic must be true, and a conclusion above all.
        total, ok = _equations_ok(text)
        math_score = 0.0 if _false_conclusion(text) else 1.0 if total == 0 else (ok / total) ** 2
        return float(form_score**2 * spam_score * answer_score * math_score)


# ----------------------------------------------------------------------------------------- learned

_WORD = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")


def hashed_ngrams(text: str, num_features: int, max_n: int = 2) -> np.ndarray:
    """Sorted unique feature ids of the word 1..max_n-grams of `text` (crc32 hashing: stable across
    processes, unlike Python's salted hash())."""
    words = ["<s>"] + _WORD.findall(text.lower()) + ["</s>"]
    grams = set()
    for n in range(1, max_n + 1):
        for i in range(len(words) - n + 1):
            grams.add(" ".join(words[i:i + n]))
    ids = {zlib.crc32(g.encode()) % num_features for g in grams}
    return np.fromiter(sorted(ids), dtype=np.int64, count=len(ids))


class LogisticScorer:
    """P(good | hashed n-grams): a linear model over binary n-gram features, L2-normalised per doc."""

    name = "logistic"

    def __init__(self, weights: np.ndarray, bias: float, max_n: int = 2):
        self.weights = np.asarray(weights, dtype=np.float32)
        self.bias = float(bias)
        self.max_n = int(max_n)

    @property
    def num_features(self) -> int:
        return self.weights.shape[0]

    def score(self, doc: Mapping) -> float:
        ids = hashed_ngrams(doc["text"], self.num_features, self.max_n)
        z = self.bias + self.weights[ids].sum() / np.sqrt(max(len(ids), 1))
        return float(1.0 / (1.0 + np.exp(-z)))

    @classmethod
    def train(cls, texts: Sequence[str], labels: Sequence[float], *, num_features: int = 1 << 18,
              max_n: int = 2, steps: int = 300, lr: float = 2.0, l2: float = 1e-4) -> "LogisticScorer":
        """Full-batch gradient descent on the logistic loss (convex; deterministic)."""
        feats = [hashed_ngrams(t, num_features, max_n) for t in texts]
        y = np.asarray(labels, dtype=np.float64)
        if len(feats) == 0 or len(feats) != len(y):
            raise DataError(f"LogisticScorer.train needs as many labels as texts (got {len(feats)}, {len(y)})")
        counts = np.array([len(f) for f in feats])
        # Train over the features that occur (a few thousand), not all num_features hash buckets.
        used, flat = np.unique(np.concatenate(feats), return_inverse=True)
        doc_of = np.repeat(np.arange(len(feats)), counts)
        val = np.repeat(1.0 / np.sqrt(np.maximum(counts, 1)), counts)
        w, b = np.zeros(len(used)), 0.0
        for _ in range(steps):
            z = b + np.bincount(doc_of, weights=w[flat] * val, minlength=len(feats))
            err = 1.0 / (1.0 + np.exp(-z)) - y
            grad_w = np.bincount(flat, weights=err[doc_of] * val, minlength=len(used)) / len(y) + l2 * w
            w -= lr * grad_w
            b -= lr * err.mean()
        full = np.zeros(num_features)
        full[used] = w
        return cls(full, b, max_n)

    def save(self, path: str | Path) -> None:
        # npz of plain arrays: loadable with allow_pickle=False.
        np.savez(path, weights=self.weights, bias=np.float64(self.bias), max_n=np.int64(self.max_n))

    @classmethod
    def load(cls, path: str | Path) -> "LogisticScorer":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"quality model file not found: {path}")
        with np.load(path, allow_pickle=False) as z:
            return cls(z["weights"], float(z["bias"]), int(z["max_n"]))


def train_logistic_scorer_on_textbook(num_docs: int = 2000, seed: int = 1234,
                                      low_quality_fraction: float = 0.5, **kwargs) -> LogisticScorer:
    """Train on the generator's labelled documents (its own seed, so never the training corpus)."""
    from phi3_jax.data.textbook import TextbookSource

    src = TextbookSource(num_docs=num_docs, seed=seed, low_quality_fraction=low_quality_fraction)
    docs = [src[i] for i in range(num_docs)]
    return LogisticScorer.train([d["text"] for d in docs], [d["quality"] for d in docs], **kwargs)


# ---------------------------------------------------------------------------------------- registry

_FACTORIES: dict[str, Callable[..., QualityScorer]] = {}


def register_scorer(name: str, factory: Callable[..., QualityScorer]) -> None:
    """Make `name` usable as `data.quality.scorer` in a config; the pipeline calls
    factory(model_path=..., seed=..., train_docs=...) with the `data.quality` fields of those names."""
    _FACTORIES[name] = factory


def _make_logistic(model_path: str = "", seed: int = 1234, train_docs: int = 2000) -> QualityScorer:
    if model_path:
        return LogisticScorer.load(model_path)
    return train_logistic_scorer_on_textbook(num_docs=train_docs, seed=seed)


register_scorer("heuristic", lambda **_: HeuristicScorer())
register_scorer("logistic", _make_logistic)


def make_scorer(kind: str, **kwargs) -> QualityScorer:
    if kind not in _FACTORIES:
        raise DataError(f"unknown quality scorer {kind!r}; known: {sorted(_FACTORIES)}")
    return _FACTORIES[kind](**kwargs)


def scorer_names() -> list[str]:
    return sorted(_FACTORIES)
