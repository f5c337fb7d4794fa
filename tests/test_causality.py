"""No information flows from later tokens to earlier logits (nor, with a sliding window, from too far back).

The probe needs no hook in the model: with all token ids distinct, embedding row ids[s] is read only at
position s (and the LM head is untied), so d logits[t] / d embedding[ids[s]] is exactly the gradient
with respect to the embedding output at position s. Masked attention must make it exactly zero, not
merely small.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi3_jax.checkpoint import model_from_params, model_params
from phi3_jax.model import get_preset, init_model
from phi3_reference import longrope_factors, run_jit

T = 24


def influence_TS(cfg, seed: int = 0, segment_ids_T=None, positions_T=None) -> np.ndarray:
    """|d logits[t] · r / d x[s]| summed over the embedding dims: [T, S] (distinct ids, random r), of one
    row, or of a packed row when segment ids and positions are given."""
    model = init_model(cfg, seed=seed)
    params = model_params(model)
    rng = np.random.RandomState(seed)
    ids_T = jnp.asarray(rng.permutation(cfg.vocab_size)[:T], jnp.int32)
    r_V = jnp.asarray(rng.randn(cfg.vocab_size), jnp.float32)

    def probe_T(embedding_VD, params):
        params = {**params, "embed_tokens": {"embedding": embedding_VD}}
        packed = {} if segment_ids_T is None else dict(segment_ids_BT=jnp.asarray(segment_ids_T)[None],
                                                       positions_BT=jnp.asarray(positions_T)[None])
        return model_from_params(cfg, params)(ids_T[None], **packed)[0] @ r_V

    # A model whose norms are not all one, so no term vanishes by symmetry.
    params = jax.tree.map(lambda a: a + 0.05 * jnp.asarray(rng.randn(*a.shape), a.dtype), params)
    jac_TVD = run_jit(jax.jacrev(probe_T), params["embed_tokens"]["embedding"], params)
    return np.abs(np.asarray(jac_TVD)[:, np.asarray(ids_T), :]).sum(-1)


def tiny(**changes):
    return get_preset("phi-3-tiny", **changes)


@pytest.mark.parametrize("changes", [{}, dict(num_kv_heads=4), "longrope"], ids=["gqa", "mha", "longrope"])
def test_later_tokens_have_zero_gradient(changes):
    if changes == "longrope":
        short, long = longrope_factors(32)
        # T > L0: the long factors are in use.
        changes = dict(original_max_position_embeddings=T // 2, rope_scaling="longrope",
                       rope_short_factor=tuple(short), rope_long_factor=tuple(long))
    g_TS = influence_TS(tiny(**changes))
    t, s = np.indices(g_TS.shape)
    assert np.all(g_TS[s > t] == 0.0)
    assert np.all(g_TS[s <= t] > 0.0)  # every earlier token does reach every later position


@pytest.mark.parametrize("mode,bound", [("flash", 5), ("hf", 4)])
def test_sliding_window_one_layer(mode, bound):
    # One layer, W = 5: position t sees exactly s with 0 <= t - s <= bound (W + 1 keys "flash", W "hf").
    g_TS = influence_TS(tiny(num_layers=1, sliding_window=5, sliding_window_mode=mode))
    t, s = np.indices(g_TS.shape)
    visible = (t - s >= 0) & (t - s <= bound)
    assert np.all(g_TS[~visible] == 0.0)
    assert np.all(g_TS[visible] > 0.0)


def test_sliding_window_stacks_over_layers():
    # Two layers widen the receptive field to 2 * bound, never past it.
    g_TS = influence_TS(tiny(num_layers=2, sliding_window=5, sliding_window_mode="flash"))
    t, s = np.indices(g_TS.shape)
    assert np.all(g_TS[(s > t) | (t - s > 10)] == 0.0)
    assert np.all(g_TS[(t - s >= 0) & (t - s <= 10)] > 0.0)


def test_packed_documents_never_see_each_other():
    # A packed row of three documents: a token's logits depend on exactly the earlier tokens of its own
    # document, and equal that document's logits on its own (positions restart at each document).
    lengths = (7, 9, 8)
    seg_T = np.repeat(np.arange(1, 4), lengths).astype(np.int32)
    pos_T = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    cfg = tiny()
    g_TS = influence_TS(cfg, segment_ids_T=seg_T, positions_T=pos_T)
    t, s = np.indices(g_TS.shape)
    visible = (s <= t) & (seg_T[t] == seg_T[s])
    assert np.all(g_TS[~visible] == 0.0)
    assert np.all(g_TS[visible] > 0.0)

    model = init_model(cfg, seed=1)
    ids_T = np.random.RandomState(1).randint(0, cfg.vocab_size, T).astype(np.int32)
    packed_TV = np.asarray(model(jnp.asarray(ids_T)[None], segment_ids_BT=jnp.asarray(seg_T)[None],
                                 positions_BT=jnp.asarray(pos_T)[None]))[0]
    for d in range(1, 4):
        alone_TV = np.asarray(model(jnp.asarray(ids_T[seg_T == d])[None]))[0]
        np.testing.assert_allclose(packed_TV[seg_T == d], alone_TV, rtol=1e-5, atol=1e-5)
    unpacked_TV = np.asarray(model(jnp.asarray(ids_T)[None]))[0]
    assert np.abs(unpacked_TV[seg_T == 3] - packed_TV[seg_T == 3]).max() > 1e-2  # the check can fail
