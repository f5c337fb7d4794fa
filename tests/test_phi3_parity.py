"""Logits and gradients of phi3_jax against transformers' Phi3ForCausalLM on tiny random models.

Tolerances are max|Δ| / max|reference|: float32 < 1e-4 (observed ~3e-7). bfloat16 < 2e-2: both sides
round activations to bf16 but at different points (matmul accumulation order, where softmax and norms
return to bf16), so they differ by a few bf16 ulps of the largest logit; observed ~6e-3, the same size
as transformers' own bf16-vs-float32 difference on these models.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import phi3_jax
from phi3_jax.checkpoint import flatten, model_from_params, model_params
from phi3_jax.convert.hf_weights import params_to_hf
from phi3_jax.model.attention import window_bound
from phi3_jax.ops import Mask, dense_mask
from phi3_reference import hf_logits, jax_logits, load_hf, longrope_factors, make_hf, random_ids, rel_err, run_jit

F32_TOL = 1e-4
BF16_TOL = 2e-2
L0 = 32  # original_max_position_embeddings of the LongRoPE models


def longrope_fields(head_dim: int = 16) -> dict:
    short, long = longrope_factors(head_dim)
    return dict(max_position_embeddings=4 * L0, original_max_position_embeddings=L0,
                rope_parameters={"rope_type": "longrope", "short_factor": short, "long_factor": long,
                                 "rope_theta": 10000.0})


@pytest.fixture(scope="module")
def longrope_hf(tmp_path_factory):
    folder = make_hf(tmp_path_factory.mktemp("longrope"), seed=3, **longrope_fields())
    return folder, load_hf(folder)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_logits_float32(tmp_path, kv_heads):
    folder = make_hf(tmp_path, num_key_value_heads=kv_heads)
    ids = random_ids(2, 24)
    ref = hf_logits(load_hf(folder), ids)
    assert rel_err(jax_logits(folder, ids), ref) < F32_TOL
    if kv_heads == 2:  # the unrolled layer stack computes the same as the scanned default
        assert rel_err(jax_logits(folder, ids, scan=False), ref) < F32_TOL


def test_logits_sliding_window_hf_mode(tmp_path):
    # A 2-layer model with W = 8 over 40 tokens: the window binds for most positions.
    folder = make_hf(tmp_path, num_key_value_heads=2, sliding_window=8)
    ids = random_ids(2, 40)
    ref = hf_logits(load_hf(folder), ids)
    assert rel_err(jax_logits(folder, ids, sliding_window_mode="hf"), ref) < F32_TOL
    # The default ("flash", W + 1 keys) is a different model once the window binds.
    assert rel_err(jax_logits(folder, ids, sliding_window_mode="flash"), ref) > 1e-2


def test_flash_window_sees_w_plus_1_keys(tmp_path):
    W, T = 8, 40
    cfg = phi3_jax.get_preset("phi-3-tiny", sliding_window=W)
    for mode, keys in (("flash", W + 1), ("hf", W)):
        allowed_TS = np.asarray(dense_mask(Mask(window=window_bound(cfg.replace(sliding_window_mode=mode))),
                                           1, T, T, 1))[0, 0]
        assert allowed_TS.sum(-1).tolist() == [min(t + 1, keys) for t in range(T)], mode
    # Logit-level: the "flash" model with window W is transformers' model with window W + 1.
    folder = make_hf(tmp_path, sliding_window=W + 1)
    ids = random_ids(1, T)
    ref = hf_logits(load_hf(folder), ids)
    assert rel_err(jax_logits(folder, ids, sliding_window=W, sliding_window_mode="flash"), ref) < F32_TOL


@pytest.mark.parametrize("seq", [L0 // 2, L0, L0 + 1, 2 * L0], ids=["short", "at_L0", "L0+1", "long"])
def test_logits_longrope(longrope_hf, seq):
    folder, ref_model = longrope_hf
    ids = random_ids(2, seq, seed=seq)
    assert rel_err(jax_logits(folder, ids), hf_logits(ref_model, ids)) < F32_TOL


def test_longrope_switch_is_at_L0(longrope_hf):
    """The test above is sensitive to the switch: moving it by one token breaks parity at L0 and L0 + 1."""
    folder, ref_model = longrope_hf
    at_l0, past_l0 = random_ids(1, L0, seed=1), random_ids(1, L0 + 1, seed=2)
    # Switching one token early (long factors at exactly L0) or late (short at L0 + 1) changes the logits.
    assert rel_err(jax_logits(folder, at_l0, original_max_position_embeddings=L0 - 1),
                   hf_logits(ref_model, at_l0)) > 1e-2
    assert rel_err(jax_logits(folder, past_l0, original_max_position_embeddings=L0 + 1),
                   hf_logits(ref_model, past_l0)) > 1e-2


@pytest.mark.parametrize("fields", [dict(num_key_value_heads=2), dict(sliding_window=8), "longrope"],
                         ids=["gqa", "window", "longrope"])
def test_logits_bfloat16(tmp_path, fields):
    fields = longrope_fields() if fields == "longrope" else fields
    folder = make_hf(tmp_path, **fields)
    ids = random_ids(2, 40)
    changes = {"sliding_window_mode": "hf"} if "sliding_window" in fields else {}
    ours = jax_logits(folder, ids, dtype="bfloat16", **changes)
    ref = hf_logits(load_hf(folder, dtype=torch.bfloat16), ids)
    assert rel_err(ours, ref) < BF16_TOL
    # bf16 really ran: the float32 reference differs from both by more than float32 rounding.
    ref32 = hf_logits(load_hf(folder), ids)
    assert rel_err(ours, ref32) > 1e-5


def _torch_loss(model, ids_BT, targets_BT):
    logp = torch.log_softmax(model(torch.as_tensor(ids_BT, dtype=torch.long)).logits.float(), dim=-1)
    return -logp.gather(-1, torch.as_tensor(targets_BT, dtype=torch.long)[..., None]).mean()


def _jax_loss(params, cfg, ids_BT, targets_BT):
    logp_BTV = jax.nn.log_softmax(model_from_params(cfg, params)(ids_BT), axis=-1)
    return -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1).mean()


@pytest.mark.parametrize("fields", [dict(num_key_value_heads=2, sliding_window=8), "longrope"],
                         ids=["gqa_window", "longrope"])
def test_gradients_float32(tmp_path, fields):
    fields = longrope_fields() if fields == "longrope" else fields
    folder = make_hf(tmp_path, **fields)
    ids, targets = random_ids(2, 40, seed=1), random_ids(2, 40, seed=2)
    ref_model = load_hf(folder)
    _torch_loss(ref_model, ids, targets).backward()
    ref_grads = {name: p.grad.numpy() for name, p in ref_model.named_parameters()}

    model = phi3_jax.load(folder)
    cfg = model.cfg.replace(sliding_window_mode="hf")
    grads = run_jit(jax.grad(lambda p, i, t: _jax_loss(p, cfg, i, t)), model_params(model), ids, targets)
    # Map through the same table as the weights (transposes, per-layer names) and compare every tensor.
    ours = params_to_hf(cfg, {k: np.asarray(v) for k, v in flatten(grads).items()})
    assert set(ours) == set(ref_grads)
    for name, g in ours.items():
        assert g.shape == ref_grads[name].shape, name
        assert rel_err(g, ref_grads[name]) < F32_TOL, name
