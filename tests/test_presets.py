"""Presets of the released phi3 variants: parameter counts from real shapes, FLOPs per token, the CLI."""
from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from phi3_jax.model import ConfigError, get_preset, init_model
from phi3_jax.model.show import counts_from_shapes, main as show_main
from phi3_reference import run_jit

MINI = ("phi-3-mini-4k", "phi-3-mini-128k", "phi-3.5-mini")
MEDIUM = ("phi-3-medium-4k", "phi-3-medium-128k")


@pytest.mark.parametrize("name,total", [(n, 3_821_079_552) for n in MINI] + [(n, 13_960_238_080) for n in MEDIUM])
def test_param_counts(name, total):
    cfg = get_preset(name)
    shapes = counts_from_shapes(cfg)  # jax.eval_shape of the decoder: nothing allocated
    assert shapes["total"] == total
    assert shapes == {**cfg.param_counts(), "total": total}


def test_spec_shapes_mini():
    cfg = get_preset("phi-3-mini-4k")
    c = cfg.param_counts()
    assert c["embedding"] == c["lm_head"] == 32064 * 3072
    assert c["attention"] == 32 * (3072 * 9216 + 3072 * 3072)  # qkv_proj [9216, 3072], o_proj
    assert c["mlp"] == 32 * (3072 * 16384 + 8192 * 3072)  # gate_up_proj [16384, 3072], down_proj


def _attention_flops(cfg, mean_keys: float) -> float:
    # forward: QK^T and PV, 2 FLOPs per multiply-add each; training = 3 x forward
    return 3 * 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * mean_keys


@pytest.mark.parametrize("name", ["phi-3-mini-4k", "phi-3-medium-4k"])
def test_flops_per_token(name):
    cfg = get_preset(name)
    c = cfg.param_counts()
    matmul = c["attention"] + c["mlp"] + c["lm_head"]  # the embedding is a gather, not a matmul
    # Below the window (2047 + 1 keys), mean keys per query of a causal sequence is (T + 1) / 2.
    for T in (512, 2048):
        assert cfg.flops_per_token(T) == pytest.approx(6 * matmul + _attention_flops(cfg, (T + 1) / 2))
    # Above it, the window caps the keys: less than full causal attention, more than at T = 2048.
    full = 6 * matmul + _attention_flops(cfg, (4096 + 1) / 2)
    assert cfg.flops_per_token(2048) < cfg.flops_per_token(4096) < full
    assert cfg.replace(sliding_window=None).flops_per_token(4096) == pytest.approx(full)
    # The usual 6N rule of thumb is within a few percent at 2k tokens.
    assert 1.0 < cfg.flops_per_token(2048) / (6 * c["total"]) < 1.15


def test_flops_mini_figure():
    # phi-3-mini-4k at 4096 tokens, by hand: 6 x 3.7224e9 matmul parameters = 2.2335e10, plus attention
    # 3 x 4 x 32 layers x 32 heads x 96 x 1536.25 mean keys (2048-key window: (2048 * 2049 / 2 +
    # 2048 * 2048) / 4096) = 1.8122e9.
    assert get_preset("phi-3-mini-4k").flops_per_token(4096) == pytest.approx(2.41465e10, rel=1e-4)


def test_tiny_preset_runs():
    cfg = get_preset("phi-3-tiny")
    graphdef, state = nnx.split(init_model(cfg))
    logits = run_jit(lambda st, ids: nnx.merge(graphdef, st)(ids), state, np.zeros((2, 8), np.int32))
    assert logits.shape == (2, 8, cfg.vocab_size) and logits.dtype == np.float32
    assert np.all(np.isfinite(logits))


def test_longrope_preset_needs_factors():
    # The 128k presets leave the factor lists to the checkpoint; running without them says so.
    cfg = get_preset("phi-3-mini-128k", num_layers=2)
    with pytest.raises(ConfigError, match="rope_short_factor"):
        nnx.eval_shape(lambda: init_model(cfg)(np.zeros((1, 4), np.int32)))


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("phi-4")


def test_show_cli(capsys):
    assert show_main(["--preset", "phi-3-mini-4k", "--seq-len", "4096"]) == 0
    out = capsys.readouterr().out
    assert "3,821,079,552" in out and "MISMATCH" not in out and "FLOPs per token at seq_len 4096" in out
    assert show_main(["--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err
