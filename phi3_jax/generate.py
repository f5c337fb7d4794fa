"""Sampling with a KV cache: greedy, temperature and top-k, for one prompt or a batch of prompts.

One jit per (prompt bucket, capacity, sampling settings): the prompts are padded to a multiple of
`bucket` tokens and prefilled in one forward pass; each row's cache length is then set to its real
prompt length, so the padding slots are overwritten by the first generated tokens and never seen
before (causality hides them). A `lax.scan` then feeds one token per row per step. Rows need not have
equal prompt lengths.

    text = sample_text(model, tokenizer, "Title: Arithmetic practice", max_new_tokens=100)
    new_ids = generate_batch(model, [prompt_a, prompt_b], max_new_tokens=32, temperature=0.8, top_k=40)

From the command line, for an HF folder, a phi3_jax checkpoint or a training workdir (the tokenizer is the
one the run trained with, or the folder's tokenizer.json, unless --tokenizer names one):

    python -m phi3_jax.generate --ckpt /tmp/phi3_tiny --prompt "Exercise 1: What is 12 + 7?" --max_new_tokens 60
"""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from phi3_jax.model.cache import KVCache, init_cache
from phi3_jax.model.layers import dtype_of


def _sample(logits_BV, key, temperature: float, top_k: int):
    logits_BV = logits_BV.astype(jnp.float32)
    if temperature <= 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def _matrices_in(params, dtype):
    """The weight matrices (embedding, projections, head) cast down to the compute dtype once, before the
    token loop. Every layer casts them to it where it uses them, so the values are the same; without this
    each decode step casts the float32 weights again (XLA does not hoist the casts out of the loop) and
    reads twice their bf16 bytes. Vectors (norm scales, biases) stay as they are."""
    def cast(a):
        down = jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize > dtype.itemsize
        return a.astype(dtype) if a.ndim >= 2 and down else a

    return jax.tree.map(cast, params)


@functools.partial(jax.jit, static_argnames=("graphdef", "capacity", "new_tokens", "temperature", "top_k"))
def _generate(graphdef, params, prompt_BP, lengths_B, key, *, capacity: int, new_tokens: int, temperature: float,
              top_k: int):
    cfg = nnx.merge(graphdef, params).cfg
    model = nnx.merge(graphdef, _matrices_in(params, dtype_of(cfg.dtype)))
    # Layers as a scan whatever the config chose: unrolled, XLA copies each layer's weights out of the
    # stacked arrays at every token (about twice the bytes a token; bench/RESULTS.md, sampler traffic).
    model.cfg = cfg.replace(scan_layers=True)
    B = prompt_BP.shape[0]
    logits_BPV, cache = model(prompt_BP, cache=init_cache(model.cfg, B, capacity))
    cache = KVCache(cache.k_LBSKH, cache.v_LBSKH, lengths_B)
    last_BV = logits_BPV[jnp.arange(B), lengths_B - 1]

    def step(carry, _):
        cache, logits_BV, key = carry
        key, sub = jax.random.split(key)
        next_B = _sample(logits_BV, sub, temperature, top_k)
        logits_B1V, cache = model(next_B[:, None], cache=cache)
        return (cache, logits_B1V[:, 0], key), next_B

    _, tokens_NB = jax.lax.scan(step, (cache, last_BV, key), None, length=new_tokens)
    return tokens_NB.T


def generate_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                   top_k: int = 0, seed: int = 0, stop_ids: Sequence[int] = (), pad_id: int = 0,
                   bucket: int = 64) -> list[list[int]]:
    """The new token ids after each prompt, each cut before its first stop id.

    `model` is a Decoder, or a (graphdef, params) pair as the trainer holds them. temperature 0 is greedy.
    """
    graphdef, params = model if isinstance(model, tuple) else nnx.split(model)
    prompts = [list(p) for p in prompts]
    if not prompts or any(not p for p in prompts):
        raise ValueError("generate: every prompt must hold at least one token")
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    padded = -(-max(len(p) for p in prompts) // bucket) * bucket
    capacity = -(-(padded + max_new_tokens) // bucket) * bucket
    prompt_BP = jnp.asarray([p + [pad_id] * (padded - len(p)) for p in prompts], jnp.int32)
    lengths_B = jnp.asarray([len(p) for p in prompts], jnp.int32)
    out_BN = _generate(graphdef, params, prompt_BP, lengths_B, jax.random.key(seed), capacity=capacity,
                       new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k))
    stops = set(int(s) for s in stop_ids)
    results = []
    for row in jax.device_get(out_BN).tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        results.append(row[:cut])
    return results


def generate_ids(model, prompt_ids: Sequence[int], max_new_tokens: int, **kwargs) -> list[int]:
    """The new token ids after one prompt (see `generate_batch` for the options)."""
    return generate_batch(model, [prompt_ids], max_new_tokens, **kwargs)[0]


def sample_text(model, tokenizer, prompt: str, max_new_tokens: int = 200, *, temperature: float = 0.0,
                top_k: int = 0, seed: int = 0, chat: bool = False) -> str:
    """Prompt text -> the generated continuation (text only; the prompt is not repeated). `chat`: the prompt
    is a user message, wrapped in the tokenizer's chat template."""
    ids = (tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=True) if chat else tokenizer.encode(prompt))
    if not ids:
        ids = [tokenizer.bos_id]
    stop = tuple(getattr(tokenizer, "stop_ids", ()) or (tokenizer.eos_id,))
    new = generate_ids(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                       stop_ids=stop, pad_id=tokenizer.pad_id)
    return tokenizer.decode(new, skip_special=True)


