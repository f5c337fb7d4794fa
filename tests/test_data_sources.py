"""Document sources: synthetic lessons, the stdlib corpus, local files, ArrayRecord, TFDS."""

import json
import re
import tempfile

import pytest

from phi3_jax.data import DataError, StdlibSource, TextbookSource, make_source
from phi3_jax.data.textbook import AUDIENCES, DEFECTS, TOPICS


def test_textbook_is_deterministic_random_access():
    a, b = TextbookSource(num_docs=1000, seed=7), TextbookSource(num_docs=1000, seed=7)
    # Any index, any order, any instance: the same document.
    assert [a[i] for i in (999, 3, 500)] == [b[i] for i in (999, 3, 500)]
    assert a[3] == a[3] and a[3] != a[4]
    assert TextbookSource(num_docs=1000, seed=8)[3] != a[3]
    docs = [a[i] for i in range(400)]
    assert {d["topic"] for d in docs} == set(TOPICS)
    assert {d["audience"] for d in docs} == set(AUDIENCES)
    assert {d["defect"] for d in docs} == set(DEFECTS) | {"none"}
    assert all(d["source"] == "textbook" and d["text"].strip() for d in docs)
    assert all(d["quality"] == (d["defect"] == "none") for d in docs)
    with pytest.raises(IndexError):
        a[1000]


