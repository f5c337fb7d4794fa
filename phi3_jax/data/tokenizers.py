"""Tokenizers behind one interface: byte-level, SentencePiece, Hugging Face tokenizer.json, tiktoken.

Every tokenizer exposes `vocab_size` (embedding rows, padded to a multiple of 64), `encode`, `decode`,
`bos_id`, `eos_id`, `pad_id`, `special_tokens` (name -> id), `stop_ids`, `dummy_ids` (ids the model must
never emit; Phi-3-small's 91), `apply_chat_template` and `encode_chat` (a conversation's ids and which of
them the assistant wrote: the tokens supervised fine-tuning trains on).

`encode(text)` treats special-token strings in `text` as plain text, so a document that happens to
contain "<|endoftext|>" cannot inject a control token; prompts built by `apply_chat_template` are
encoded with `allow_special=True`.

No file is fetched over the network: every tokenizer loads from a local path.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import re
from pathlib import Path
from typing import Mapping, Sequence

from phi3_jax.data.chat_templates import CHAT_TEMPLATES, check_messages, render_chat
from phi3_jax.data.errors import DataError

ENDOFTEXT, SYSTEM, USER, ASSISTANT, END = "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_SPECIALS = (ENDOFTEXT, SYSTEM, USER, ASSISTANT, END)

# tiktoken's cl100k_base split pattern (tiktoken_ext.openai_public), which Phi-3-small reuses.
CL100K_PAT_STR = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")

# Phi-3-small special tokens (spec §8.2): cl100k ranks 0..100255 plus these, 100352 rows in all.
PHI3_SMALL_VOCAB_SIZE = 100352
PHI3_SMALL_SPECIAL_TOKENS: dict[str, int] = {
    ENDOFTEXT: 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
    SYSTEM: 100261, USER: 100262, ASSISTANT: 100263, "<|dummy_id_0|>": 100264, "<|dummy_id_1|>": 100265,
    END: 100266, "<|dummy_id_2|>": 100256,
    **{f"<|dummy_id_{k}|>": 100264 + k for k in range(3, 12)},  # 100267..100275
    "<|endofprompt|>": 100276,
    **{f"<|dummy_id_{k}|>": 100265 + k for k in range(12, 87)},  # 100277..100351: vocab padding
}
PHI3_SMALL_STOP_IDS = (100266, 100257)


def phi3_small_dummy_ids() -> tuple[int, ...]:
    """The 91 ids Phi-3-small masks out of its logits: every dummy plus the unused fim/endofprompt."""
    unused = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|endofprompt|>")
    return tuple(sorted(i for t, i in PHI3_SMALL_SPECIAL_TOKENS.items() if "dummy_id" in t or t in unused))


PHI3_SMALL_DUMMY_IDS = phi3_small_dummy_ids()

# Phi-3-mini / medium / 3.5 added tokens after the 32000 Llama-2 pieces (spec §8.1).
PHI3_MINI_ADDED_TOKENS: dict[str, int] = {
    ENDOFTEXT: 32000, ASSISTANT: 32001, "<|placeholder1|>": 32002, "<|placeholder2|>": 32003,
    "<|placeholder3|>": 32004, "<|placeholder4|>": 32005, SYSTEM: 32006, END: 32007,
    "<|placeholder5|>": 32008, "<|placeholder6|>": 32009, USER: 32010,
}
PHI3_MINI_STOP_IDS = (32000, 32001, 32007)


def pad_vocab(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def _check_file(path, what: str) -> Path:
    if path is None or str(path) == "":
        raise DataError(f"{what} needs a file path (tokenizer.path is empty)")
    p = Path(path).expanduser()
    if p.is_dir():
        raise DataError(f"{what}: {p} is a folder; give the file itself")
    if not p.is_file():
        raise DataError(f"{what} file not found: {p}")
    return p


def _checked_text(text) -> str:
    """`text`, with any lone surrogate (JSON's "\\ud800" decodes to one) replaced by U+FFFD, as tiktoken
    does: no UTF-8 encoder takes one, and one stray record must not stop a pipeline."""
    if not isinstance(text, str):
        raise DataError(f"encode expects str, got {type(text).__name__}")
    if not text.isascii():  # the common case costs one fast scan
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _rebuild(cls, kwargs):
    return cls(**kwargs)


class Tokenizer(abc.ABC):
    """Shared logic: special-token splitting, decoding around specials, chat templates, pickling.

    Subclasses implement `_encode_ordinary(text)` and `_decode_ordinary(ids)` for text without specials.
    """

    kind = "base"

    def __init__(self, *, special_tokens: Mapping[str, int], bos_token: str, eos_token: str, pad_token: str,
                 vocab_size: int, chat_template: str, stop_tokens: Sequence[str] = (END, ENDOFTEXT),
                 extra_stop_ids: Sequence[int] = (), dummy_ids: Sequence[int] = (), init_kwargs=None):
        self.special_tokens = dict(special_tokens)
        self._id_to_special = {i: t for t, i in self.special_tokens.items()}
        for name in (bos_token, eos_token, pad_token):
            if name not in self.special_tokens:
                raise DataError(f"{self.kind} tokenizer has no special token {name!r}")
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.vocab_size = int(vocab_size)
        if chat_template not in CHAT_TEMPLATES:
            raise DataError(f"unknown chat template {chat_template!r}; known: {CHAT_TEMPLATES}")
        self.chat_template = chat_template
        stops = [self.special_tokens[t] for t in stop_tokens if t in self.special_tokens] + list(extra_stop_ids)
        stops.append(self.special_tokens[eos_token])  # a document's end always stops sampling
        self.stop_ids = tuple(dict.fromkeys(stops))
        self.dummy_ids = tuple(dummy_ids)
        # Longest first, so "<|endoftext|>" wins over any special that is its prefix.
        alternation = "|".join(re.escape(t) for t in sorted(self.special_tokens, key=len, reverse=True))
        self._special_re = re.compile(f"({alternation})") if alternation else None
        self._init_kwargs = dict(init_kwargs or {})

    def __reduce__(self):
        # Rebuild from the constructor arguments: native tokenizer objects are not all picklable, and
        # grain worker processes receive the pipeline by pickle.
        return (_rebuild, (type(self), self._init_kwargs))

    @property
    def bos_id(self) -> int:
        return self.special_tokens[self.bos_token]

    @property
    def eos_id(self) -> int:
        return self.special_tokens[self.eos_token]

    @property
    def pad_id(self) -> int:
        return self.special_tokens[self.pad_token]

    @abc.abstractmethod
    def _encode_ordinary(self, text: str) -> list[int]:
        """Ids of `text` with special-token strings read as plain text."""

    @abc.abstractmethod
    def _decode_ordinary(self, ids: list[int]) -> str:
        """Text of ids that contain no special tokens."""

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        text = _checked_text(text)
        if not allow_special or self._special_re is None:
            return self._encode_ordinary(text)
        return self._encode_with_spans(text)[0]

    def _encode_with_spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(text, allow_special=True)` and each token's [start, end) characters in `text`: exact for
        specials; an ordinary token gets the span of the text between specials that it was encoded from."""
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        for k, piece in enumerate(self._special_re.split(text) if self._special_re is not None else [text]):
            if k % 2:  # odd pieces are the captured special tokens
                new = [self.special_tokens[piece]]
            else:
                new = self._encode_ordinary(piece) if piece else []
            ids += new
            spans += [(pos, pos + len(piece))] * len(new)
            pos += len(piece)
        return ids, spans

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        parts, run = [], []
        for i in (int(x) for x in ids):
            if i in self._id_to_special:
                if run:
                    parts.append(self._decode_ordinary(run))
                    run = []
                if not skip_special:
                    parts.append(self._id_to_special[i])
            else:
                run.append(i)
        if run:
            parts.append(self._decode_ordinary(run))
        return "".join(parts)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False,
                            *, tokenize: bool = False, template: str | None = None):
        """The chat prompt as a string, or as ids with `tokenize=True`."""
        text = render_chat(template or self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=self.bos_token, eos_token=self.eos_token)
        return self.encode(text, allow_special=True) if tokenize else text

    def encode_chat(self, messages: Sequence[Mapping[str, str]], *, template: str | None = None
                    ) -> tuple[list[int], list[int]]:
        """A conversation for supervised fine-tuning -> (ids, trained).

        `ids` is `apply_chat_template(messages, tokenize=True)`. `trained[i]` is 1 on the tokens that write an
        assistant message's content and its closing <|end|> (what the model learns to say; <|end|> is where
        sampling stops), 0 on everything else: system and user turns, role markers, bos and eos. Where a
        tokenizer encodes the newline after <|assistant|> together with the reply (byte, SentencePiece and
        tiktoken encode the text between two specials as one piece), that newline is trained too.

        As in transformers' `apply_chat_template` (and so as at inference), special-token strings inside
        the contents are read as those tokens: a reply that writes "<|end|>" trains the model to stop there.
        """
        template = template or self.chat_template
        check_messages(messages)
        # Lone surrogates replaced before measuring spans, so the spans index the text that is encoded.
        messages = [{"role": m["role"], "content": _checked_text(m["content"])} for m in messages]
        render = functools.partial(render_chat, template, bos_token=self.bos_token, eos_token=self.eos_token)
        text = render(messages, add_generation_prompt=False)
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            # The text before the reply is the prompt a sampler would be given: the reply starts there.
            start = len(render(messages[:k], add_generation_prompt=True))
            reply = m["content"] + END
            if text[start:start + len(reply)] != reply:
                raise DataError(f"chat template {template!r} does not write assistant message {k} as its content "
                                f"and {END} right after the prompt before it, so its tokens cannot be told apart")
            spans.append((start, start + len(reply)))
        ids, token_spans = self._encode_with_spans(text)
        trained = []
        for i, (s, e) in zip(ids, token_spans):
            if i in self._id_to_special:
                # By where it starts: a special's span can take in the whitespace after it (tokenizer.json's
                # rstrip flag), so <|assistant|> may reach into the reply it precedes.
                trained.append(int(any(a <= s < b for a, b in spans)))
            else:
                trained.append(int(any(max(s, a) < min(e, b) or a <= s < b for a, b in spans)))
        return ids, trained

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, chat_template={self.chat_template!r})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, then specials from 256; 320 rows. Needs no file: the default."""

    kind = "byte"
    SPECIALS = CHAT_SPECIALS + ("<|pad|>",)

    def __init__(self, chat_template: str | None = None):
        specials = {t: 256 + k for k, t in enumerate(self.SPECIALS)}
        super().__init__(special_tokens=specials, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, pad_token="<|pad|>",
                         vocab_size=pad_vocab(256 + len(specials)), chat_template=chat_template or "phi3",
                         init_kwargs={"chat_template": chat_template})

    def _encode_ordinary(self, text):
        return list(text.encode("utf-8"))

    def _decode_ordinary(self, ids):
        # Ids 262..319 are padding rows nothing encodes to; a sampled one decodes to nothing.
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece .model. A 32000-piece model gets Phi-3-mini's added tokens at 32000..32010 (the
    released layout); any other size gets the chat specials appended right after its pieces.

    For token-exact parity with a released Phi-3 tokenizer use its tokenizer.json (kind "hf"): that
    file also carries the added tokens' whitespace-stripping flags and the dummy-prefix handling
    around them, which plain SentencePiece does not know about.
    """

    kind = "sentencepiece"

    def __init__(self, path, chat_template: str | None = None):
        import sentencepiece as spm

        p = _check_file(path, "sentencepiece model")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(p))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with a C++ message
            raise DataError(f"not a SentencePiece model: {p} ({e})") from None
        n = self._sp.GetPieceSize()
        if n == 32000:
            added, extra_stops = dict(PHI3_MINI_ADDED_TOKENS), PHI3_MINI_STOP_IDS
        else:
            added, extra_stops = {t: n + k for k, t in enumerate(CHAT_SPECIALS)}, ()
        specials = dict(added)
        for piece_id, fallback in ((self._sp.bos_id(), "<s>"), (self._sp.eos_id(), "</s>"),
                                   (self._sp.unk_id(), "<unk>")):
            if piece_id >= 0:
                specials[self._sp.IdToPiece(piece_id)] = piece_id
        bos = self._sp.IdToPiece(self._sp.bos_id()) if self._sp.bos_id() >= 0 else ENDOFTEXT
        super().__init__(special_tokens=specials, bos_token=bos, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT,
                         vocab_size=pad_vocab(max(specials.values()) + 1), chat_template=chat_template or "phi3",
                         extra_stop_ids=extra_stops, init_kwargs={"path": str(p), "chat_template": chat_template})

    def _encode_ordinary(self, text):
        return list(self._sp.EncodeAsIds(text))

    def _decode_ordinary(self, ids):
        n = self._sp.GetPieceSize()
        return self._sp.DecodeIds([i for i in ids if 0 <= i < n])


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (the `tokenizers` library; no transformers, no remote code).

    Special tokens are the file's added tokens flagged special. The library itself matches them (so
    their `rstrip`/`lstrip` flags apply exactly as in transformers, spec §8.1) when allow_special=True;
    a second copy with `encode_special_tokens` set encodes them as text otherwise.
    """

    kind = "hf"

    def __init__(self, path, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None):
        from tokenizers import Tokenizer as _HF

        p = _check_file(path, "tokenizer.json")
        try:
            self._tok = _HF.from_file(str(p))
        except Exception as e:
            raise DataError(f"not a Hugging Face tokenizer.json: {p} ({e})") from None
        self._plain = _HF.from_str(self._tok.to_str())
        self._plain.encode_special_tokens = True
        specials = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        eos = eos_token or next((t for t in (ENDOFTEXT, "</s>") if t in specials), None)
        if eos is None:
            raise DataError(f"{p}: no <|endoftext|> or </s> special token to end documents with (a tokenizer "
                            "without one needs HFTokenizer(path, eos_token=...))")
        bos = bos_token or ("<s>" if "<s>" in specials else eos)
        extra = PHI3_MINI_STOP_IDS if specials.get(ASSISTANT) == 32001 else ()
        super().__init__(special_tokens=specials, bos_token=bos, eos_token=eos, pad_token=pad_token or eos,
                         vocab_size=pad_vocab(max(self._tok.get_vocab(with_added_tokens=True).values()) + 1),
                         chat_template=chat_template or "phi3", extra_stop_ids=extra,
                         init_kwargs={"path": str(p), "chat_template": chat_template, "bos_token": bos_token,
                                      "eos_token": eos_token, "pad_token": pad_token})

    def _encode_ordinary(self, text):
        return list(self._plain.encode(text, add_special_tokens=False).ids)

    def _decode_ordinary(self, ids):
        return self._tok.decode([int(i) for i in ids])

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        text = _checked_text(text)
        if not allow_special:
            return self._encode_ordinary(text)
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def _encode_with_spans(self, text):
        # The library's own offsets (characters of `text`), so its added-token stripping applies as in encode.
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)


class TiktokenTokenizer(Tokenizer):
    """tiktoken from a local BPE ranks file (base64 token, rank per line).

    preset "phi3-small": cl100k regex, Phi-3-small's specials and ids, 100352 rows, its chat template,
    stop ids (100266, 100257) and 91 dummy ids. preset "generic": the chat specials appended after the
    largest rank.
    """

    kind = "tiktoken"
    PRESETS = ("phi3-small", "generic")

    def __init__(self, path, preset: str = "phi3-small", chat_template: str | None = None,
                 pat_str: str = CL100K_PAT_STR):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        if preset not in self.PRESETS:
            raise DataError(f"unknown tiktoken preset {preset!r}; known: {self.PRESETS}")
        p = _check_file(path, "tiktoken BPE ranks")
        # tiktoken caches even local files under a key made from the path; passing the content hash
        # makes it notice when the file at that path has changed.
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        try:
            ranks = load_tiktoken_bpe(str(p), expected_hash=digest)
        except ValueError as e:
            raise DataError(f"not a tiktoken BPE ranks file: {p} ({e})") from None
        if not ranks:
            raise DataError(f"not a tiktoken BPE ranks file: {p} (no ranks in it)")
        if preset == "phi3-small":
            specials, vocab, template, dummies = (PHI3_SMALL_SPECIAL_TOKENS, PHI3_SMALL_VOCAB_SIZE,
                                                  "phi3-small", PHI3_SMALL_DUMMY_IDS)
            clash = set(ranks.values()) & set(specials.values())
            if clash:
                raise DataError(f"{p}: ranks {sorted(clash)[:5]} collide with Phi-3-small special ids")
        else:
            base = max(ranks.values()) + 1
            specials = {t: base + k for k, t in enumerate(CHAT_SPECIALS)}
            vocab, template, dummies = pad_vocab(base + len(specials)), "phi3", ()
        self._ranks = frozenset(ranks.values())
        self._enc = tiktoken.Encoding(name=f"phi3_jax_{preset}", pat_str=pat_str, mergeable_ranks=ranks,
                                      special_tokens=specials)
        super().__init__(special_tokens=specials, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT,
                         vocab_size=vocab, chat_template=chat_template or template, dummy_ids=dummies,
                         init_kwargs={"path": str(p), "preset": preset, "chat_template": chat_template,
                                      "pat_str": pat_str})

    def _encode_ordinary(self, text):
        return self._enc.encode_ordinary(text)

    def _decode_ordinary(self, ids):
        # tiktoken raises on ids that are neither ranks nor specials; a sampled unused row decodes to nothing.
        return self._enc.decode_bytes([i for i in ids if i in self._ranks]).decode("utf-8", errors="replace")


TOKENIZER_KINDS = ("byte", "sentencepiece", "hf", "tiktoken")
_ALIASES = {"sp": "sentencepiece", "huggingface": "hf", "tokenizer.json": "hf", "phi3-small": "tiktoken"}


def make_tokenizer(kind: str = "byte", path: str | None = None, *, chat_template: str | None = None,
                   preset: str | None = None) -> Tokenizer:
    """One tokenizer by kind: byte (no file), sentencepiece (.model), hf (tokenizer.json),
    tiktoken (BPE ranks file; preset phi3-small by default)."""
    kind = _ALIASES.get(kind, kind)
    chat_template = chat_template or None
    if kind == "byte":
        return ByteTokenizer(chat_template=chat_template)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path, chat_template=chat_template)
    if kind == "hf":
        return HFTokenizer(path, chat_template=chat_template)
    if kind == "tiktoken":
        return TiktokenTokenizer(path, preset=preset or "phi3-small", chat_template=chat_template)
    raise DataError(f"unknown tokenizer kind {kind!r}; known: {TOKENIZER_KINDS}")