def recorded_tokenizer(path):
    """The tokenizer stored with the model at `path`: the training run's (from its saved config), else the
    tokenizer.json of an HF folder or of a checkpoint imported from one; None if there is none."""
    from phi3_jax.checkpoint import read_train_config, resolve
    from phi3_jax.convert.hf_tokenizer import TOKENIZER_NAME, read_hf_tokenizer
    from phi3_jax.data.pipeline import make_tokenizer_from_config

    train_config = read_train_config(path)
    if train_config is not None:
        return make_tokenizer_from_config(train_config.get("data"))
    src = resolve(path)
    if src.kind in ("hf", "checkpoint") and (src.path / TOKENIZER_NAME).is_file():
        return read_hf_tokenizer(src.path)
    return None


def tokenizer_for(path, spec: str | None = None):
    """The tokenizer to sample from the model at `path` with: `spec` ("KIND" or "KIND:PATH") if given, else
    `recorded_tokenizer(path)`."""
    from phi3_jax.data import TOKENIZER_KINDS, make_tokenizer

    if spec:
        kind, _, file = spec.partition(":")
        if not file and kind in TOKENIZER_KINDS and kind != "byte":
            raise ValueError(f"--tokenizer {spec}: a {kind} tokenizer is read from a file; write {kind}:PATH")
        return make_tokenizer(kind, file or None)
    tok = recorded_tokenizer(path)
    if tok is None:
        raise ValueError(f"{path}: no tokenizer recorded (no training config, no tokenizer.json); pass --tokenizer "
                         "KIND[:PATH] (byte, sentencepiece, hf, tiktoken)")
    return tok


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m phi3_jax.generate",
                                description="Sample continuations of prompts from a Hugging Face folder, a phi3_jax "
                                            "checkpoint or a training workdir (its latest checkpoint).")
    p.add_argument("--ckpt", required=True, help="HF folder, checkpoint or training workdir")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    p.add_argument("--tokenizer", help="KIND or KIND:PATH (default: the one the checkpoint was trained with)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast the weights (default: as saved)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, value in (("--max_new_tokens", args.max_new_tokens), ("--temperature", args.temperature),
                        ("--top_k", args.top_k)):
        if value < 0:
            parser.error(f"{name} must be >= 0, got {value}")
    from phi3_jax.checkpoint import CheckpointError, load_model
    from phi3_jax.model.config import ConfigError

    try:
        model = load_model(args.ckpt, args.dtype)
        tok = tokenizer_for(args.ckpt, args.tokenizer)
        if tok.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tok.vocab_size} ids, the model {model.cfg.vocab_size}: pass the "
                             "--tokenizer the model was trained with")
        if args.top_k > model.cfg.vocab_size:
            raise ValueError(f"--top_k {args.top_k} is larger than the model's vocabulary ({model.cfg.vocab_size})")
    except (CheckpointError, ConfigError, ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.chat:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
                   for p in args.prompt]
    else:
        prompts = [tok.encode(p) or [tok.bos_id] for p in args.prompt]
    longest = max(len(p) for p in prompts) + args.max_new_tokens
    if longest > model.cfg.max_position_embeddings:
        print(f"warning: prompt + --max_new_tokens reach {longest} positions, beyond the model's "
              f"max_position_embeddings={model.cfg.max_position_embeddings}", file=sys.stderr)
    stop = tuple(getattr(tok, "stop_ids", ()) or (tok.eos_id,))
    outs = generate_batch(model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          seed=args.seed, stop_ids=stop, pad_id=tok.pad_id)
    for text, new in zip(args.prompt, outs):
        print(text + ("\n" if args.chat else "") + tok.decode(new, skip_special=True))  # chat: the reply on its own line
        if len(outs) > 1:
            print("-" * 40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
