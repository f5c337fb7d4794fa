"""Document sources with random access by index (grain's RandomAccessDataSource protocol).

Every source returns dicts with at least "text" and "source"; "topic" and "audience" where known. A
conversation (a JSON field holding a list of {"role", "content"} messages, or the textbook_chat kind) also
has "messages": the pipeline renders it with the tokenizer's chat template and trains only on the
assistant's replies (supervised fine-tuning); its "text" is the contents, for quality scorers.
Kinds: textbook (synthetic, `textbook.py`), textbook_chat (synthetic tutoring conversations), stdlib (this Python's standard library as a code corpus),
text (one document per file), jsonl (one document per line, text in `field`), array_record (one
document per record: UTF-8 text, or JSON with `field`), tfds (`tfds.data_source`, array_record format,
no TensorFlow needed). The "filtered" kind (a quality-filtered view of another source) is built by the
pipeline, which owns the scorer.

Preference pairs (`make_source(..., pairs=True)`, for DPO): every document is a pair
{"chosen": messages, "rejected": messages, "text": the chosen contents, "source"}, both conversations ending
with an assistant message. PAIR_SOURCE_KINDS hold pairs: textbook_chat (a correct and a wrong last answer)
and JSON records (jsonl, array_record, tfds) in TRL's preference format, whatever `field` says:
"chosen" and "rejected" each a list of messages or a string (an assistant reply), after the "prompt" when
the record has one (a string = one user message, or a list of messages); a reply string needs a prompt.

Orders are deterministic: files sorted by path, records in file order.
"""

from __future__ import annotations

import functools
import glob
import json
import sysconfig
from pathlib import Path
from typing import Any, Mapping

from phi3_jax.data.chat_templates import chat_document, pair_document
from phi3_jax.data.errors import DataError
from phi3_jax.data.textbook import TextbookChatSource, TextbookSource

SOURCE_KINDS = ("textbook", "textbook_chat", "stdlib", "text", "jsonl", "array_record", "tfds", "filtered")
PAIR_SOURCE_KINDS = ("textbook_chat", "jsonl", "array_record", "tfds")  # and "filtered" over one of them


def expand_paths(path: str, what: str, suffixes: tuple[str, ...] = ()) -> list[Path]:
    """A file, a directory (recursively; only `suffixes` if given) or a glob -> sorted files."""
    if not path:
        raise DataError(f"{what}: path is empty")
    p = Path(path).expanduser()
    if any(c in path for c in "*?[") and not p.exists():  # an existing name with "[" in it is that file
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"{what}: no files match {path}")
        return files
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and (not suffixes or f.suffix in suffixes))
        if not files:
            raise DataError(f"{what}: directory has no {'/'.join(suffixes) or ''} files: {p}")
        return files
    raise DataError(f"{what}: path not found: {p}")


@functools.lru_cache(maxsize=8)
def _stdlib_files(root: str, include_tests: bool) -> tuple[str, ...]:
    # Cached: walking the tree takes a noticeable fraction of a second and every pipeline build asks.
    skip = {"site-packages", "dist-packages", "__pycache__"}
    if not include_tests:
        skip |= {"test", "tests", "idle_test"}
    base = Path(root)
    return tuple(sorted(f.relative_to(base).as_posix() for f in base.rglob("*.py")
                        if not skip & set(f.relative_to(base).parts[:-1])))


class StdlibSource:
    """The standard library's own .py files: a real code corpus on every machine, offline.

    Sorted by path relative to the stdlib root, so the order is the same on every host running the
    same Python version (other versions have other files). site-packages is excluded; test suites
    too unless include_tests.
    """

    def __init__(self, include_tests: bool = False, root: str | None = None):
        self.root = Path(root or sysconfig.get_paths()["stdlib"])
        if not self.root.is_dir():
            raise DataError(f"stdlib source: directory not found: {self.root}")
        self.files = list(_stdlib_files(str(self.root), include_tests))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        rel = self.files[index]
        # A few stdlib files are not UTF-8 (test data in legacy encodings); keep them, lossy.
        text = (self.root / rel).read_bytes().decode("utf-8", errors="replace")
        return {"text": text, "source": "stdlib", "topic": "code", "audience": "programmers", "path": rel}


