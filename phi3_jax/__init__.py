"""phi3_jax: the Phi-3 family in JAX (Flax NNX).

    import phi3_jax
    model = phi3_jax.load("path")        # HF folder, phi3_jax checkpoint or training workdir
    tokenizer = phi3_jax.load_tokenizer("path")  # the one it was trained with (or the folder's tokenizer.json)
    logits = model(input_ids)            # int32 [batch, seq] -> float32 [batch, seq, vocab]

Importing the package is cheap; JAX, Flax and Orbax load on first use.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load", "load_tokenizer", "ModelConfig", "get_preset"]


def load(path, dtype: str | None = None):
    """A `Decoder` from a Hugging Face folder, a phi3_jax checkpoint or a training workdir.

    dtype: "float32" / "bfloat16" / "float16" for parameters and activations; default as saved.
    """
    from phi3_jax.checkpoint import load_model

    return load_model(path, dtype)


def load_tokenizer(path):
    """The tokenizer of the model at `path`: the one its training run used (from the checkpoint's saved
    config), else a Hugging Face folder's tokenizer.json (as `export-hf` writes it). ValueError if neither."""
    from phi3_jax.generate import tokenizer_for

    return tokenizer_for(path)


def __getattr__(name: str):
    if name in ("ModelConfig", "get_preset"):
        from phi3_jax import model

        return getattr(model, name)
    raise AttributeError(f"module 'phi3_jax' has no attribute {name!r}")
