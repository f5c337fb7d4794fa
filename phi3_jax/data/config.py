"""The data config: `default_data_config()` (an ml_collections.ConfigDict) and its validation.

Fields (defaults in `default_data_config`):
  sources: list of dicts, each
    name           unique name; phases refer to it
    kind           textbook | textbook_chat | stdlib | text | jsonl | array_record | tfds | filtered
    path           file / directory / glob (text, jsonl, array_record); dataset name (tfds);
                   stdlib root override (stdlib; empty = this Python's)
    field          JSON / TFDS feature holding the text ("" for array_record = raw UTF-8 records); in a
                   JSON record (jsonl, array_record) it may hold a conversation instead: a list of
                   {"role", "content"} messages, trained on its assistant replies only (fine-tuning);
                   unused for preference pairs (make_pipeline(pairs=True)), which read the records'
                   "prompt", "chosen" and "rejected" (sources.py)
    weight         mixing weight used by phases that give no weights of their own
    split          TFDS split;   data_dir: TFDS data_dir
    num_docs       textbook, textbook_chat: corpus size (0 = 1,000,000); other kinds: use only the first num_docs (0 = all)
    base           filtered: the source it filters
    threshold      filtered: keep documents scoring >= threshold (< 0: quality.threshold)
    include_tests  stdlib: include the test suites
  phases: list of dicts, each
    name           for logs
    tokens         token budget: the phase lasts ceil(tokens / (global_batch_size * seq_len)) steps;
                   0 only on the last phase = until the run stops
    weights        {source name: weight}; empty = the sources' own `weight`s
  tokenizer: kind (byte | sentencepiece | hf | tiktoken), path, chat_template ("" = the kind's
    default), preset (tiktoken: phi3-small | generic)
  quality: scorer (heuristic | logistic | a registered name), threshold, model_path (logistic weights
    .npz; empty = train on the textbook generator's labels), train_docs, seed
  textbook: seed (content seed of textbook and textbook_chat, independent of the shuffle seed),
    low_quality_fraction
  packing (concat | first_fit), first_fit_bins, add_bos, shuffle,
  pair_overflow: a preference pair longer than a row: truncate_prompt (cut the start of the prompt its two
    conversations share until it fits, keeping the end) | drop (packing.py),
  eval_fraction / eval_max_docs (held-out tail of every source's index range),
  read_threads / prefetch_buffer (grain ReadOptions per source stream), worker_processes (grain worker
    processes per phase; 0 = none)
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping

import ml_collections

from phi3_jax.data.errors import DataError
from phi3_jax.data.packing import PACKING_METHODS, PAIR_OVERFLOW
from phi3_jax.data.sources import SOURCE_KINDS

SOURCE_DEFAULTS = dict(name="", kind="textbook", path="", field="text", weight=1.0, split="train", data_dir="",
                       num_docs=0, base="", threshold=-1.0, include_tests=False)
PHASE_DEFAULTS = dict(name="", tokens=0, weights={})
TOKENIZER_DEFAULTS = dict(kind="byte", path="", chat_template="", preset="")
QUALITY_DEFAULTS = dict(scorer="heuristic", threshold=0.5, model_path="", train_docs=2000, seed=1234)
TEXTBOOK_DEFAULTS = dict(seed=0, low_quality_fraction=0.2)
TOP_DEFAULTS = dict(packing="concat", first_fit_bins=16, add_bos=False, shuffle=True, pair_overflow="truncate_prompt",
                    eval_fraction=0.01, eval_max_docs=256, read_threads=2, prefetch_buffer=64, worker_processes=0)
_SECTIONS = {"tokenizer": TOKENIZER_DEFAULTS, "quality": QUALITY_DEFAULTS, "textbook": TEXTBOOK_DEFAULTS}


def default_data_config() -> ml_collections.ConfigDict:
    """Synthetic lessons plus the stdlib code corpus, then an annealing phase on quality-filtered
    lessons. Byte-level tokenizer, so nothing needs a file."""
    return ml_collections.ConfigDict({
        "sources": [
            {**SOURCE_DEFAULTS, "name": "textbook", "kind": "textbook", "weight": 0.8},
            {**SOURCE_DEFAULTS, "name": "stdlib", "kind": "stdlib", "weight": 0.2},
            {**SOURCE_DEFAULTS, "name": "textbook_hq", "kind": "filtered", "base": "textbook", "weight": 0.0},
        ],
        "phases": [
            {"name": "pretrain", "tokens": 50_000_000, "weights": {"textbook": 0.8, "stdlib": 0.2}},
            {"name": "anneal", "tokens": 0, "weights": {"textbook_hq": 0.8, "stdlib": 0.2}},
        ],
        **{k: dict(v) for k, v in _SECTIONS.items()},
        **TOP_DEFAULTS,
    })


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    name: str
    kind: str
    path: str
    field: str
    weight: float
    split: str
    data_dir: str
    num_docs: int
    base: str
    threshold: float
    include_tests: bool


@dataclasses.dataclass(frozen=True)
class PhaseSpec:
    name: str
    tokens: int
    weights: tuple[tuple[str, float], ...]  # (source name, weight > 0), config order


@dataclasses.dataclass(frozen=True)
class DataSpec:
    sources: tuple[SourceSpec, ...]
    phases: tuple[PhaseSpec, ...]
    tokenizer: Mapping[str, Any]
    quality: Mapping[str, Any]
    textbook: Mapping[str, Any]
    packing: str
    first_fit_bins: int
    add_bos: bool
    shuffle: bool
    pair_overflow: str
    eval_fraction: float
    eval_max_docs: int
    read_threads: int
    prefetch_buffer: int
    worker_processes: int

    def source(self, name: str) -> SourceSpec:
        return next(s for s in self.sources if s.name == name)


def _to_plain(x):
    if isinstance(x, ml_collections.ConfigDict):
        return x.to_dict()
    if isinstance(x, ml_collections.FieldReference):
        return x.get()
    return x


def _typed(value, default, where: str):
    value = _to_plain(value)
    kind = type(default)
    if kind in (int, float) and isinstance(value, numbers.Real) and not isinstance(value, bool):
        if kind is float:
            return float(value)
        if isinstance(value, numbers.Integral):  # numpy integers too
            return int(value)
    if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
        return value
    raise DataError(f"{where}: expected {kind.__name__}, got {type(value).__name__} ({value!r})")


def _fill(given, defaults: dict, where: str) -> dict:
    given = _to_plain(given)
    if not isinstance(given, Mapping):
        raise DataError(f"{where}: expected a dict of fields, got {type(given).__name__}")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise DataError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(sorted(defaults))})")
    return {k: _typed(given[k], d, f"{where}.{k}") if k in given else d for k, d in defaults.items()}


def validate_data_config(cfg) -> DataSpec:
    """Check every field's name, type and value; fill defaults. Errors name the field: `data.x.y`."""
    cfg = _to_plain(cfg)
    top_defaults = {"sources": [], "phases": [], **{k: {} for k in _SECTIONS}, **TOP_DEFAULTS}
    if not isinstance(cfg, Mapping):
        raise DataError(f"data: expected a ConfigDict or dict, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(top_defaults))
    if unknown:
        raise DataError(f"data.{unknown[0]}: unknown field (known: {', '.join(sorted(top_defaults))})")
    top = {k: _typed(cfg[k], d, f"data.{k}") if k in cfg and k in TOP_DEFAULTS else d
           for k, d in TOP_DEFAULTS.items()}
    sections = {k: _fill(cfg.get(k, {}), d, f"data.{k}") for k, d in _SECTIONS.items()}

    raw_sources = _to_plain(cfg.get("sources", []))
    if not isinstance(raw_sources, (list, tuple)) or not raw_sources:
        raise DataError("data.sources: expected a non-empty list of source dicts")
    sources = []
    for i, s in enumerate(raw_sources):
        f = _fill(s, SOURCE_DEFAULTS, f"data.sources[{i}]")
        where = f"data.sources[{i}]"
        if not f["name"]:
            raise DataError(f"{where}.name: every source needs a name")
        if f["kind"] not in SOURCE_KINDS:
            raise DataError(f"{where}.kind: unknown source kind {f['kind']!r}; known: {SOURCE_KINDS}")
        if f["weight"] < 0:
            raise DataError(f"{where}.weight: must be >= 0, got {f['weight']}")
        if f["num_docs"] < 0:
            raise DataError(f"{where}.num_docs: must be >= 0, got {f['num_docs']}")
        if f["kind"] in ("text", "jsonl", "array_record", "tfds") and not f["path"]:
            raise DataError(f"{where}.path: a {f['kind']} source needs a path")
        sources.append(SourceSpec(**f))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"data.sources: duplicate source name {dup!r}")
    for i, s in enumerate(sources):
        if s.kind == "filtered":
            if s.base not in names:
                raise DataError(f"data.sources[{i}].base: {s.base!r} is not a source name ({names})")
            if dict(zip(names, sources))[s.base].kind == "filtered":
                raise DataError(f"data.sources[{i}].base: cannot filter another filtered source ({s.base!r})")

    raw_phases = _to_plain(cfg.get("phases", []))
    if not isinstance(raw_phases, (list, tuple)) or not raw_phases:
        raise DataError("data.phases: expected a non-empty list of phase dicts")
    phases = []
    for i, p in enumerate(raw_phases):
        f = _fill(p, PHASE_DEFAULTS, f"data.phases[{i}]")
        where = f"data.phases[{i}]"
        if f["tokens"] < 0 or (f["tokens"] == 0 and i != len(raw_phases) - 1):
            raise DataError(f"{where}.tokens: must be > 0 (0 = unbounded is allowed only on the last phase)")
        weights = f["weights"] or {s.name: s.weight for s in sources}
        for name, w in weights.items():
            if name not in names:
                raise DataError(f"{where}.weights.{name}: not a source name ({names})")
            _typed(w, 1.0, f"{where}.weights.{name}")
            if w < 0:
                raise DataError(f"{where}.weights.{name}: must be >= 0, got {w}")
        kept = tuple((n, float(weights[n])) for n in names if weights.get(n, 0) > 0)
        if not kept:
            raise DataError(f"{where}.weights: no source has a positive weight")
        phases.append(PhaseSpec(name=f["name"] or f"phase{i + 1}", tokens=f["tokens"], weights=kept))

    if top["packing"] not in PACKING_METHODS:
        raise DataError(f"data.packing: unknown method {top['packing']!r}; known: {PACKING_METHODS}")
    if top["pair_overflow"] not in PAIR_OVERFLOW:
        raise DataError(f"data.pair_overflow: unknown value {top['pair_overflow']!r}; known: {PAIR_OVERFLOW}")
    if not 0.0 <= top["eval_fraction"] < 1.0:
        raise DataError(f"data.eval_fraction: must be in [0, 1), got {top['eval_fraction']}")
    for k in ("first_fit_bins", "eval_max_docs", "prefetch_buffer"):
        if top[k] < 1:
            raise DataError(f"data.{k}: must be >= 1, got {top[k]}")
    for k in ("read_threads", "worker_processes"):
        if top[k] < 0:
            raise DataError(f"data.{k}: must be >= 0, got {top[k]}")
    if not 0.0 <= sections["textbook"]["low_quality_fraction"] <= 1.0:
        raise DataError("data.textbook.low_quality_fraction: must be in [0, 1]")
    return DataSpec(sources=tuple(sources), phases=tuple(phases), **sections, **top)
