"""The minimal sampler: the padded, full-recompute decode equals naive step-by-step greedy decoding."""
import jax
import jax.numpy as jnp

from phi3_jax.generate import generate_ids, sample_text
from phi3_jax.model import get_preset, init_model


def _naive_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits = model(jnp.asarray([ids], jnp.int32))
        ids.append(int(jnp.argmax(logits[0, -1])))
    return ids[len(prompt):]


def test_greedy_matches_naive_decode():
    cfg = get_preset("phi-3-tiny", vocab_size=64, initializer_range=0.5, attention_impl="xla")
    model = init_model(cfg, seed=3)
    prompt = [5, 9, 2, 33]
    got = generate_ids(model, prompt, 10)
    assert got == _naive_greedy(model, prompt, 10)
    assert len(got) == 10


def test_stop_ids_and_sampling():
    cfg = get_preset("phi-3-tiny", vocab_size=64, initializer_range=0.5, attention_impl="xla")
    model = init_model(cfg, seed=3)
    full = generate_ids(model, [1, 2, 3], 12)
    cut = generate_ids(model, [1, 2, 3], 12, stop_ids=[full[4]])
    assert cut == full[:full.index(full[4])]
    a = generate_ids(model, [1, 2, 3], 12, temperature=1.0, seed=1)
    b = generate_ids(model, [1, 2, 3], 12, temperature=1.0, seed=1)
    assert a == b and all(0 <= t < 64 for t in a)


def test_sample_text_with_byte_tokenizer():
    from phi3_jax.data import make_tokenizer

    tok = make_tokenizer("byte")
    cfg = get_preset("phi-3-tiny", vocab_size=tok.vocab_size, attention_impl="xla")
    text = sample_text(init_model(cfg), tok, "Exercise 1:", max_new_tokens=8)
    assert isinstance(text, str)