def test_textbook_worked_answers_are_correct():
    src = TextbookSource(num_docs=300, seed=0, low_quality_fraction=0.0)
    checked = 0
    for i in range(300):
        d = src[i]
        if d["topic"] != "arithmetic":
            continue
        for lhs, op, rhs, ans in re.findall(r"So (\d+) ([-+x/]) (\d+) = (\d+)", d["text"]):
            a, b, c = int(lhs), int(rhs), int(ans)
            assert {"+": a + b, "-": a - b, "x": a * b, "/": a // b}[op] == c, d["text"]
            checked += 1
    assert checked > 100


def test_stdlib_corpus_loads():
    src = StdlibSource()
    assert len(src) > 300
    assert src.files == sorted(src.files) and "os.py" in src.files
    assert not any(f.startswith(("test/", "site-packages")) for f in src.files)
    doc = src[src.files.index("os.py")]
    assert "def makedirs" in doc["text"] and doc["source"] == "stdlib" and doc["topic"] == "code"
    assert len(StdlibSource(include_tests=True)) > len(src)


def test_text_and_jsonl(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    src = make_source("text", name="notes", path=str(tmp_path))
    assert [src[i]["text"] for i in range(len(src))] == ["first", "second"]
    assert src[0]["source"] == "notes"
    assert len(make_source("text", path=str(tmp_path / "*.txt"))) == 2

    jl = tmp_path / "d.jsonl"
    jl.write_text('{"body": "one", "topic": "t"}\n\n{"body": "two"}\n{"other": 1}\n{"body": 5}\nnot json\n')
    src = make_source("jsonl", path=str(jl), field="body")
    assert len(src) == 5
    assert src[0] == {"text": "one", "topic": "t", "source": "jsonl"} and src[1]["text"] == "two"
    with pytest.raises(DataError, match=r"d.jsonl:4: no field 'body'"):
        src[2]
    with pytest.raises(DataError, match=r"d.jsonl:5: field 'body' must be a string or a list of chat messages, got int"):
        src[3]
    with pytest.raises(DataError, match=r"d.jsonl:6: invalid JSON"):
        src[4]
    # A byte-order mark alone is a blank line; bytes that are not UTF-8 name their line.
    (tmp_path / "e.jsonl").write_bytes(b'\xef\xbb\xbf\n{"text": "ok"}\n{"text": "\xff"}\n')
    src = make_source("jsonl", path=str(tmp_path / "e.jsonl"))
    assert len(src) == 2 and src[0]["text"] == "ok"
    with pytest.raises(DataError, match=r"e.jsonl:3: not UTF-8"):
        src[1]
    # A file whose name holds a glob character is that file when it exists.
    (tmp_path / "x[1].txt").write_text("bracketed")
    assert make_source("text", path=str(tmp_path / "x[1].txt"))[0]["text"] == "bracketed"


def test_conversations_in_jsonl(tmp_path):
    """A field holding chat messages makes a conversation; a malformed one names its line and message."""
    chat = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4", "id": 7}]
    jl = tmp_path / "chat.jsonl"
    jl.write_text("\n".join(json.dumps({"messages": m}) for m in (
        chat, [{"role": "bot", "content": "hi"}], [{"role": "user", "content": 3}], ["hi"], [])) + "\n")
    src = make_source("jsonl", path=str(jl), field="messages")
    doc = src[0]
    assert doc["messages"] == [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    assert doc["text"] == "What is 2 + 2?\n\n4" and doc["source"] == "jsonl"
    for index, error in ((1, "message 0: unknown role 'bot'"), (2, "message 0: content must be str, got int"),
                         (3, "message 0 must be a dict with 'role' and 'content'")):
        with pytest.raises(DataError, match=rf"chat.jsonl:{index + 1}: field 'messages': chat {error}"):
            src[index]
    assert src[4]["messages"] == []


def test_textbook_chat_conversations():
    from phi3_jax.data.textbook import TextbookChatSource

    a, b = TextbookChatSource(num_docs=500, seed=1), TextbookChatSource(num_docs=500, seed=1)
    assert [a[i] for i in (499, 0, 77)] == [b[i] for i in (499, 0, 77)]
    assert TextbookChatSource(num_docs=500, seed=2)[0] != a[0]
    make = make_source("textbook_chat", num_docs=500, textbook_seed=1)
    assert len(make) == 500 and make[3] == a[3]
    arithmetic = 0
    for i in range(200):
        roles = [m["role"] for m in a[i]["messages"]]
        body = roles[1:] if roles[0] == "system" else roles
        assert body and body == ["user", "assistant"] * (len(body) // 2) and len(body) <= 6
        for q, r in zip(a[i]["messages"][len(roles) - len(body)::2], a[i]["messages"][len(roles) - len(body) + 1::2]):
            m = re.search(r"What is (\d+) ([-+x]) (\d+)\?", q["content"])
            if m:  # the reply's answer is the exercise's result
                x, op, y = int(m[1]), m[2], int(m[3])
                assert r["content"].endswith(f"Answer: {x + y if op == '+' else x - y if op == '-' else x * y}")
                arithmetic += 1
    assert arithmetic > 50
    with pytest.raises(IndexError):
        a[500]


def test_array_record(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = tmp_path / "docs.array_record"
    w = ArrayRecordWriter(str(path), "group_size:1")
    for i in range(5):
        w.write(json.dumps({"content": f"document {i}"}).encode())
    w.close()
    src = make_source("array_record", path=str(path), field="content")
    assert len(src) == 5 and src[3] == {"text": "document 3", "source": "array_record"}
    raw = make_source("array_record", path=str(path), field="")
    assert json.loads(raw[0]["text"]) == {"content": "document 0"}


def test_missing_paths_and_bad_kinds(tmp_path):
    missing = str(tmp_path / "nothing_here")
    for kind in ("text", "jsonl", "array_record"):
        with pytest.raises(DataError, match=f"path not found: {re.escape(missing)}"):
            make_source(kind, path=missing)
    with pytest.raises(DataError, match="no files match"):
        make_source("text", path=str(tmp_path / "*.nope"))
    with pytest.raises(DataError, match="unknown kind 'parquet'"):
        make_source("parquet", name="p", path=missing)
    with pytest.raises(DataError, match="jsonl source 'jsonl': path is empty"):
        make_source("jsonl", path="")


def test_tfds_data_source_with_mock_data(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the mock's DatasetInfo makes folders in TMPDIR
    with tfds.testing.mock_data(num_examples=7):
        src = make_source("tfds", name="imdb", path="imdb_reviews", split="train", field="text")
        assert len(src) == 7
        doc = src[2]
        assert isinstance(doc["text"], str) and doc["source"] == "imdb"
        with pytest.raises(DataError, match="no field 'body'"):
            make_source("tfds", path="imdb_reviews", field="body")[0]


def test_tfds_errors_name_the_dataset(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError, match="data_dir not found"):
        make_source("tfds", path="imdb_reviews", data_dir=str(tmp_path / "missing"))
    with pytest.raises(DataError, match="cannot open 'no_such_dataset_xyz'"):
        make_source("tfds", path="no_such_dataset_xyz", data_dir=str(tmp_path))
