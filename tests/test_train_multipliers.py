"""train.lr_mults / train.wd_mults: per-parameter multipliers set in the config reach the optimizer."""
import numpy as np

from train_helpers import load_config, run_cli

import phi3_jax
from phi3_jax.train import run


def _weights(workdir) -> dict[str, np.ndarray]:
    model = phi3_jax.load(str(workdir))
    return {"embed": np.asarray(model.embed_tokens.embedding[...]), "head": np.asarray(model.lm_head.kernel[...])}


def test_an_lr_multiplier_of_zero_freezes_its_parameters(tmp_path):
    out = {}
    for steps in (2, 4):  # the warmup's first step has lr 0, so compare two lengths of the same run
        c = load_config("tiny", "test")
        c.train.steps, c.train.lr_mults = steps, (("embed_tokens/", 0.0),)
        assert run(c, str(tmp_path / str(steps))).status == "done"
        out[steps] = _weights(tmp_path / str(steps))
    np.testing.assert_array_equal(out[2]["embed"], out[4]["embed"])
    assert np.abs(out[2]["head"] - out[4]["head"]).max() > 1e-4


def test_cli_rules_are_printed_and_a_rule_for_no_parameter_stops_the_run(tmp_path):
    wd = tmp_path / "wd"
    r = run_cli(wd, overrides={"train.lr_mults": "(('mpl/', 0.5),)"}, devices=1)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "error: config.train.lr_mults[0]=('mpl/', 0.5): applies to no parameter" in r.stderr
    assert not wd.exists()
    r = run_cli(wd, overrides={"train.lr_mults": "(('mlp/', 0.5),)", "train.wd_mults": "()", "train.steps": 1},
                devices=1)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "learning rate multipliers (the first match wins, others x1): 'mlp/' x0.5 (2 tensors, 49,152 parameters)" \
        in r.stdout, r.stdout
    assert "weight decay multipliers" not in r.stdout  # () : every parameter decays, x1
