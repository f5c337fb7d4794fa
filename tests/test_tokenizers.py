"""Tokenizers: round trips, special tokens, chat templates (spec §8), factory errors. All files offline."""

import base64
import collections
import itertools
import pickle
import re

import pytest

from phi3_jax.data import DataError, make_tokenizer, make_tokenizer_from_config, render_chat
from phi3_jax.data.textbook import TextbookSource
from phi3_jax.data.tokenizers import (PHI3_SMALL_DUMMY_IDS, PHI3_SMALL_SPECIAL_TOKENS, PHI3_SMALL_STOP_IDS,
                                      PHI3_SMALL_VOCAB_SIZE)
from phi3_jax.data.train_sentencepiece import main as train_sp_main

TEXTS = ["Hello, world!", "  two  spaces\n\nand\ttabs ", "héllo wörld — ünïcode 😀 中文", "x = [1, 2, 3]\n",
         "a literal <|endoftext|> and <|user|> in data", ""]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"}]


def _corpus(n=200):
    src = TextbookSource(num_docs=n, seed=3)
    return [src[i]["text"] for i in range(n)]


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp") / "tiny"
    assert train_sp_main(["--input", "textbook:300", "--vocab_size", "400", "--out", str(out)]) == 0
    return str(out) + ".model"


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|system|>", "<|user|>",
                                                                  "<|assistant|>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def _tiny_bpe_ranks(texts, merges=60):
    """All 256 single bytes plus greedy pair merges learned on `texts`: a valid tiktoken ranks table."""
    ranks = {bytes([b]): b for b in range(256)}
    words = [[bytes([c]) for c in w.encode()] for t in texts for w in re.findall(r" ?\w+| ?[^\w\s]+|\s+", t)]
    for _ in range(merges):
        pairs = collections.Counter(p for w in words for p in zip(w, w[1:]))
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i:i + 2] = [a + b]
                i += 1
    return ranks


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tt") / "tiny.tiktoken"
    ranks = _tiny_bpe_ranks(_corpus(100))
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return str(path)


@pytest.fixture(scope="module")
def all_tokenizers(sp_path, hf_path, bpe_path):
    return {"byte": make_tokenizer("byte"), "sentencepiece": make_tokenizer("sentencepiece", sp_path),
            "hf": make_tokenizer("hf", hf_path), "tiktoken": make_tokenizer("tiktoken", bpe_path)}


@pytest.mark.parametrize("kind", ["byte", "sentencepiece", "hf", "tiktoken"])
def test_round_trip_and_interface(all_tokenizers, kind):
    tok = all_tokenizers[kind]
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # Special-token strings inside data stay text; in prompts they become the special ids.
    assert tok.special_tokens["<|user|>"] not in tok.encode("a <|user|> b")
    ids = tok.encode("<|user|>\nhi<|end|>\n", allow_special=True)
    assert ids[0] == tok.special_tokens["<|user|>"] and tok.special_tokens["<|end|>"] in ids
    assert tok.vocab_size % 64 == 0 and max(tok.special_tokens.values()) < tok.vocab_size
    for attr in ("bos_id", "eos_id", "pad_id"):
        assert getattr(tok, attr) in tok.special_tokens.values()
    assert tok.special_tokens["<|end|>"] in tok.stop_ids and tok.eos_id in tok.stop_ids
    # A lone surrogate (what JSON's "\\ud800" decodes to) encodes as U+FFFD, in every kind.
    assert tok.encode("ab\ud800c") == tok.encode("ab\ufffdc")
    # Picklable (grain worker processes receive tokenizers by pickle).
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(TEXTS[2]) == tok.encode(TEXTS[2]) and clone.vocab_size == tok.vocab_size


@pytest.mark.parametrize("kind", ["byte", "sentencepiece", "hf", "tiktoken"])
def test_chat_template_tokenizes_back(all_tokenizers, kind):
    tok = all_tokenizers[kind]
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    assert tok.decode(ids) == prompt
    assert ids.count(tok.special_tokens["<|end|>"]) == 4
    # Ids the tokenizer never produces (padding rows) decode to nothing instead of failing.
    last_row = tok.vocab_size - 1
    if last_row not in tok.special_tokens.values():  # Phi-3-small names every row up to 100351
        assert tok.decode(ids + [last_row]) == prompt


