"""Incremental decoding with a KV cache gives the logits of the full forward pass, position by position."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi3_jax.model import ModelConfig, init_cache, init_model

PHI3 = ModelConfig(family="phi3", vocab_size=96, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                   head_dim=16, intermediate_size=96, sliding_window=9, max_position_embeddings=128,
                   original_max_position_embeddings=128)
PHI3SMALL = ModelConfig(family="phi3small", vocab_size=96, hidden_size=64, num_layers=4, num_heads=4,
                        num_kv_heads=2, head_dim=16, intermediate_size=128, embedding_multiplier=10.0,
                        attn_scale_multiplier=1.0, logit_divisor=2.0, tie_embeddings=True, rope_theta=1e6,
                        dense_attention_every_n_layers=2, blocksparse_block_size=4, blocksparse_local_blocks=2,
                        blocksparse_vert_stride=2, max_position_embeddings=128,
                        original_max_position_embeddings=128, dummy_token_ids=(95,))


@pytest.mark.parametrize("cfg", [PHI3, PHI3SMALL, PHI3.replace(scan_layers=False)], ids=["phi3", "phi3small", "unrolled"])
def test_prefill_then_decode_equals_full_forward(cfg):
    model = init_model(cfg, seed=1)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 95, (2, 30)), jnp.int32)
    full = model(ids)
    cache = init_cache(cfg, batch=2, capacity=40)
    got, cache = model(ids[:, :11], cache=cache)  # prefill
    steps = [got]
    for t in range(11, 30):  # then one token at a time
        logits, cache = model(ids[:, t:t + 1], cache=cache)
        steps.append(logits)
    got = jnp.concatenate(steps, axis=1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=2e-5 * float(jnp.abs(full).max()), rtol=0)
    assert cache.lengths_B.tolist() == [30, 30]


def test_rows_of_different_lengths():
    """Each row continues where its own cache ends: row 1's prompt is 5 tokens shorter."""
    model = init_model(PHI3SMALL, seed=2)
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 95, (2, 20)), jnp.int32)
    full = [model(ids[b:b + 1]) for b in range(2)]
    cache = init_cache(PHI3SMALL, batch=2, capacity=24)
    # Prefill both rows with 12 tokens, then declare row 1 only 7 long: its slots 7..11 get overwritten.
    _, cache = model(ids[:, :12], cache=cache)
    cache = cache.__class__(cache.k_LBSKH, cache.v_LBSKH, jnp.asarray([12, 7], jnp.int32))
    pos = [12, 7]
    for _ in range(6):
        step_ids = jnp.asarray([[ids[0, pos[0]]], [ids[1, pos[1]]]])
        logits, cache = model(step_ids, cache=cache)
        for b in range(2):
            want = full[b][0, pos[b]]
            np.testing.assert_allclose(np.asarray(logits[b, 0]), np.asarray(want), atol=2e-5 * float(jnp.abs(want).max()),
                                       rtol=0)
        pos = [p + 1 for p in pos]


def test_cache_rejects_segment_ids():
    model = init_model(PHI3)
    with pytest.raises(ValueError, match="segment ids"):
        model(jnp.zeros((1, 4), jnp.int32), segment_ids_BT=jnp.ones((1, 4), jnp.int32), cache=init_cache(PHI3, 1, 8))


def test_sparse_layers_decode_through_the_kernel():
    """impl="pallas": one-token steps of phi-3-small's sparse layers run the block-sparse decode kernel
    (interpreted here), and give the XLA path's logits."""
    from pallas_kernels.blocksparse import decode

    model = init_model(PHI3SMALL, seed=3)
    ids = jnp.asarray(np.random.RandomState(2).randint(0, 95, (2, 18)), jnp.int32)
    calls = []
    real = decode.blocksparse_decode
    outs = {}
    for impl in ("xla", "pallas"):
        cache = init_cache(PHI3SMALL, batch=2, capacity=24)
        _, cache = model(ids[:, :9], cache=cache, impl="xla")
        steps = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(decode, "blocksparse_decode", lambda *a, **kw: calls.append(impl) or real(*a, **kw))
            for t in range(9, 18):
                logits, cache = model(ids[:, t:t + 1], cache=cache, impl=impl)
                steps.append(logits)
        outs[impl] = jnp.concatenate(steps, axis=1)
    assert calls and set(calls) == {"pallas"}
    np.testing.assert_allclose(np.asarray(outs["pallas"]), np.asarray(outs["xla"]),
                               atol=2e-5 * float(jnp.abs(outs["xla"]).max()), rtol=0)


@pytest.mark.parametrize("cfg", [PHI3, PHI3SMALL], ids=["phi3", "phi3small"])
def test_prefill_into_an_empty_cache_is_self_attention(cfg):
    """A cache from init_cache is `empty`: the prefill attends among its own tokens (no query positions, no
    scores over the capacity), and gives the logits and cache of the general path through the cache."""
    import dataclasses

    from phi3_jax.model import attention as attention_module

    model = init_model(cfg, seed=5)
    ids = jnp.asarray(np.random.RandomState(3).randint(0, 95, (2, 13)), jnp.int32)
    masks = []
    real = attention_module.attention
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_module, "attention", lambda q, k, v, mask, **kw: masks.append((mask, k.shape)) or
                   real(q, k, v, mask, **kw))
        fresh = init_cache(cfg, batch=2, capacity=40)
        assert fresh.empty
        got, got_cache = model.forward(ids, cache=fresh, impl="xla")
        assert masks and all(m.q_index is None and shape[1] == 13 for m, shape in masks)
        masks.clear()
        want, want_cache = model.forward(ids, cache=dataclasses.replace(fresh, empty=False), impl="xla")
        assert masks and all(m.q_index is not None and shape[1] == 40 for m, shape in masks)
    assert not got_cache.empty
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5 * float(jnp.abs(want).max()), rtol=0)
    np.testing.assert_allclose(np.asarray(got_cache.k_LBSKH), np.asarray(want_cache.k_LBSKH), atol=1e-5, rtol=0)
    assert got_cache.lengths_B.tolist() == [13, 13]
