"""A minimal sampler: greedy or temperature sampling, without a KV cache.

Each new token recomputes the whole prefix: the sequence lives in a fixed buffer of `total` tokens
(prompt + max_new_tokens, rounded up to a multiple of 64 so that prompts of similar length share one
compilation), and a `lax.fori_loop` inside one jit runs the model over the full buffer at every step and
reads the logits at the last filled position. Causal attention makes the unfilled tail invisible to the
positions that matter, so the result equals step-by-step decoding. O(n^2) work: fine for showing what a
small model learned; a KV-cache decoder replaces it for real use.

    text = sample_text(model, tokenizer, "Title: Arithmetic practice", max_new_tokens=100)
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len", "total", "temperature", "top_k"))
def _decode(graphdef, params, buf_1T, key, *, prompt_len: int, total: int, temperature: float, top_k: int):
    model = nnx.merge(graphdef, params)

    def step(t, carry):
        buf_1T, key = carry
        logits_V = model(buf_1T)[0, t - 1].astype(jnp.float32)
        if temperature <= 0.0:
            nxt = jnp.argmax(logits_V)
        else:
            key, sub = jax.random.split(key)
            logits_V = logits_V / temperature
            if top_k > 0:
                kth = jax.lax.top_k(logits_V, top_k)[0][-1]
                logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
            nxt = jax.random.categorical(sub, logits_V)
        return buf_1T.at[0, t].set(nxt.astype(buf_1T.dtype)), key

    buf_1T, _ = jax.lax.fori_loop(prompt_len, total, step, (buf_1T, key))
    return buf_1T


def generate_ids(model, prompt_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int = 0, seed: int = 0, stop_ids: Sequence[int] = (), pad_id: int = 0,
                 bucket: int = 64) -> list[int]:
    """The new token ids after `prompt_ids` (cut before the first stop id).

    `model` is a Decoder, or a (graphdef, params) pair as the trainer holds them.
    """
    if isinstance(model, tuple):
        graphdef, params = model
    else:
        graphdef, params = nnx.split(model)
    prompt_ids = list(prompt_ids)
    if not prompt_ids:
        raise ValueError("generate: the prompt must hold at least one token")
    if max_new_tokens <= 0:
        return []
    need = len(prompt_ids) + max_new_tokens
    total = -(-need // bucket) * bucket
    buf = jnp.full((1, total), pad_id, jnp.int32).at[0, :len(prompt_ids)].set(jnp.asarray(prompt_ids, jnp.int32))
    out = _decode(graphdef, params, buf, jax.random.key(seed), prompt_len=len(prompt_ids), total=need,
                  temperature=float(temperature), top_k=int(top_k))
    new = [int(t) for t in jax.device_get(out)[0, len(prompt_ids):need]]
    stops = set(int(s) for s in stop_ids)
    for i, t in enumerate(new):
        if t in stops:
            return new[:i]
    return new


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