@pytest.mark.parametrize("kind", ["byte", "sentencepiece", "hf", "tiktoken"])
def test_encode_chat_marks_the_replies(all_tokenizers, kind):
    """encode_chat gives apply_chat_template's ids, and its trained tokens are exactly each assistant reply and
    its <|end|> (with the newline before it where the tokenizer encodes that together with the reply)."""
    tok = all_tokenizers[kind]
    replies = ["4, since 2 + 2 = 4 ☃.", "Six: 3 + 3 = 6.\nAnswer: 6"]
    # An empty reply still ends with a trained <|end|>.
    chat = CHAT[:2] + [{"role": "assistant", "content": ""}] + [
        m for reply in replies for m in (CHAT[3], {"role": "assistant", "content": reply})]
    for template in ("phi3", "phi3.5", "phi3-mini-april", "phi3-medium", "phi3-small"):
        ids, trained = tok.encode_chat(chat, template=template)
        assert ids == tok.apply_chat_template(chat, tokenize=True, template=template) and len(trained) == len(ids)
        runs = [list(g) for k, g in itertools.groupby(zip(ids, trained), key=lambda p: p[1]) if k]
        texts = [tok.decode([i for i, _ in run]) for run in runs]
        assert [t.removeprefix("\n") for t in texts] == ["<|end|>"] + [r + "<|end|>" for r in replies], template
    with pytest.raises(DataError, match="unknown role"):
        tok.encode_chat([{"role": "bot", "content": "hi"}])
    # A surrogate pair written as two code points (one character once encoded) leaves the reply's span in place.
    ids, trained = tok.encode_chat([{"role": "user", "content": "x\ud83d\ude00" * 3}, {"role": "assistant", "content": "ok"}])
    assert tok.decode([i for i, t in zip(ids, trained) if t]).removeprefix("\n") == "ok<|end|>"


