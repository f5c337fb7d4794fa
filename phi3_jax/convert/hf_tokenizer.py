"""A phi3_jax tokenizer as Hugging Face files: `tokenizer.json` and `tokenizer_config.json`.

`export-hf` writes them beside the weights, so `transformers.AutoTokenizer` (and phi3_jax's own `hf`
kind) load the tokenizer a model was trained with, its special tokens and chat template included:

- byte: a byte-level BPE with no merges: byte b is token b (in GPT-2's byte-to-character alphabet, the
  form `tokenizers` stores bytes in), the specials at their ids from 256.
- tiktoken: the ranks as a byte-level BPE, the merge list recovered from the ranks (each token's two
  parts are what byte-pair merging with the lower ranks makes of it), tiktoken's split regex first;
  `ignore_merges` takes a word that is itself a token whole, as tiktoken does.
- hf: the tokenizer.json as loaded.
- sentencepiece: its pieces, scores and ids as a `tokenizers` BPE (merges from the pieces, highest score
  first) or Unigram model with byte fallback, after its dummy "▁" prefix and spaces written as "▁"; the
  "identity" normaliser only (this project's trainer and Llama-style models use it). A model with a
  character map (nmt_nfkc), or that strips or collapses whitespace, has no exact form here (`export-hf
  --tokenizer none` exports the weights alone).

The chat templates become Jinja (`JINJA_TEMPLATES`), which transformers renders; tests check both render
the same text as `phi3_jax.data.render_chat`.
"""
from __future__ import annotations

import json
from pathlib import Path

from phi3_jax.data.errors import DataError
from phi3_jax.data.tokenizers import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer, Tokenizer

TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"

_TURN = "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
_END = "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
_APRIL = ("{% for message in messages %}{% if message['role'] == 'user' %}"
          "{{ '<|user|>\\n' + message['content'] + '<|end|>\\n<|assistant|>\\n' }}"
          "{% elif message['role'] == 'assistant' %}{{ message['content'] + '<|end|>\\n' }}{% endif %}{% endfor %}")
JINJA_TEMPLATES = {
    "phi3": "{% for message in messages %}" + _TURN + "{% endfor %}" + _END,
    "phi3.5": ("{% for message in messages %}{% if not (message['role'] == 'system' and message['content'] == '') %}"
               + _TURN + "{% endif %}{% endfor %}" + _END),
    "phi3-mini-april": "{{ bos_token }}" + _APRIL,
    "phi3-medium": _APRIL,
    "phi3-small": "{{ bos_token }}{% for message in messages %}" + _TURN + "{% endfor %}" + _END,
}


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, in which `tokenizers`' ByteLevel stores bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    out, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _chars(token: bytes, alphabet: dict[int, str]) -> str:
    return "".join(alphabet[b] for b in token)


def _byte_level_bpe(vocab: dict[str, int], merges: list[list[str]], specials: dict[str, int], *,
                    split_regex: str | None = None) -> dict:
    """tokenizer.json for a byte-level BPE; `split_regex` splits the text into words first.

    The specials are in the model's vocabulary as well as added tokens: `tokenizers` numbers an added token
    that is not in the vocabulary itself, after the vocabulary, so ids past a gap (Phi-3-small's at 100257)
    would move."""
    vocab = {**vocab, **specials}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    pre = byte_level if split_regex is None else {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": split_regex}, "behavior": "Isolated", "invert": False}, byte_level]}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for t, i in sorted(specials.items(), key=lambda kv: kv[1])]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": pre, "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": True, "vocab": vocab, "merges": merges}}


