"""`make_pipeline`: config -> sources -> (quality filter) -> shuffle -> tokenize -> pack -> phase mixture
-> per-process batches of numpy arrays.

Batch: dict of [local_batch, seq_len] arrays, local_batch = global_batch_size // process_count:
  inputs, targets, segment_ids, positions  int32;  loss_mask  float32   (see packing.py)
  source_id  int32 [local_batch]  only with with_source_ids=True (index into data.sources)

Train split: each source's index range minus its held-out tail, split between processes by stride
(process p reads documents p, p + P, ...), shuffled with a seed derived from (seed, phase, source)
and reshuffled every epoch, repeated without end; the iterator stops after the last bounded phase.
Same config + seed + process layout (and data.worker_processes) -> same batches.

Parallel reading: `data.read_threads` threads per source stream (default), or `data.worker_processes`
grain worker processes per phase (each worker reads a slice of every source; batches differ from the
single-process order but are just as deterministic and checkpointable). Prefetching the finished
batches in a thread (grain.experimental.ThreadPrefetchIterDataset over make_pipeline_dataset) keeps the
exact batches. Do not wrap the phased dataset itself in mp_prefetch: each worker would count its own
phase steps, multiplying the phase budgets by the number of workers.

Eval split: the held-out tail of each source that some phase weights (or of each `eval_sources` name;
the last max(1, eval_fraction * n) documents, at most eval_max_docs; for a filtered source, its base's
tail after filtering), unshuffled and finite: each source packed on its own ("concat" packing, whatever
data.packing says), sources in config order, the last batch padded with empty rows (segment_ids 0,
loss_mask 0). Every process builds the same global batches and takes its slice, so all
processes see the same number of eval steps.

Preference pairs (`pairs=True`, for DPO): every source is opened with pairs=True (sources.py: only the
kinds that hold pairs), each pair tokenized as one unit (packing.TokenizePair) and packed whole with
packing.pack_pairs, first-fit, in both splits: data.packing is not used, and `align` is refused for rows
where it would matter. A row's k-th pair is segments 2k - 1 (chosen) and 2k (rejected); a pair longer than a
row loses the start of its shared prompt or is dropped, as data.pair_overflow says; see packing.py.
Phases, mixtures, shuffling, the process split and eval padding are as above.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import grain
import numpy as np

from phi3_jax.data.config import DataSpec, SourceSpec, validate_data_config
from phi3_jax.data.errors import DataError
from phi3_jax.data.mixture import ChainIterDataset, PhasedIterDataset, derive_seed, mix_rows, steps_for_tokens
from phi3_jax.data.packing import ROW_KEYS, Alignment, Tokenize, TokenizePair, fit_pair, pack, pack_pairs
from phi3_jax.data.quality import make_scorer
from phi3_jax.data.sources import make_source
from phi3_jax.data.tokenizers import Tokenizer, make_tokenizer

_SCORERS: dict[tuple, object] = {}


def make_tokenizer_from_config(cfg) -> Tokenizer:
    """From the data config (uses its `tokenizer` section) or the tokenizer section itself."""
    if cfg is None:
        return make_tokenizer("byte")
    section = cfg.get("tokenizer", None) if "sources" in cfg or "phases" in cfg else cfg
    spec = validate_data_config({"sources": [{"name": "_"}], "phases": [{"tokens": 0}],
                                 "tokenizer": section if section is not None else {}})
    t = spec.tokenizer
    return make_tokenizer(t["kind"], t["path"] or None, chat_template=t["chat_template"] or None,
                          preset=t["preset"] or None)


def _scorer(quality: Mapping):
    key = tuple(sorted(quality.items()))
    if key not in _SCORERS:  # the logistic scorer trains at build time; train and eval share it
        _SCORERS[key] = make_scorer(quality["scorer"], **({} if quality["scorer"] == "heuristic" else {
            "model_path": quality["model_path"], "seed": quality["seed"], "train_docs": quality["train_docs"]}))
    return _SCORERS[key]


class _KeepIfQuality:
    def __init__(self, scorer, threshold: float):
        self.scorer, self.threshold = scorer, threshold

    def __call__(self, doc: dict) -> bool:
        return self.scorer.score(doc) >= self.threshold


class _Corpus:
    """Opened sources of one config (of preference pairs with `pairs`), and each one's train / eval index ranges."""

    def __init__(self, spec: DataSpec, pairs: bool = False):
        self.spec = spec
        self.raw: dict[str, object] = {}
        for s in spec.sources:
            if s.kind != "filtered":
                self.raw[s.name] = make_source(
                    s.kind, name=s.name, path=s.path, field=s.field, split=s.split, data_dir=s.data_dir,
                    num_docs=s.num_docs, textbook_seed=spec.textbook["seed"],
                    low_quality_fraction=spec.textbook["low_quality_fraction"], include_tests=s.include_tests,
                    pairs=pairs)
                if len(self.raw[s.name]):
                    self.raw[s.name][0]  # a record without the configured field fails now, not in a later phase

    def ranges(self, s: SourceSpec) -> tuple[range, range]:
        base = self.spec.source(s.base) if s.kind == "filtered" else s
        n = len(self.raw[base.name])
        if base.num_docs and base.kind not in ("textbook", "textbook_chat"):  # those two are num_docs long
            n = min(n, base.num_docs)
        frac = self.spec.eval_fraction
        n_eval = 0 if frac == 0 else min(self.spec.eval_max_docs, max(1, int(n * frac)))
        if n == 0:
            raise DataError(f"source {base.name!r} has no documents")
        if n - n_eval < 1:
            raise DataError(f"source {base.name!r} has {n} documents: too few to hold out {n_eval} for eval "
                            f"(set data.eval_fraction = 0)")
        return range(0, n - n_eval), range(n - n_eval, n)

    def documents(self, s: SourceSpec, split: str, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
        """The split's documents in index order; process p of P takes documents p, p + P, ..."""
        train, held_out = self.ranges(s)
        r = train if split == "train" else held_out
        base = self.spec.source(s.base) if s.kind == "filtered" else s
        ds = grain.MapDataset.source(self.raw[base.name])[r.start:r.stop][process_index::process_count]
        if s.kind == "filtered":
            threshold = s.threshold if s.threshold >= 0 else self.spec.quality["threshold"]
            keep = _KeepIfQuality(_scorer(self.spec.quality), threshold)
            # Training repeats its documents without end: with none kept it would search for ever. (A small
            # held-out tail may keep none; its eval stream is then empty.)
            probe = [ds[i] for i in range(min(len(ds), 64))] if split == "train" else []
            if probe and not any(keep(d) for d in probe):
                share = f" (process {process_index}'s share)" if process_count > 1 else ""
                raise DataError(f"source {s.name!r}: quality threshold {threshold} keeps none of the first "
                                f"{len(probe)} documents of {base.name!r}{share}; lower data.sources[].threshold")
            ds = ds.filter(keep)
        return ds


def source_documents(data_cfg, name: str, split: str = "train", *, pairs: bool = False) -> grain.MapDataset:
    """One configured source's documents (preference pairs with `pairs`) for a split, in index order, before
    shuffling (a filtered source holds None where a document was dropped). For inspection and tests."""
    spec = validate_data_config(data_cfg)
    if name not in [s.name for s in spec.sources]:
        raise DataError(f"{name!r} is not a source name ({[s.name for s in spec.sources]})")
    if split not in ("train", "eval"):
        raise DataError(f"split must be 'train' or 'eval', got {split!r}")
    return _Corpus(spec, pairs).documents(spec.source(name), split)


def _read_options(spec: DataSpec) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=spec.read_threads, prefetch_buffer_size=spec.prefetch_buffer)


