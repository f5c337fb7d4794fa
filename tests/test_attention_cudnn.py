"""impl="cudnn" against autodiff of reference_attention (GPU), and the packed-document description cuDNN
gets for segment ids (any host)."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phi3_jax.ops import Mask, attention, reference_attention
from phi3_jax.ops.attention import segment_runs

attention_mod = importlib.import_module("phi3_jax.ops.attention")  # the package exports a function of that name


def packed_rows(rng, B, T, max_docs, pad=True):
    """Rows of contiguous documents 1, 2, ... with an optional padding tail of 0s (as the packer writes)."""
    rows = []
    for _ in range(B):
        n = int(rng.integers(1, max_docs + 1))
        cuts = np.sort(rng.choice(np.arange(1, T), size=n - 1, replace=False)) if n > 1 else np.array([], int)
        seg = np.searchsorted(cuts, np.arange(T), side="right") + 1
        if pad and rng.random() < 0.5:
            seg[T - int(rng.integers(1, T // 4)):] = 0
        rows.append(seg)
    return np.stack(rows).astype(np.int32)


def mask_from_runs(lengths_BM, starts_BM1, T):
    """The [B, T, T] same-document mask the packed description stands for (tokens outside every run see
    nothing)."""
    doc_BT = np.full((len(lengths_BM), T), -1)
    for b, (lens, starts) in enumerate(zip(lengths_BM, starts_BM1)):
        for m, (n, s) in enumerate(zip(lens, starts[:-1])):
            if n >= 0:
                doc_BT[b, s:s + n] = m
    return (doc_BT[:, :, None] == doc_BT[:, None, :]) & (doc_BT[:, :, None] >= 0)


@pytest.mark.parametrize("seed", range(4))
def test_segment_runs_describe_the_segment_mask(seed):
    rng = np.random.default_rng(seed)
    T, M = 48, 8
    seg = packed_rows(rng, 5, T, max_docs=M - 1)
    lengths, starts, fits = jax.jit(segment_runs, static_argnums=1)(jnp.asarray(seg), M)
    lengths, starts = np.asarray(lengths), np.asarray(starts)
    assert bool(fits) and lengths.shape == (5, M) and starts.shape == (5, M + 1)
    np.testing.assert_array_equal(mask_from_runs(lengths, starts, T), seg[:, :, None] == seg[:, None, :])
    assert np.all(lengths.sum(axis=1, where=lengths >= 0) == T)  # every token, padding included, is covered
    assert np.all(starts[:, -1] == -1)


def test_segment_runs_flag_rows_with_more_documents_than_slots():
    seg = np.repeat(np.arange(1, 11), 4)[None].astype(np.int32)  # 10 documents of 4 tokens
    assert bool(segment_runs(jnp.asarray(seg), 10)[2])
    assert not bool(segment_runs(jnp.asarray(seg), 9)[2])


B, T, H = 2, 256, 64


def inputs(heads, kv_heads, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v = (jax.random.normal(kk, (B, T, n, H), jnp.float32).astype(jnp.bfloat16)
               for kk, n in zip(keys[:3], (heads, kv_heads, kv_heads)))
    w = jax.random.normal(keys[3], (B, T, heads, H), jnp.float32)
    return q, k, v, w


def value_and_grads(fn, q, k, v, w):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * w)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)


SEGMENTS = packed_rows(np.random.default_rng(7), B, T, max_docs=6)


@pytest.mark.gpu
@pytest.mark.parametrize("name,mask", [
    ("causal", Mask()),
    ("window", Mask(window=37)),
    ("packed", Mask(q_segment_ids=SEGMENTS)),
    ("packed_window", Mask(q_segment_ids=SEGMENTS, window=37)),
])
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2)])
def test_cudnn_matches_autodiff_of_reference(name, mask, heads, kv_heads):
    q, k, v, w = inputs(heads, kv_heads)
    got = value_and_grads(lambda q, k, v: attention(q, k, v, mask, scale=0.125, impl="cudnn"), q, k, v, w)
    ref = value_and_grads(lambda q, k, v: reference_attention(q, k, v, mask, 0.125), q, k, v, w)
    out = attention(q, k, v, mask, scale=0.125, impl="cudnn")
    assert rel_err(out, reference_attention(q, k, v, mask, 0.125)) < 2e-2
    # The loss is a sum with cancellation over B*T*heads*H terms, so a bf16 rounding apart per output
    # element moves it past any relative bound (the reference itself in float32 and in bf16: -14.95 and
    # -14.52 for the packed GQA rows); it is held to the forward output it sums, checked just above.
    np.testing.assert_allclose(float(got[0]), float(jnp.sum(out.astype(jnp.float32) * w)), rtol=1e-5, atol=1e-3)
    for g, r in zip(got[1], ref[1]):
        assert np.all(np.isfinite(np.asarray(g, np.float32))) and rel_err(g, r) < 3e-2


@pytest.mark.gpu
def test_cudnn_rows_with_more_documents_than_slots_take_the_mask(monkeypatch):
    """A batch with a row of more documents than CUDNN_MAX_SEGMENTS runs with a dense segment mask, same
    values (0 slots: always the mask); under the limit the packed layout gives the same values too."""
    q, k, v, _ = inputs(8, 2, seed=1)
    seg = np.repeat(np.arange(1, 17), T // 16)[None].repeat(B, 0).astype(np.int32)
    mask = Mask(q_segment_ids=seg)
    ref = reference_attention(q, k, v, mask, 0.125)
    for slots in (0, 8, 16):
        monkeypatch.setattr(attention_mod, "CUDNN_MAX_SEGMENTS", slots)
        out = jax.jit(lambda q, k, v: attention(q, k, v, mask, scale=0.125, impl="cudnn"))(q, k, v)
        assert rel_err(out, ref) < 2e-2, slots