def _merge_parts(ranks: dict[bytes, int], token: bytes, below: int) -> list[bytes]:
    """`token` after byte-pair merging with the ranks under `below`, lowest rank first (tiktoken's rule)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < below and (best is None or r < best[1]):
                best = (i, r)
        if best is None:
            break
        i = best[0]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def tiktoken_json(tok: TiktokenTokenizer) -> dict:
    ranks = tok._enc._mergeable_ranks
    alphabet = byte_alphabet()
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise DataError(f"tiktoken ranks without the single bytes {missing[:5]}: no byte-level BPE form")
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _merge_parts(ranks, token, rank)
        if len(parts) != 2:
            raise DataError(f"tiktoken rank {rank} ({token!r}) is not the merge of two lower-ranked tokens: the "
                            "ranks have no byte-pair merge list")
        merges.append([_chars(parts[0], alphabet), _chars(parts[1], alphabet)])
    vocab = {_chars(t, alphabet): r for t, r in ranks.items()}
    return _byte_level_bpe(vocab, merges, tok.special_tokens, split_regex=tok._enc._pat_str)


def sentencepiece_json(tok: SentencePieceTokenizer) -> dict:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(tok._sp.serialized_model_proto())
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    path = tok._init_kwargs.get("path")
    # A normaliser's character map runs in `tokenizers` as "Precompiled", which differs from SentencePiece on
    # some input (CR LF under nmt_nfkc: one space in `tokenizers`, two in SentencePiece), so only "identity"
    # converts.
    unsupported = [name for name, bad in (("remove_extra_whitespaces", norm.remove_extra_whitespaces),
                                          (f"normaliser {norm.name!r}", bool(norm.precompiled_charsmap)),
                                          ("treat_whitespace_as_suffix", trainer.treat_whitespace_as_suffix),
                                          ("escape_whitespaces=false", not norm.escape_whitespaces))
                   if bad]
    if trainer.model_type not in (1, 2):  # UNIGRAM, BPE
        unsupported.append(f"model type {trainer.model_type}")
    if any(p.type == 4 for p in proto.pieces):  # USER_DEFINED: matched before the model runs, a step not written
        unsupported.append("user-defined pieces")
    if unsupported:
        raise DataError(f"{path}: SentencePiece {', '.join(unsupported)}: no exact tokenizer.json form here; pass "
                        "--tokenizer none to export the weights alone")
    pieces = [(p.piece, p.score) for p in proto.pieces]
    unk = next((i for i, p in enumerate(proto.pieces) if p.type == 2), None)  # UNKNOWN
    byte_fallback = bool(trainer.byte_fallback)
    if trainer.model_type == 1:
        model = {"type": "Unigram", "unk_id": unk, "vocab": [[p, s] for p, s in pieces],
                 "byte_fallback": byte_fallback}
    else:
        vocab = {p: i for i, (p, _) in enumerate(pieces)}
        merges = []  # every split of a piece into two pieces, ranked by the merged piece's score
        for i, (piece, score) in enumerate(pieces):
            if proto.pieces[i].type != 1:  # NORMAL pieces only: bytes, controls and unk are never merged
                continue
            local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
            merges += [(-score, vocab[a], vocab[b], a, b) for a, b in local]
        merges.sort()
        model = {"type": "BPE", "dropout": None, "unk_token": None if unk is None else pieces[unk][0],
                 "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                 "byte_fallback": byte_fallback, "ignore_merges": False, "vocab": vocab,
                 "merges": [[a, b] for *_, a, b in merges]}
    normalizers = []
    if norm.add_dummy_prefix:
        normalizers.append({"type": "Prepend", "prepend": "▁"})
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
    decoders = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]
    if norm.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for t, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])]
    extra = sorted((i, t) for t, i in tok.special_tokens.items() if i >= len(pieces))  # the added tokens
    if [i for i, _ in extra] != list(range(len(pieces), len(pieces) + len(extra))):
        raise DataError(f"{path}: special token ids {[i for i, _ in extra]} do not follow the {len(pieces)} pieces")
    if trainer.model_type == 1:  # Unigram's vocabulary is a list: an id is a position
        model["vocab"] += [[t, 0.0] for _, t in extra]
    else:
        model["vocab"].update({t: i for i, t in extra})
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": normalizers}, "pre_tokenizer": None,
            "post_processor": None, "decoder": {"type": "Sequence", "decoders": decoders}, "model": model}


def tokenizer_json(tok: Tokenizer) -> str:
    """The tokenizer as a tokenizer.json string; DataError for a kind with no exact form."""
    if isinstance(tok, ByteTokenizer):
        alphabet = byte_alphabet()
        d = _byte_level_bpe({alphabet[b]: b for b in range(256)}, [], tok.special_tokens)
    elif isinstance(tok, TiktokenTokenizer):
        d = tiktoken_json(tok)
    elif isinstance(tok, HFTokenizer):
        return tok._tok.to_str(pretty=True)
    elif isinstance(tok, SentencePieceTokenizer):
        d = sentencepiece_json(tok)
    else:
        raise DataError(f"a {tok.kind} tokenizer has no tokenizer.json form here; pass --tokenizer none to export "
                        "the weights alone, or --tokenizer hf:PATH for a tokenizer.json of the same ids")
    return json.dumps(d, ensure_ascii=False, indent=2)


def tokenizer_config(tok: Tokenizer, max_length: int) -> dict:
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token, "eos_token": tok.eos_token,
            "pad_token": tok.pad_token, "chat_template": JINJA_TEMPLATES[tok.chat_template],
            "model_max_length": int(max_length), "clean_up_tokenization_spaces": False}


def hf_tokenizer_files(tok: Tokenizer, max_length: int) -> dict[str, str]:
    """{file name: text} for an HF folder."""
    return {TOKENIZER_NAME: tokenizer_json(tok),
            TOKENIZER_CONFIG_NAME: json.dumps(tokenizer_config(tok, max_length), ensure_ascii=False, indent=2) + "\n"}


def read_hf_tokenizer(folder: str | Path) -> HFTokenizer:
    """An HF folder's tokenizer.json as phi3_jax's `hf` kind, with tokenizer_config.json's pad token and (when
    it is one of `JINJA_TEMPLATES`) chat template."""
    folder = Path(folder)
    conf = {}
    if (folder / TOKENIZER_CONFIG_NAME).is_file():
        try:
            conf = json.loads((folder / TOKENIZER_CONFIG_NAME).read_text())
        except ValueError as e:
            raise DataError(f"{folder / TOKENIZER_CONFIG_NAME}: not JSON ({e})") from None
    template = next((name for name, t in JINJA_TEMPLATES.items() if t == conf.get("chat_template")), None)

    def token(key):  # a string, or transformers' {"content": ...} form
        v = conf.get(key)
        return v.get("content") if isinstance(v, dict) else v

    try:
        return HFTokenizer(folder / TOKENIZER_NAME, chat_template=template, bos_token=token("bos_token"),
                           eos_token=token("eos_token"), pad_token=token("pad_token"))
    except DataError:  # a config naming a token tokenizer.json does not flag special: the file's own choice
        return HFTokenizer(folder / TOKENIZER_NAME, chat_template=template)
