"""Every config file loads, validates and builds its (abstract) sharded state; the tiny runs learn."""
import json

import jax
import numpy as np
import pytest

from train_helpers import load_config

from phi3_jax import sharding as shd
from phi3_jax import train_config as tcfg
from phi3_jax.data import make_tokenizer_from_config

CONFIGS = [("tiny", ""), ("tiny", "test"), ("tiny", "sft"), ("tiny", "sft,test"), ("phi3_mini", ""), ("phi3_mini", "tiny"), ("phi3_mini", "runlocal"),
           ("phi3_medium", ""), ("phi3_medium", "tiny"), ("phi3_small", ""), ("phi3_small", "tiny")]


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_config_validates(name, arg):
    r = tcfg.validate(load_config(name, arg))
    assert r.model is not None and r.train.steps > 0
    if arg == "":
        assert r.model.param_dtype == "float32"


@pytest.mark.parametrize("name,billions", [("phi3_mini", 3.8), ("phi3_medium", 14.0), ("phi3_small", 7.4)])
def test_full_size_state_shards_without_allocating(name, billions):
    from phi3_jax import optim
    from phi3_jax import train_state as ts
    from phi3_jax.checkpoint import abstract_params

    r = tcfg.validate(load_config(name, ""))
    assert abs(r.model.param_count() / 1e9 - billions) < 0.3
    mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
    tx, _ = optim.make_optimizer_from_config(abstract_params(r.model), r.train)
    fns = ts.build(r.model, tx, mesh, compute_dtype="bfloat16")
    k = fns.abstract_state["params"]["layers"]["mlp"]["down_proj"]["kernel"]
    assert k.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
    assert k.dtype == np.float32


def test_model_name_says_what_a_variant_changed():
    from phi3_jax.model import get_preset

    assert tcfg.model_name("phi-3-mini-4k", get_preset("phi-3-mini-4k")) == "phi-3-mini-4k"
    r = tcfg.validate(load_config("phi3_mini", "tiny"))
    name = tcfg.model_name("phi-3-mini-4k", tcfg.resolve_model(r, make_tokenizer_from_config(r.raw["data"])))
    assert name.startswith("phi-3-mini-4k (hidden_size 256,") and "num_layers 4" in name and "vocab_size 320" in name


def test_unknown_arg_is_an_error():
    with pytest.raises(ValueError, match="unknown ARG"):
        load_config("phi3_mini", "huge")


def test_phi3_small_tiny_is_block_sparse_and_trains(tmp_path):
    from phi3_jax.train import run

    c = load_config("phi3_small", "tiny")
    m = tcfg.validate(c).model
    assert m.family == "phi3small" and m.layer_is_sparse(0) and not m.layer_is_sparse(1)
    dense = m.replace(dense_attention_every_n_layers=0)
    assert m.flops_per_token(256) < dense.flops_per_token(256)  # the layout removes attention work
    c.train.steps, c.train.batch_size, c.train.warmup_steps, c.train.log_every = 12, 8, 2, 1
    c.train.eval_every, c.train.checkpoint_every, c.train.progress, c.train.tensorboard = 0, 0, False, False
    c.sample.max_new_tokens = 8
    res = run(c, str(tmp_path / "small"))
    losses = [res.losses[s] for s in sorted(res.losses)]
    assert losses[-1] < losses[0] - 1.0, losses
    assert isinstance(res.sample, str)
    first = json.loads((tmp_path / "small" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 < first["padding_fraction"] < 0.1  # gaps before long documents, kept at multiples of 64 tokens