def _check_args(seq_len, global_batch_size, seed, process_index, process_count, split):
    if split not in ("train", "eval"):
        raise DataError(f"split must be 'train' or 'eval', got {split!r}")
    if not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise DataError(f"seed must be a non-negative int, got {seed!r}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} out of range for process_count {process_count}")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise DataError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                        f"process_count {process_count}")
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")


def _check_pairs_fit(name: str, docs: grain.MapDataset, tok: TokenizePair, window: int, truncate: bool) -> None:
    """Training repeats its pairs without end: with none short enough to pack it would search for ever."""
    probe = [tok.map(d) for d in (docs[i] for i in range(min(len(docs), 64))) if d is not None]
    if probe and all(fit_pair(u, window, truncate=truncate, bos_id=tok.tokenizer.bos_id) is None for u in probe):
        shortest = min(len(u["tokens"]) for u in probe)
        how = " even with their shared prompts cut" if truncate else " (data.pair_overflow='drop')"
        raise DataError(f"source {name!r}: none of the first {len(probe)} preference pairs fits a row of seq_len + 1 = "
                        f"{window} tokens{how} (the shortest has {shortest}); a pair is packed whole: raise seq_len")


def phase_schedule(data_cfg, seq_len: int, global_batch_size: int) -> list[tuple[str, int, int | None]]:
    """[(phase name, first step, number of steps or None = unbounded)] — the steps each phase lasts."""
    spec = validate_data_config(data_cfg)
    out, start = [], 0
    for p in spec.phases:
        steps = steps_for_tokens(p.tokens, seq_len * global_batch_size)
        out.append((p.name, start, steps))
        start += steps or 0
    return out


