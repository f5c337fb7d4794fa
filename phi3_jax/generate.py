"""Sampling with a KV cache: greedy, temperature and top-k, for one prompt or a batch of prompts.

One jit per (prompt bucket, capacity, sampling settings): the prompts are padded to a multiple of
`bucket` tokens and prefilled in one forward pass; each row's cache length is then set to its real
prompt length, so the padding slots are overwritten by the first generated tokens and never seen
before (causality hides them). A `lax.scan` then feeds one token per row per step. Rows need not have
equal prompt lengths.

    text = sample_text(model, tokenizer, "Title: Arithmetic practice", max_new_tokens=100)
    new_ids = generate_batch(model, [prompt_a, prompt_b], max_new_tokens=32, temperature=0.8, top_k=40)
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from phi3_jax.model.cache import KVCache, init_cache


def _sample(logits_BV, key, temperature: float, top_k: int):
    logits_BV = logits_BV.astype(jnp.float32)
    if temperature <= 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "capacity", "new_tokens", "temperature", "top_k"))
def _generate(graphdef, params, prompt_BP, lengths_B, key, *, capacity: int, new_tokens: int, temperature: float,
              top_k: int):
    model = nnx.merge(graphdef, params)
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
                top_k: int = 0, seed: int = 0) -> str:
    """Prompt text -> the generated continuation (text only; the prompt is not repeated)."""
    ids = tokenizer.encode(prompt)
    if not ids:
        ids = [tokenizer.bos_id]
    stop = tuple(getattr(tokenizer, "stop_ids", ()) or (tokenizer.eos_id,))
    new = generate_ids(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                       stop_ids=stop, pad_id=tokenizer.pad_id)
    return tokenizer.decode(new, skip_special=True)