class TextFilesSource:
    """One document per file (a file, a directory tree or a glob)."""

    def __init__(self, path: str, name: str = "text"):
        self.name = name
        self.files = expand_paths(path, f"text source {name!r}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        f = self.files[index]
        return {"text": f.read_bytes().decode("utf-8", errors="replace"), "source": self.name, "path": str(f)}


def _checked_record(record: Any, fields: tuple[str, ...], where: str) -> Mapping:
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in fields:
        if field not in record:
            raise DataError(f"{where}: no field {field!r} (fields: {sorted(record)[:20]})")
    return record


def _decoded(value: Any) -> Any:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def _with_labels(out: dict, record: Mapping) -> dict:
    for key in ("topic", "audience"):
        if isinstance(record.get(key), str):
            out[key] = record[key]
    return out


def _text_field(record: Any, field: str, where: str) -> dict:
    text = _decoded(_checked_record(record, (field,), where)[field])
    if isinstance(text, list):
        out = chat_document(text, f"{where}: field {field!r}")
    elif isinstance(text, str):
        out = {"text": text}
    else:
        raise DataError(f"{where}: field {field!r} must be a string or a list of chat messages, got "
                        f"{type(text).__name__}")
    return _with_labels(out, record)


def _pair_fields(record: Any, where: str) -> dict:
    """A preference record in TRL's format (see the module docstring) -> a pair document."""
    _checked_record(record, ("chosen", "rejected"), where)
    prompt = _decoded(record.get("prompt"))
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        prompt = chat_document(prompt, f"{where}: field 'prompt'")["messages"]
    elif prompt is not None:
        raise DataError(f"{where}: field 'prompt' must be a string or a list of chat messages, got "
                        f"{type(prompt).__name__}")
    conversations = {}
    for field in ("chosen", "rejected"):
        value = _decoded(record[field])
        if isinstance(value, str):
            if prompt is None:
                raise DataError(f"{where}: field {field!r} is a reply string, which needs a 'prompt' field; or give "
                                f"the whole conversation as a list of chat messages")
            conversations[field] = prompt + [{"role": "assistant", "content": value}]
        elif isinstance(value, list):
            conversations[field] = (prompt or []) + chat_document(value, f"{where}: field {field!r}")["messages"]
        else:
            raise DataError(f"{where}: field {field!r} must be a string (the reply) or a list of chat messages, "
                            f"got {type(value).__name__}")
    return _with_labels(pair_document(conversations["chosen"], conversations["rejected"], where), record)


def _record_fields(record: Any, field: str, pairs: bool, where: str) -> dict:
    return _pair_fields(record, where) if pairs else _text_field(record, field, where)


class JsonlSource:
    """One document per non-empty line of JSONL files; the text is in `field` (with `pairs`: a preference pair).

    Line offsets are indexed once at start-up; a read seeks straight to its line.
    """

    def __init__(self, path: str, field: str = "text", name: str = "jsonl", pairs: bool = False):
        self.name, self.field, self.pairs = name, field, pairs
        self.files = expand_paths(path, f"jsonl source {name!r}", (".jsonl", ".json"))
        self._index: list[tuple[int, int, int]] = []  # (file number, byte offset, line number)
        for k, f in enumerate(self.files):
            offset = 0
            with open(f, "rb") as fh:
                for lineno, line in enumerate(fh, start=1):
                    if line.strip().removeprefix(b"\xef\xbb\xbf").strip():  # a byte-order mark alone is blank
                        self._index.append((k, offset, lineno))
                    offset += len(line)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict:
        k, offset, lineno = self._index[index]
        where = f"{self.files[k]}:{lineno}"
        with open(self.files[k], "rb") as fh:
            fh.seek(offset)
            line = fh.readline()
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg})") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
        return {**_record_fields(record, self.field, self.pairs, where), "source": self.name}


