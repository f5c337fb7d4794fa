"""Tiny Hugging Face Phi-3 reference models built offline from a Phi3Config, for parity tests.

The reference is transformers' Phi3ForCausalLM with eager attention, saved with save_pretrained and read
back through phi3_jax's own importer, so every parity test also exercises the import path.
"""
from __future__ import annotations

import numpy as np

import phi3_jax

# torch and transformers are imported where used: the JAX-only tests that share the helpers below
# should not pay for them.

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128, original_max_position_embeddings=128,
            sliding_window=None, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def longrope_factors(head_dim: int, seed: int = 0) -> tuple[list[float], list[float]]:
    """Short factors near 1 and long factors well above 1, so picking the wrong set changes the logits."""
    rng = np.random.RandomState(seed)
    half = head_dim // 2
    short = (1.0 + 0.5 * rng.rand(half)).tolist()
    long = (1.0 + np.linspace(0.0, 30.0, half) + rng.rand(half)).tolist()
    return short, long


def make_hf(tmp_dir, seed: int = 0, **overrides) -> str:
    """Writes a random float32 Phi3ForCausalLM to tmp_dir; returns the folder."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    fields = {**TINY, **overrides}
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(Phi3Config(**fields))
    with torch.no_grad():  # the default init leaves norms at 1: perturb them so their mapping is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = str(tmp_dir)
    model.save_pretrained(folder)
    return folder


def load_hf(folder: str, dtype=None, attn: str = "eager"):
    """The reference model from a folder, in `dtype` (default float32; RoPE buffers stay float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, attn_implementation=attn).eval()


def hf_logits(model, ids_BT: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(ids_BT, dtype=torch.long)).logits.float().numpy()


def run_jit(fn, *args):
    """fn(*args) jitted with XLA's backend optimisations off: tiny test models compile in half the time,
    and the numerics under test do not depend on it."""
    import jax

    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def jax_logits(folder: str, ids_BT: np.ndarray, dtype: str = "float32", scan: bool = True,
               **cfg_changes) -> np.ndarray:
    """phi3_jax's logits, `cfg_changes` applied to the imported config."""
    from flax import nnx

    from phi3_jax.checkpoint import model_from_params, model_params

    model = phi3_jax.load(folder, dtype=dtype)
    model = model_from_params(model.cfg.replace(scan_layers=scan, **cfg_changes), model_params(model))
    graphdef, state = nnx.split(model)
    return np.asarray(run_jit(lambda st, ids: nnx.merge(graphdef, st)(ids), state, ids_BT.astype(np.int32)))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def random_ids(batch: int, seq: int, vocab: int = TINY["vocab_size"], seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, (batch, seq)).astype(np.int32)
