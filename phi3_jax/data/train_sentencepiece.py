"""Train a SentencePiece BPE model on a local corpus.

    python -m phi3_jax.data.train_sentencepiece --input stdlib --vocab_size 8000 --out /tmp/stdlib_sp
    python -m phi3_jax.data.train_sentencepiece --input textbook:20000 data/*.jsonl --field text \\
        --vocab_size 4000 --out /tmp/mix_sp

Inputs: "stdlib" (the standard library's .py files), "textbook[:N]" (N synthetic lessons, default
10000), or paths (a file, directory or glob: .jsonl/.json files read `--field`, anything else is text).

Settings follow Llama-2's tokenizer (which Phi-3-mini uses): BPE, byte fallback (no unknown tokens),
digits split, no normalization and whitespace kept as is, so decode(encode(x)) == x for any text. No
dummy prefix is added, so encoding text in pieces and concatenating the ids decodes to the joined text.
The chat special tokens are NOT pieces of the model: `SentencePieceTokenizer` appends them after the
pieces (as Phi-3-mini's added tokens sit after its 32000 pieces), which keeps them out of plain text.
Writes PREFIX.model and PREFIX.vocab.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Iterator, Sequence

from phi3_jax.data.errors import DataError
from phi3_jax.data.sources import JsonlSource, StdlibSource, TextFilesSource, expand_paths
from phi3_jax.data.textbook import TextbookSource


def iter_documents(inputs: Sequence[str], field: str = "text") -> Iterator[str]:
    for spec in inputs:
        if spec == "stdlib":
            src = StdlibSource()
        elif spec.split(":")[0] == "textbook":
            n = int(spec.split(":")[1]) if ":" in spec else 10_000
            src = TextbookSource(num_docs=n, seed=0)
        else:
            files = expand_paths(spec, "--input")
            json_files = [f for f in files if f.suffix in (".jsonl", ".json")]
            for f in files:
                sub = JsonlSource(str(f), field=field) if f in json_files else TextFilesSource(str(f))
                yield from (sub[i]["text"] for i in range(len(sub)))
            continue
        yield from (src[i]["text"] for i in range(len(src)))


def iter_sentences(inputs: Sequence[str], field: str = "text", max_sentence_bytes: int = 4000) -> Iterator[str]:
    """SentencePiece trains on lines; long lines are cut to stay under its max_sentence_length."""
    for doc in iter_documents(inputs, field):
        for line in doc.splitlines():
            if line.strip():
                yield line.encode("utf-8")[:max_sentence_bytes].decode("utf-8", errors="ignore")


def train(inputs: Sequence[str], vocab_size: int, out: str, *, field: str = "text", model_type: str = "bpe",
          max_sentences: int = 2_000_000, character_coverage: float = 0.9995, quiet: bool = True) -> Path:
    import sentencepiece as spm

    if vocab_size < 260:
        raise DataError(f"--vocab_size must be at least 260 (256 byte pieces + <unk> <s> </s>), got {vocab_size}")
    prefix = Path(out).expanduser()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    sentences = itertools.islice(iter_sentences(inputs, field), max_sentences)
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences, model_prefix=str(prefix), vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
        character_coverage=character_coverage, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        max_sentence_length=16384, minloglevel=2 if quiet else 0)
    return prefix.with_suffix(prefix.suffix + ".model")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m phi3_jax.data.train_sentencepiece", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="stdlib | textbook[:N] | file/dir/glob ...")
    ap.add_argument("--vocab_size", type=int, required=True)
    ap.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    ap.add_argument("--field", default="text", help="JSON field holding the text in .jsonl inputs")
    ap.add_argument("--model_type", default="bpe", choices=("bpe", "unigram"))
    ap.add_argument("--max_sentences", type=int, default=2_000_000)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    try:
        path = train(args.input, args.vocab_size, args.out, field=args.field, model_type=args.model_type,
                     max_sentences=args.max_sentences, quiet=not args.verbose)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