def test_encode_chat_with_specials_that_strip_whitespace(tmp_path):
    """Phi-3's tokenizer.json flags its specials rstrip: <|assistant|> then takes in the whitespace that opens the
    reply, and must still carry no loss."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    lib = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    lib.pre_tokenizer, lib.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    lib.add_special_tokens([AddedToken(t, rstrip=True, special=True, normalized=False)
                            for t in ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")])
    lib.save(str(tmp_path / "tokenizer.json"))
    tok = make_tokenizer("hf", str(tmp_path / "tokenizer.json"))
    for reply in (" 4", "\n\nAnswer: 4", "4"):
        ids, trained = tok.encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}])
        assert [tok.decode([i]) for i, t in zip(ids, trained) if t][-1] == "<|end|>"
        assert tok.decode([i for i, t in zip(ids, trained) if t]) == reply.lstrip() + "<|end|>", reply


def test_byte_tokenizer():
    tok = make_tokenizer("byte")
    assert tok.vocab_size == 320 and tok.encode("é") == [0xC3, 0xA9]
    assert tok.special_tokens["<|endoftext|>"] == 256 and tok.bos_id == tok.eos_id == 256
    assert tok.pad_id not in tok.stop_ids
    assert tok.decode([104, 105, 300]) == "hi"  # padding rows decode to nothing
    assert tok.decode([104, 260, 105], skip_special=True) == "hi"


def test_phi3_small_tiktoken(bpe_path):
    tok = make_tokenizer("tiktoken", bpe_path, preset="phi3-small")
    st = tok.special_tokens
    expected = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                "<|fim_suffix|>": 100260, "<|system|>": 100261, "<|user|>": 100262, "<|assistant|>": 100263,
                "<|end|>": 100266, "<|endofprompt|>": 100276}
    assert {k: st[k] for k in expected} == expected
    assert tok.vocab_size == PHI3_SMALL_VOCAB_SIZE == 100352
    assert tok.bos_id == tok.eos_id == 100257
    assert tok.stop_ids == PHI3_SMALL_STOP_IDS == (100266, 100257)
    # 91 dummy ids: 100256, 100258-100260, 100264, 100265, 100267-100351 (spec §8.2).
    want = [100256, 100258, 100259, 100260, 100264, 100265] + list(range(100267, 100352))
    assert list(tok.dummy_ids) == list(PHI3_SMALL_DUMMY_IDS) == want and len(want) == 91
    # Every id from 100256 to 100351 is a named special; none collides with a chat special.
    assert sorted(PHI3_SMALL_SPECIAL_TOKENS.values()) == list(range(100256, 100352))
    assert not {100257, 100261, 100262, 100263, 100266} & set(want)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"}]
    # Spec §8.2 exactly: bos + <|role|>\ncontent<|end|>\n ... then <|assistant|>\n or eos.
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == (
        "<|endoftext|><|system|>\nS<|end|>\n<|user|>\nU<|end|>\n<|assistant|>\nA<|end|>\n<|assistant|>\n")
    assert tok.apply_chat_template(msgs[:2], add_generation_prompt=False) == (
        "<|endoftext|><|system|>\nS<|end|>\n<|user|>\nU<|end|>\n<|endoftext|>")
    ids = tok.apply_chat_template(msgs[1:2], add_generation_prompt=True, tokenize=True)
    assert ids[:2] == [100257, 100262] and 100266 in ids
    assert ids[-2] == 100263 and ids[-1:] == tok.encode("\n")  # newline after a special is a plain token


def test_phi3_mini_templates():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    kw = dict(bos_token="<s>", eos_token="<|endoftext|>")
    assert render_chat("phi3-mini-april", msgs, add_generation_prompt=True, **kw) == (
        "<s><|user|>\nU<|end|>\n<|assistant|>\nA<|end|>\n<|user|>\nV<|end|>\n<|assistant|>\n")
    assert render_chat("phi3-medium", msgs, add_generation_prompt=True, **kw) == (
        "<|user|>\nU<|end|>\n<|assistant|>\nA<|end|>\n<|user|>\nV<|end|>\n<|assistant|>\n")
    assert render_chat("phi3", msgs[:2], add_generation_prompt=True, **kw) == (
        "<|system|>\nS<|end|>\n<|user|>\nU<|end|>\n<|assistant|>\n")
    assert render_chat("phi3", msgs[:2], add_generation_prompt=False, **kw) == (
        "<|system|>\nS<|end|>\n<|user|>\nU<|end|>\n<|endoftext|>")
    empty_sys = [{"role": "system", "content": ""}, msgs[1]]
    assert render_chat("phi3.5", empty_sys, add_generation_prompt=True, **kw) == "<|user|>\nU<|end|>\n<|assistant|>\n"
    assert render_chat("phi3", empty_sys, add_generation_prompt=True, **kw).startswith("<|system|>\n<|end|>\n")


def test_sentencepiece_layout(sp_path):
    import sentencepiece as spm

    tok = make_tokenizer("sp", sp_path, chat_template="phi3-small")
    n = spm.SentencePieceProcessor(model_file=sp_path).GetPieceSize()
    assert n == 400
    assert [tok.special_tokens[t] for t in ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")] \
        == list(range(400, 405))
    assert tok.vocab_size == 448 and tok.bos_id == 1 and tok.eos_id == tok.pad_id == 400
    assert tok.apply_chat_template(CHAT[1:2], add_generation_prompt=True).startswith("<s><|user|>")


def test_config_factory_and_errors(tmp_path, bpe_path):
    assert make_tokenizer_from_config(None).vocab_size == 320
    from phi3_jax.data import default_data_config

    cfg = default_data_config()
    cfg.tokenizer.kind, cfg.tokenizer.path = "tiktoken", bpe_path
    assert make_tokenizer_from_config(cfg).special_tokens["<|end|>"] == 100266
    tok = make_tokenizer_from_config({"kind": "tiktoken", "path": bpe_path, "chat_template": "", "preset": ""})
    assert tok.eos_id == 100257
    with pytest.raises(DataError, match="unknown tokenizer kind 'wordpiece'"):
        make_tokenizer("wordpiece")
    missing = tmp_path / "nope.model"
    for kind in ("sentencepiece", "hf", "tiktoken"):
        with pytest.raises(DataError, match=re.escape(str(missing))):
            make_tokenizer(kind, str(missing))
        with pytest.raises(DataError, match="needs a file path"):
            make_tokenizer(kind)
    for kind in ("sentencepiece", "hf", "tiktoken"):
        with pytest.raises(DataError, match=f"{re.escape(str(tmp_path))} is a folder; give the file itself"):
            make_tokenizer(kind, str(tmp_path))
    empty = tmp_path / "empty.tiktoken"
    empty.write_text("")
    with pytest.raises(DataError, match=r"not a tiktoken BPE ranks file: .*empty\.tiktoken \(no ranks in it\)"):
        make_tokenizer("tiktoken", str(empty))
    bad = tmp_path / "bad.model"
    bad.write_text("not a model")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        make_tokenizer("sentencepiece", str(bad))
    with pytest.raises(DataError, match="data.tokenizer.kind: expected str"):
        make_tokenizer_from_config({"tokenizer": {"kind": 3}, "sources": [{"name": "a"}]})
    with pytest.raises(DataError, match="unknown role 'bot'"):
        make_tokenizer("byte").apply_chat_template([{"role": "bot", "content": "x"}])
    with pytest.raises(DataError, match="unknown chat template"):
        make_tokenizer("byte", chat_template="llama")


def test_tiktoken_rereads_changed_file(tmp_path):
    """tiktoken caches local files by path; a rewritten file at the same path must be re-read."""
    path = tmp_path / "r.tiktoken"
    ranks = {bytes([b]): b for b in range(256)}
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    assert make_tokenizer("tiktoken", str(path)).encode("ab") == [97, 98]
    ranks[b"ab"] = 256
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    assert make_tokenizer("tiktoken", str(path)).encode("ab") == [256]


# ----- the tokenizer as Hugging Face files (export-hf) -----

def _fuzz(n=12, length=160):
    import random

    rng = random.Random(0)
    alphabet = "ab c\n\t\r 0123456789é中😀'sLL  ,.!?<|>_-\u00a0"
    return ["".join(rng.choice(alphabet) for _ in range(length)) for _ in range(n)]


@pytest.fixture(scope="module")
def exportable(bpe_path, hf_path):
    return {"byte": make_tokenizer("byte"), "hf": make_tokenizer("hf", hf_path),
            "tiktoken": make_tokenizer("tiktoken", bpe_path, preset="generic"),
            "tiktoken-phi3-small": make_tokenizer("tiktoken", bpe_path)}


@pytest.mark.parametrize("kind", ["byte", "hf", "tiktoken", "tiktoken-phi3-small"])
def test_hf_tokenizer_files_encode_as_ours(tmp_path, exportable, kind):
    """tokenizer.json (read by the `tokenizers` library, by transformers, and back as phi3_jax's `hf` kind) gives
    our ids for text with and without special tokens, and the same specials, stops and chat template."""
    from tokenizers import Tokenizer as HFLib
    from transformers import AutoTokenizer

    from phi3_jax.convert.hf_tokenizer import hf_tokenizer_files, read_hf_tokenizer

    tok = exportable[kind]
    for name, text in hf_tokenizer_files(tok, 4096).items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    lib, auto, back = HFLib.from_file(str(tmp_path / "tokenizer.json")), AutoTokenizer.from_pretrained(tmp_path), \
        read_hf_tokenizer(tmp_path)
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    for text in TEXTS + _fuzz() + _corpus(10) + [prompt]:
        ids = tok.encode(text, allow_special=True)
        assert lib.encode(text, add_special_tokens=False).ids == ids, text
        assert auto.encode(text, add_special_tokens=False) == ids, text
        assert back.encode(text, allow_special=True) == ids and back.encode(text) == tok.encode(text), text
        assert lib.decode(ids, skip_special_tokens=False) == tok.decode(ids) == back.decode(ids)
    assert (auto.bos_token, auto.eos_token, auto.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)
    assert back.special_tokens == tok.special_tokens and back.stop_ids == tok.stop_ids
    assert (back.vocab_size, back.pad_id, back.chat_template) == (tok.vocab_size, tok.pad_id, tok.chat_template)
    assert auto.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == prompt


@pytest.mark.parametrize("template", ["phi3", "phi3.5", "phi3-mini-april", "phi3-medium", "phi3-small"])
def test_jinja_chat_templates_render_as_ours(tmp_path, template):
    """transformers renders each exported Jinja template exactly as `render_chat` does."""
    from transformers import AutoTokenizer

    from phi3_jax.convert.hf_tokenizer import hf_tokenizer_files

    tok = make_tokenizer("byte", chat_template=template)
    for name, text in hf_tokenizer_files(tok, 4096).items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    auto = AutoTokenizer.from_pretrained(tmp_path)
    conversations = [CHAT, CHAT[:2], CHAT[1:3], [{"role": "system", "content": ""}] + CHAT[1:],
                     [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "a\nb"}]]
    for messages in conversations:
        for add in (True, False):
            ours = render_chat(template, messages, add_generation_prompt=add, bos_token=tok.bos_token,
                               eos_token=tok.eos_token)
            assert auto.apply_chat_template(messages, add_generation_prompt=add, tokenize=False) == ours


def _spm_model(directory, name, **options):
    """A 400-piece SentencePiece model trained on textbook text with `options` (byte fallback, digits split)."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus(300)), model_prefix=str(directory / name),
                                   vocab_size=400, byte_fallback=True, split_digits=True, minloglevel=2, **options)
    return str(directory / f"{name}.model")


