"""What a run logs: held-out evaluation of a mixture (every source, each on its own rows, and pooled), the
tokens and FLOPs trained on, and where each data phase begins."""
import json

import jax
import numpy as np
import pytest

from train_helpers import load_config

import phi3_jax
import phi3_jax.checkpoint
from phi3_jax import train_data
from phi3_jax.data import make_tokenizer_from_config
from phi3_jax.train import run


def _mixture():
    c = load_config("tiny", "test")
    d = c.data
    d.sources = [dict(d.sources[0], name="textbook", kind="textbook"),
                 dict(d.sources[0], name="stdlib", kind="stdlib")]
    d.phases = [dict(name="pretrain", tokens=0, weights={"textbook": 0.5, "stdlib": 0.5})]
    d.eval_fraction, d.eval_max_docs = 0.01, 64  # held-out tails of many batches each: more than eval_steps
    t = c.train
    t.steps, t.eval_every, t.eval_steps = 3, 0, 2
    c.mesh.fsdp = 1
    return c


def _nll(model, batches) -> tuple[float, float]:
    """Summed NLL of the trained tokens and their count, from the model's logits."""
    total = count = 0.0
    for b in batches:
        logits = model(b["inputs"], positions_BT=b["positions"], segment_ids_BT=b["segment_ids"])
        logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float32)))
        nll = -np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
        total += float((nll * b["loss_mask"]).sum())
        count += float(b["loss_mask"].sum())
    return total, count


def test_every_source_is_evaluated_on_its_own_rows(tmp_path):
    c = _mixture()
    t = c.train
    tok = make_tokenizer_from_config(c.data)
    held_out = train_data.eval_batches(c.data, tok, t.seq_len, t.batch_size, [0], 1, t.eval_steps)
    assert list(held_out) == ["textbook", "stdlib"] and all(len(b) == 2 for b in held_out.values())

    c.train.eval_every = 3  # evaluates at the end of the run
    res = run(c, str(tmp_path / "wd"))
    rows = [json.loads(line) for line in (tmp_path / "wd" / "metrics.jsonl").read_text().splitlines()]
    row = [r for r in rows if "eval_loss" in r][-1]
    assert sorted(row) == ["eval_loss", "eval_loss/stdlib", "eval_loss/textbook", "flops", "step", "tokens"]
    # Tokens and FLOPs trained on by the row's step: the x axes of scaling plots, on every row.
    cfg = phi3_jax.checkpoint.read_config(str(tmp_path / "wd"))
    for r in rows:
        if "loss" in r or "eval_loss" in r:
            assert r["tokens"] == r["step"] * t.batch_size * t.seq_len
            assert r["flops"] == pytest.approx(r["tokens"] * cfg.flops_per_token(t.seq_len), rel=1e-9)

    model = phi3_jax.load(str(tmp_path / "wd"))
    sums = {name: _nll(model, batches) for name, batches in held_out.items()}
    for name, (total, count) in sums.items():
        np.testing.assert_allclose(row[f"eval_loss/{name}"], total / count, rtol=1e-4)
    pooled = sum(s for s, _ in sums.values()) / sum(n for _, n in sums.values())
    np.testing.assert_allclose(res.eval_loss, pooled, rtol=1e-4)
    assert abs(row["eval_loss/stdlib"] - row["eval_loss/textbook"]) > 0.01  # the two sources are told apart


def test_eval_on_start_scores_the_weights_a_fine_tuning_run_starts_from(tmp_path):
    src, wd = tmp_path / "src", tmp_path / "wd"
    c = _mixture()
    assert run(c, str(src)).status == "done"
    t = c.train
    held_out = train_data.eval_batches(c.data, make_tokenizer_from_config(c.data), t.seq_len, t.batch_size, [0], 1,
                                       t.eval_steps)
    c.train.steps, c.train.eval_every, c.train.eval_on_start = 1, 1, True
    res = run(c, str(wd), init_from=str(src))
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval_loss" in r}
    assert sorted(evals) == [0, 1] and res.eval_loss == evals[1]["eval_loss"]
    model = phi3_jax.load(str(src))
    for name, batches in held_out.items():
        total, count = _nll(model, batches)
        np.testing.assert_allclose(evals[0][f"eval_loss/{name}"], total / count, rtol=1e-4)
    # A resumed run does not evaluate its starting point again.
    c.train.steps = 2
    run(c, str(wd))
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 1, 2]


def test_tokens_and_flops_count_on_across_a_resume_with_a_larger_batch(tmp_path):
    wd = tmp_path / "wd"
    c = load_config("tiny", "test")  # batch 8 x 64 tokens
    c.train.steps = 2
    run(c, str(wd))
    c.train.steps, c.train.batch_size = 4, 16
    run(c, str(wd))
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    tokens = {r["step"]: r["tokens"] for r in rows if "loss" in r}
    assert tokens == {1: 512, 2: 1024, 3: 2048, 4: 3072}
    fpt = phi3_jax.checkpoint.read_config(str(wd)).flops_per_token(64)
    assert rows[-1]["flops"] == pytest.approx(3072 * fpt, rel=1e-9)
    assert phi3_jax.checkpoint.read_progress(wd / "checkpoints" / "4") == {"tokens": 3072, "flops": rows[-1]["flops"]}


def test_each_data_phase_start_is_logged_once(tmp_path):
    c = _mixture()
    c.data.phases = [dict(name="pretrain", tokens=3 * 8 * 64, weights={"textbook": 1.0}),  # 3 steps
                     dict(name="anneal", tokens=0, weights={"stdlib": 1.0})]
    wd = tmp_path / "wd"
    c.train.steps = 2
    res = run(c, str(wd))
    c.train.steps = 5
    res = run(c, str(wd))  # resumed at step 2, inside the first phase
    assert res.status == "done"
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["phase_index"], r["phase"]) for r in rows if "phase" in r] == [(1, 0, "pretrain"),
                                                                                           (4, 1, "anneal")]
