"""The README command, shortened: configs/tiny.py learns well below the data's unigram entropy, the
workdir loads with phi3_jax.load, and a sample is printed."""
import json

import numpy as np

from train_helpers import load_config

import phi3_jax
from phi3_jax.train import run


def test_tiny_config_learns(tmp_path, capsys):
    c = load_config("tiny", "")
    c.train.steps, c.train.warmup_steps, c.train.eval_every, c.train.eval_steps = 50, 10, 50, 2
    c.train.progress = False
    c.mesh.fsdp = 1  # one device, like the README run on a laptop (conftest simulates 8)
    c.sample.max_new_tokens = 24
    wd = tmp_path / "tiny"
    res = run(c, str(wd))
    losses = [res.losses[s] for s in sorted(res.losses)]
    assert res.unigram_entropy is not None and 2.5 < res.unigram_entropy < 4.5
    assert losses[-1] < 0.9 * res.unigram_entropy, (losses[-1], res.unigram_entropy)
    assert res.eval_loss < res.unigram_entropy
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec"} <= set(logged[-1])
    assert "mfu" not in logged[-1]  # CPU: peak unknown
    assert any("eval_loss" in r for r in rows)
    assert rows[0]["step"] == 0 and rows[0]["padding_fraction"] == 0.0  # concat packing of an endless stream
    assert list((wd / "tensorboard").glob("events.out.tfevents.*"))
    out = capsys.readouterr().out
    assert "sample (prompt" in out and res.sample is not None
    model = phi3_jax.load(wd)  # the training workdir reads as a model checkpoint
    ids = np.array([[72, 105]], np.int32)
    assert model(ids).shape == (1, 2, c.model.vocab_size)


def test_closing_line_names_the_steps_its_loss_averages(tmp_path, capsys):
    """7 steps logged every 5: the last logged loss is the mean of steps 6 and 7, and the line says 2 steps."""
    c = load_config("tiny", "test")
    c.train.steps, c.train.log_every, c.train.eval_every = 7, 5, 0
    c.train.progress, c.sample.max_new_tokens = False, 0
    res = run(c, str(tmp_path / "wd"))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("done: "))
    mean = (res.losses[6] + res.losses[7]) / 2
    assert line.startswith(f"done: step 7/7, loss {mean:.4f} (mean of the last 2 steps)"), line