@pytest.mark.parametrize("model", ["bpe", "unigram", "llama-style"])
def test_sentencepiece_tokenizer_json_encodes_as_sentencepiece(tmp_path, sp_path, model):
    """This project's SentencePiece models (BPE, unigram) and a Llama-style one (dummy "▁" prefix) convert to
    a tokenizer.json that encodes exactly as SentencePiece does; transformers loads it."""
    from tokenizers import Tokenizer as HFLib
    from transformers import AutoTokenizer

    from phi3_jax.convert.hf_tokenizer import hf_tokenizer_files

    if model == "bpe":
        path = sp_path
    elif model == "unigram":
        assert train_sp_main(["--input", "textbook:300", "--vocab_size", "400", "--model_type", "unigram",
                              "--out", str(tmp_path / "uni")]) == 0
        path = str(tmp_path / "uni.model")
    else:
        path = _spm_model(tmp_path, "llama", model_type="bpe", add_dummy_prefix=True, remove_extra_whitespaces=False,
                          normalization_rule_name="identity")
    tok = make_tokenizer("sentencepiece", path)
    for name, text in hf_tokenizer_files(tok, 4096).items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    lib, auto = HFLib.from_file(str(tmp_path / "tokenizer.json")), AutoTokenizer.from_pretrained(tmp_path)
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    for text in TEXTS + _fuzz() + _corpus(10) + [prompt]:
        ids = tok.encode(text, allow_special=True)
        assert lib.encode(text, add_special_tokens=False).ids == ids, text
        assert auto.encode(text, add_special_tokens=False) == ids, text
        if model != "llama-style" or not any(t in text for t in tok.special_tokens):
            # (tokenizers strips a dummy prefix's space once, at the start; SentencePiece after each special)
            assert lib.decode(ids, skip_special_tokens=False) == tok.decode(ids), text