def make_pipeline_dataset(data_cfg, tokenizer: Tokenizer, seq_len: int, global_batch_size: int, seed: int,
                          process_index: int = 0, process_count: int = 1, split: str = "train", *,
                          with_source_ids: bool = False, eval_sources: Sequence[str] | None = None,
                          align: Alignment | None = None, pairs: bool = False) -> grain.IterDataset:
    """The pipeline as a grain IterDataset (wrap it in grain prefetching if wanted); see make_pipeline."""
    spec = validate_data_config(data_cfg)
    _check_args(seq_len, global_batch_size, seed, process_index, process_count, split)
    if pairs and align is not None and seq_len > align.max_unaligned:
        raise DataError(f"preference pairs are packed first-fit, at any row offset, which this model's block-sparse "
                        f"attention allows only in rows of at most {align.max_unaligned} tokens: preference pairs "
                        f"on this model need seq_len <= {align.max_unaligned}")
    if spec.worker_processes:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain reads its absl flags when it starts workers
            flags.FLAGS.mark_as_parsed()
    corpus = _Corpus(spec, pairs)
    index = {s.name: i for i, s in enumerate(spec.sources)}
    tok = (TokenizePair if pairs else Tokenize)(tokenizer, add_bos=spec.add_bos)
    truncate_pairs = spec.pair_overflow == "truncate_prompt"
    local_batch = global_batch_size // process_count

    def rows(s: SourceSpec, docs: grain.MapDataset, pack_seed: int, method: str):
        extra = {"source_id": index[s.name]} if with_source_ids else None
        tokens = docs.map(tok).to_iter_dataset(_read_options(spec))
        if pairs:
            return pack_pairs(tokens, seq_len, tokenizer.pad_id, num_bins=spec.first_fit_bins, seed=pack_seed,
                              extra=extra, truncate=truncate_pairs, bos_id=tokenizer.bos_id)
        return pack(tokens, seq_len, tokenizer.pad_id, method=method, num_bins=spec.first_fit_bins,
                    seed=pack_seed, extra=extra, align=align)

    if split == "eval":
        names = list(eval_sources) if eval_sources else _weighted_sources(spec)
        for n in names:
            if n not in index:
                raise DataError(f"eval_sources: {n!r} is not a source name ({list(index)})")
        streams = [rows(spec.source(n), corpus.documents(spec.source(n), "eval"), 0, "concat") for n in names]
        batches = ChainIterDataset(streams).batch(global_batch_size, drop_remainder=False)
        return batches.map(_PadAndSlice(global_batch_size, process_index * local_batch, local_batch,
                                        tokenizer.pad_id))

    phases = []
    for pi, p in enumerate(spec.phases):
        streams, weights = [], []
        for name, w in p.weights:
            s = spec.source(name)
            docs = corpus.documents(s, "train", process_index, process_count)
            if len(docs) == 0:
                raise DataError(f"source {name!r} has fewer training documents than processes ({process_count})")
            if pairs:
                _check_pairs_fit(name, docs, tok, seq_len + 1, truncate_pairs)
            if spec.shuffle:
                docs = docs.shuffle(derive_seed(seed, pi, index[name]))
            streams.append(rows(s, docs.repeat(), derive_seed(seed, pi, index[name], 1), spec.packing))
            weights.append(w)
        batches = mix_rows(streams, weights).batch(local_batch, drop_remainder=True)
        if spec.worker_processes:
            # Workers run inside a phase, so the phase switch stays a step count in this process
            # (wrapping the whole phased dataset instead would make every worker count its own steps).
            batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=spec.worker_processes))
        phases.append((p.name, steps_for_tokens(p.tokens, seq_len * global_batch_size), batches))
    return PhasedIterDataset(phases)


def _weighted_sources(spec: DataSpec) -> list[str]:
    used = {n for p in spec.phases for n, _ in p.weights}
    return [s.name for s in spec.sources if s.name in used]


def eval_source_names(data_cfg) -> list[str]:
    """The sources an eval split holds by default: those some phase weights, in config order."""
    return _weighted_sources(validate_data_config(data_cfg))


class _PadAndSlice(grain.transforms.Map):
    """Pad a short final eval batch with empty rows to the global size, then take this process's rows."""

    def __init__(self, global_batch: int, start: int, local_batch: int, pad_id: int):
        self.global_batch, self.start, self.local_batch, self.pad_id = global_batch, start, local_batch, pad_id

    def map(self, batch: dict) -> dict:
        out = {}
        for k, v in batch.items():
            missing = self.global_batch - v.shape[0]
            if missing:
                fill = self.pad_id if k in ("inputs", "targets") else 0
                v = np.concatenate([v, np.full((missing,) + v.shape[1:], fill, dtype=v.dtype)])
            out[k] = v[self.start:self.start + self.local_batch]
        return out


def make_pipeline(data_cfg, tokenizer: Tokenizer, seq_len: int, global_batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1, split: str = "train", *,
                  with_source_ids: bool = False, eval_sources: Sequence[str] | None = None,
                  align: Alignment | None = None, pairs: bool = False) -> Iterator[dict]:
    """An iterator of this process's batches (numpy dicts; keys in the module docstring).

    Train iterators are grain DatasetIterators with get_state()/set_state() (checkpoint them with
    `grain.checkpoint.CheckpointSave`), plus `.step`, `.phase_index`, `.phase_name` for logging.
    `align`: where long documents may start in a row (block-sparse models; see packing.py).
    `pairs`: rows of preference pairs for DPO (see the module docstring).
    """
    return iter(make_pipeline_dataset(data_cfg, tokenizer, seq_len, global_batch_size, seed, process_index,
                                      process_count, split, with_source_ids=with_source_ids,
                                      eval_sources=eval_sources, align=align, pairs=pairs))


BATCH_KEYS = ROW_KEYS
