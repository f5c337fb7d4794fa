"""The KV-cache sampler equals naive greedy decoding that recomputes the whole prefix every token."""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from phi3_jax.generate import generate_batch, generate_ids, sample_text
from phi3_jax.model import get_preset, init_model


def _naive_greedy(model, prompt, n):
    """Greedy decoding by a full forward over the whole prefix for each token. The prefix is padded to one
    length so the forward compiles once; attention is causal, so the padding after it changes nothing."""
    forward = nnx.jit(lambda m, ids_BT: m(ids_BT))
    ids = list(prompt)
    for _ in range(n):
        padded = ids + [0] * (len(prompt) + n - len(ids))
        logits_BTV = forward(model, jnp.asarray([padded], jnp.int32))
        ids.append(int(jnp.argmax(logits_BTV[0, len(ids) - 1])))
    return ids[len(prompt):]


@pytest.mark.parametrize("scan_layers", [True, False])
def test_greedy_matches_naive_decode(scan_layers):
    cfg = get_preset("phi-3-tiny", vocab_size=64, initializer_range=0.5, attention_impl="xla", scan_layers=scan_layers)
    model = init_model(cfg, seed=3)
    prompt = [5, 9, 2, 33]
    got = generate_ids(model, prompt, 10)
    assert got == _naive_greedy(model, prompt, 10)
    assert len(got) == 10


@pytest.mark.parametrize("preset", ["phi-3-tiny", "phi-3-small-tiny"])
def test_weights_cast_once_give_the_same_logits(preset):
    """The sampler casts the float32 weight matrices to the compute dtype before its token loop; the model
    casts them there at use anyway, so logits are bit-equal, and vectors (norms, biases) are left alone."""
    from phi3_jax.generate import _matrices_in

    model = init_model(get_preset(preset, vocab_size=96, dtype="bfloat16", attention_impl="xla"), seed=2)
    graphdef, params = nnx.split(model)
    cast = _matrices_in(params, jnp.dtype(jnp.bfloat16))
    dtypes = {a.ndim >= 2: a.dtype for a in jax.tree.leaves(cast)}
    assert dtypes == {True: jnp.bfloat16, False: jnp.float32}
    ids = jnp.asarray([[5, 9, 2, 33, 7, 1, 60, 4]], jnp.int32)
    assert jnp.array_equal(nnx.merge(graphdef, cast)(ids), model(ids))


@pytest.mark.slow
def test_batch_of_prompts_of_different_lengths():
    """Each row equals its own single-prompt greedy decode, including a prompt longer than the bucket."""
    cfg = get_preset("phi-3-small-tiny", vocab_size=96, initializer_range=0.5, attention_impl="xla")
    model = init_model(cfg, seed=4)
    prompts = [[5, 9, 2, 33, 7, 1, 60], [3], list(range(10, 80))]
    got = generate_batch(model, prompts, 9, bucket=64)
    assert got == [_naive_greedy(model, p, 9) for p in prompts]


def test_top_k_one_is_greedy():
    cfg = get_preset("phi-3-tiny", vocab_size=64, initializer_range=0.5, attention_impl="xla")
    model = init_model(cfg, seed=3)
    assert generate_ids(model, [4, 4, 8], 8, temperature=0.7, top_k=1, seed=5) == generate_ids(model, [4, 4, 8], 8)


def test_stop_ids_and_sampling():
    cfg = get_preset("phi-3-tiny", vocab_size=64, initializer_range=0.5, attention_impl="xla")
    model = init_model(cfg, seed=3)
    full = generate_ids(model, [1, 2, 3], 12)
    cut = generate_ids(model, [1, 2, 3], 12, stop_ids=[full[4]])
    assert cut == full[:full.index(full[4])]
    a = generate_ids(model, [1, 2, 3], 12, temperature=1.0, seed=1)
    b = generate_ids(model, [1, 2, 3], 12, temperature=1.0, seed=1)
    assert a == b and all(0 <= t < 64 for t in a)
    assert generate_ids(model, [1, 2, 3], 12, temperature=1.0, seed=2) != a