def test_sentencepiece_with_a_character_map_has_no_tokenizer_json(tmp_path):
    """nmt_nfkc's character map runs differently in `tokenizers` (CR LF: one space there, two in
    SentencePiece), so such a model is refused, naming the way out; so is one with user-defined pieces."""
    from phi3_jax.convert.hf_tokenizer import tokenizer_json

    path = _spm_model(tmp_path, "nfkc", model_type="bpe", normalization_rule_name="nmt_nfkc")
    with pytest.raises(DataError, match="normaliser 'nmt_nfkc'.*--tokenizer none"):
        tokenizer_json(make_tokenizer("sentencepiece", path))
    # User-defined pieces, which SentencePiece matches before its model runs, are refused too.
    path = _spm_model(tmp_path, "user", model_type="bpe", normalization_rule_name="identity",
                      user_defined_symbols=["<tool>"])
    with pytest.raises(DataError, match="user-defined pieces"):
        tokenizer_json(make_tokenizer("sentencepiece", path))


def test_hf_folder_whose_config_names_an_unknown_token(tmp_path, hf_path):
    """A tokenizer_config.json naming a token that tokenizer.json does not flag special leaves the file's own
    choice; a tokenizer_config.json that is not JSON, or a missing tokenizer.json, is one clear error."""
    import shutil

    from phi3_jax.convert.hf_tokenizer import read_hf_tokenizer

    shutil.copy(hf_path, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text('{"pad_token": {"content": "<unk>"}, "chat_template": "x"}')
    tok = read_hf_tokenizer(tmp_path)
    assert tok.pad_token == tok.eos_token == "<|endoftext|>" and tok.chat_template == "phi3"
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(DataError, match="tokenizer_config.json: not JSON"):
        read_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(DataError, match="tokenizer.json file not found"):
        read_hf_tokenizer(tmp_path)