class ArrayRecordSource:
    """One document per ArrayRecord record: UTF-8 text, or a JSON object holding the text in `field`
    (when `field` is set) or a preference pair (with `pairs`)."""

    def __init__(self, path: str, field: str = "", name: str = "array_record", pairs: bool = False):
        self.name, self.field, self.pairs = name, field, pairs
        self.files = expand_paths(path, f"array_record source {name!r}", (".array_record", ".arrayrecord"))
        try:
            import grain
            self._ds = grain.sources.ArrayRecordDataSource([str(f) for f in self.files])
        except ImportError as e:
            raise DataError(f"array_record source {name!r} needs the array-record package ({e})") from None

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> dict:
        raw = self._ds[index]
        if not self.field and not self.pairs:
            return {"text": raw.decode("utf-8", errors="replace"), "source": self.name}
        where = f"{self.name} record {index}"
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: not JSON ({e})") from None
        return {**_record_fields(record, self.field, self.pairs, where), "source": self.name}


class TfdsSource:
    """A TensorFlow Datasets split through `tfds.data_source` (array_record files; TensorFlow itself is
    not needed). The dataset must already be prepared under data_dir: nothing is downloaded. With `pairs`, each
    example is a preference pair (string features "prompt", "chosen", "rejected")."""

    def __init__(self, dataset: str, split: str = "train", field: str = "text", data_dir: str = "",
                 name: str = "tfds", pairs: bool = False):
        self.name, self.field, self.dataset, self.split, self.pairs = name, field, dataset, split, pairs
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise DataError(f"tfds source {name!r} needs tensorflow-datasets and array-record "
                            f"(pip install 'phi3_jax[tfds]'): {e}") from None
        if data_dir and not Path(data_dir).expanduser().is_dir():
            raise DataError(f"tfds source {name!r}: data_dir not found: {data_dir}")
        try:
            self._ds = tfds.data_source(dataset, split=split, data_dir=data_dir or None, download=False)
        except Exception as e:  # tfds raises several types (AssertionError, DatasetNotFoundError, ...)
            first_line = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise DataError(f"tfds source {name!r}: cannot open {dataset!r} split {split!r}"
                            f"{' in ' + data_dir if data_dir else ''} ({type(e).__name__}: {first_line}); "
                            f"prepare it in array_record format first (e.g. `tfds build {dataset} "
                            f"--file_format=array_record`)") from None

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> dict:
        where = f"tfds {self.dataset}[{self.split}] example {index}"
        return {**_record_fields(self._ds[index], self.field, self.pairs, where), "source": self.name}


def make_source(kind: str, *, name: str = "", path: str = "", field: str = "text", split: str = "train",
                data_dir: str = "", num_docs: int = 0, textbook_seed: int = 0,
                low_quality_fraction: float = 0.2, include_tests: bool = False, pairs: bool = False):
    """Build one source. `num_docs` sizes the textbook corpora (0 -> one million documents). `pairs`: its
    documents are preference pairs (PAIR_SOURCE_KINDS only)."""
    name = name or kind
    if pairs and kind in SOURCE_KINDS and kind not in PAIR_SOURCE_KINDS + ("filtered",):
        raise DataError(f"source {name!r}: a {kind} source cannot hold preference pairs; sources of pairs are "
                        f"{', '.join(PAIR_SOURCE_KINDS)}, or filtered over one of them")
    if kind == "textbook":
        return TextbookSource(num_docs=num_docs or 1_000_000, seed=textbook_seed,
                              low_quality_fraction=low_quality_fraction)
    if kind == "textbook_chat":
        return TextbookChatSource(num_docs=num_docs or 1_000_000, seed=textbook_seed, pairs=pairs)
    if kind == "stdlib":
        return StdlibSource(include_tests=include_tests, root=path or None)
    if kind == "text":
        return TextFilesSource(path, name=name)
    if kind == "jsonl":
        return JsonlSource(path, field=field or "text", name=name, pairs=pairs)
    if kind == "array_record":
        return ArrayRecordSource(path, field=field, name=name, pairs=pairs)
    if kind == "tfds":
        if not path:
            raise DataError(f"tfds source {name!r}: set path to the dataset name (e.g. 'imdb_reviews')")
        return TfdsSource(path, split=split, field=field or "text", data_dir=data_dir, name=name, pairs=pairs)
    if kind == "filtered":
        raise DataError(f"source {name!r}: 'filtered' sources are built by the pipeline (make_pipeline)")
    raise DataError(f"source {name!r}: unknown kind {kind!r}; known: {SOURCE_KINDS}")