@pytest.mark.parametrize("temperature,top_k", [(0.7, 0), (1.0, 0), (1.0, 3)])
def test_samples_follow_the_tempered_top_k_distribution(temperature, top_k):
    """2048 rows of one prompt, one token each: the tokens' frequencies are softmax(logits / T) over the k
    likeliest (total variation within sampling noise, about 0.01 here; the other settings are 0.05-0.1 off)."""
    import numpy as np

    cfg = get_preset("phi-3-tiny", vocab_size=64, initializer_range=0.5, attention_impl="xla")
    model = init_model(cfg, seed=3)
    prompt = [4, 4, 8]
    logits_V = np.asarray(model(jnp.asarray([prompt], jnp.int32))[0, -1], np.float64)

    def probs(t, k):
        z = logits_V / t
        if k:
            z = np.where(z >= np.sort(z)[-k], z, -np.inf)
        e = np.exp(z - z.max())
        return e / e.sum()

    n = 2048
    got = np.asarray(generate_batch(model, [prompt] * n, 1, temperature=temperature, top_k=top_k, seed=1))[:, 0]
    freq_V = np.bincount(got, minlength=64) / n
    assert 0.5 * np.abs(freq_V - probs(temperature, top_k)).sum() < 0.03
    for other in {(0.7, 0), (1.0, 0), (1.0, 3)} - {(temperature, top_k)}:
        assert 0.5 * np.abs(freq_V - probs(*other)).sum() > 0.04, other
    if top_k:
        assert set(got.tolist()) <= set(np.argsort(logits_V)[-top_k:].tolist())


def test_sample_text_with_byte_tokenizer():
    from phi3_jax.data import make_tokenizer

    tok = make_tokenizer("byte")
    cfg = get_preset("phi-3-tiny", vocab_size=tok.vocab_size, attention_impl="xla")
    model = init_model(cfg)
    text = sample_text(model, tok, "Exercise 1:", max_new_tokens=8)
    # The decoded greedy continuation of the encoded prompt, up to the first stop token.
    ids = _naive_greedy(model, tok.encode("Exercise 1:"), 8)
    stops = set(getattr(tok, "stop_ids", ()) or (tok.eos_id,))
    ids = ids[:min([i for i, t in enumerate(ids) if t in stops], default=len(ids))]
    assert isinstance(text, str) and text == tok.decode(ids, skip_special=True)


def test_cli_on_a_checkpoint_and_a_workdir(tmp_path, capsys):
    from train_helpers import load_config

    from phi3_jax.checkpoint import model_params, save_model
    from phi3_jax.data import make_tokenizer
    from phi3_jax.generate import main
    from phi3_jax.train import run

    tok = make_tokenizer("byte")
    cfg = get_preset("phi-3-tiny", vocab_size=tok.vocab_size, attention_impl="xla")
    save_model(tmp_path / "ckpt", cfg, model_params(init_model(cfg)))
    # A bare checkpoint records no tokenizer: one error naming the flag.
    assert main(["--ckpt", str(tmp_path / "ckpt"), "--prompt", "Hi"]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert main(["--ckpt", str(tmp_path / "ckpt"), "--prompt", "Hi", "--prompt", "Bye", "--tokenizer", "byte",
                 "--max_new_tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Hi") and "\nBye" in out
    # A training workdir: the tokenizer comes from the run's saved config.
    c = load_config("tiny", "test")
    c.train.steps = 2
    run(c, str(tmp_path / "wd"))
    capsys.readouterr()
    assert main(["--ckpt", str(tmp_path / "wd"), "--prompt", "Exercise 1:", "--max_new_tokens", "4", "--chat"]) == 0
    assert capsys.readouterr().out.startswith("Exercise 1:\n")
    # Sampling values out of range are one error line each.
    for flag, value in (("--max_new_tokens", "-3"), ("--temperature", "-1"), ("--top_k", "-2")):
        with pytest.raises(SystemExit) as e:
            main(["--ckpt", str(tmp_path / "wd"), "--prompt", "x", flag, value])
        assert e.value.code == 2 and f"{flag} must be >= 0" in capsys.readouterr().err
    assert main(["--ckpt", str(tmp_path / "wd"), "--prompt", "x", "--tokenizer", "hf"]) == 2
    assert "a hf tokenizer is read from a file; write hf:PATH" in capsys.readouterr().err
    assert main(["--ckpt", str(tmp_path / "wd"), "--prompt", "x", "--temperature", "1", "--top_k", "100000"]) == 2
    assert "--top_k 100000 is larger than the model's vocabulary" in capsys.readouterr().err
    # Past the model's positions: sampled, with a warning.
    assert main(["--ckpt", str(tmp_path / "wd"), "--prompt", "x" * 4095, "--max_new_tokens", "2"]) == 0
    assert "beyond the model's max_position_embeddings=4096" in capsys.readouterr().err
