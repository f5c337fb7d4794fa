"""User errors stop with one clear message, before anything is written or with the workdir left intact."""
import ml_collections
import numpy as np
import pytest

from train_helpers import load_config, losses, run_cli, snapshot

from phi3_jax.checkpoint import CheckpointError
from phi3_jax.data import DataError
from phi3_jax.model.config import ConfigError
from phi3_jax.train import TrainingError, run


def _cfg(**train):
    c = load_config("tiny", "test")
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


def test_cli_unknown_field_and_wrong_type(tmp_path):
    wd = tmp_path / "wd"
    r = run_cli(wd, overrides={"train.stpes": 5})
    assert r.returncode == 2 and "stpes" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    r = run_cli(wd, overrides={"train.steps": "many"})
    assert r.returncode == 2 and "train.steps" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not wd.exists()


def test_config_file_errors_name_the_field(tmp_path):
    wd = tmp_path / "wd"
    c = _cfg()
    c.train.foo = 1
    with pytest.raises(ConfigError, match=r"config\.train\.foo: unknown field"):
        run(c, str(wd))
    c = _cfg()
    c.train = ml_collections.ConfigDict({**c.train.to_dict(), "lr": "fast"})
    with pytest.raises(ConfigError, match=r"config\.train\.lr: expected float"):
        run(c, str(wd))
    c = _cfg()
    c.model.hiden_size = 3
    with pytest.raises(ConfigError, match=r"config\.model\.hiden_size: unknown ModelConfig field"):
        run(c, str(wd))
    c = _cfg(grad_accum=3)
    with pytest.raises(ConfigError, match=r"config\.train\.grad_accum=3: must divide train\.batch_size=8"):
        run(c, str(wd))
    for field, value, message in (("eps", 0.0, "must be > 0"), ("lr", float("nan"), "must be a finite number")):
        with pytest.raises(ConfigError, match=rf"config\.train\.{field}.*{message}"):
            run(_cfg(**{field: value}), str(wd))
    c = _cfg()
    c.precision.compute_dtype = "float16"
    with pytest.raises(ConfigError, match=r"config\.precision\.compute_dtype='float16': must be one of"):
        run(c, str(wd))
    c = _cfg(loss_chunks=3)
    with pytest.raises(ConfigError, match=r"config\.train\.loss_chunks=3: must divide train\.seq_len"):
        run(c, str(wd))
    assert not wd.exists()


def test_conversations_without_replies(tmp_path):
    """Chat data with nothing to learn (no assistant message) stops before the workdir is made; held-out rows
    without replies turn evaluation off instead of reporting a loss of 0."""
    import json

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}?"}]}) + "\n"
                               for i in range(60)))
    c = load_config("tiny", "sft,test")
    c.data.sources = [dict(c.data.sources[0], name="prompts", kind="jsonl", path=str(prompts), field="messages")]
    wd = tmp_path / "wd"
    with pytest.raises(DataError, match="hold no token to train on .* conversations without assistant replies"):
        run(c, str(wd))
    assert not wd.exists()

    chats = tmp_path / "chats.jsonl"  # the held-out tail (the last 2 lines) has no replies
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q {i}?"}] + (
        [{"role": "assistant", "content": f"a {i}."}] if i < 58 else [])}) + "\n" for i in range(60)))
    c.data.sources = [dict(c.data.sources[0], name="chats", kind="jsonl", path=str(chats), field="messages")]
    c.data.eval_fraction, c.train.eval_every, c.train.steps = 0.03, 1, 2
    res = run(c, str(wd))
    assert res.eval_loss is None and res.step == 2


def test_workdir_shards_positions_and_platform(tmp_path):
    """Errors found before the model is built, each naming what to fix; nothing is written."""
    afile = tmp_path / "afile"
    afile.write_text("keep")
    for wd in (afile, afile / "sub"):
        with pytest.raises(ConfigError, match=r"--workdir .*afile is a file, not a directory"):
            run(_cfg(), str(wd))
    assert afile.read_text() == "keep"
    wd = tmp_path / "wd"
    with pytest.raises(ConfigError, match=r"config\.train\.data_shards=3: must divide train\.batch_size=8"):
        run(_cfg(data_shards=3), str(wd))
    c = _cfg()
    c.model.max_position_embeddings = 32
    with pytest.raises(ConfigError, match=r"config\.train\.seq_len=64 is longer than the model's max_position_emb"):
        run(c, str(wd))
    c = _cfg()
    c.mesh.sequence_parallel = True
    with pytest.raises(ConfigError, match=r"config\.mesh\.sequence_parallel=True .* needs config\.mesh\.tensor > 1"):
        run(c, str(wd))
    c = _cfg()
    c.model.attention_impl = "cudnn"
    with pytest.raises(ConfigError, match=r"attention_impl='cudnn' needs a GPU; this run's devices are cpu"):
        run(c, str(wd))
    assert not wd.exists()


def test_cli_config_file_errors_are_one_line(tmp_path):
    wd = tmp_path / "wd"
    r = run_cli(wd, config="configs/nope.py")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "nope.py" in r.stderr, r.stderr[-2000:]
    r = run_cli(wd, config="configs/tiny.py:bogus")
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and "unknown ARG 'bogus'" in lines[-1], r.stderr[-2000:]
    assert not wd.exists()


def test_first_fit_packing_for_a_block_sparse_model(tmp_path):
    c = load_config("phi3_small", "tiny")
    c.data.packing = "first_fit"
    with pytest.raises(DataError, match="data.packing='first_fit' places pieces at any row offset.*use "
                                        "data.packing='concat'"):
        run(c, str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()


def test_missing_data_path(tmp_path):
    c = _cfg()
    c.data.sources = [dict(c.data.sources[0], name="mine", kind="jsonl", path=str(tmp_path / "nope.jsonl"))]
    with pytest.raises(DataError, match=r"jsonl source 'mine': path not found: .*nope\.jsonl"):
        run(c, str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()


def test_tokenizer_larger_than_model_vocab(tmp_path):
    c = _cfg()
    c.model.vocab_size = 128  # the byte tokenizer has 320 ids
    with pytest.raises(ConfigError, match="vocab_size=128 is smaller than the tokenizer"):
        run(c, str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()


def test_corrupt_and_foreign_checkpoints_leave_the_workdir_intact(tmp_path):
    wd = tmp_path / "wd"
    assert run(_cfg(steps=3), str(wd)).status == "done"
    before = snapshot(wd)
    # Foreign: a wider model in the same workdir.
    c = _cfg(steps=5)
    c.model.hidden_size = 96
    with pytest.raises(CheckpointError, match="has shape"):
        run(c, str(wd))
    assert snapshot(wd) == before
    # Corrupt: garbage in the stored arrays.
    step = wd / "checkpoints" / "3"
    chunks = [f for f in (step / "params").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert chunks
    for f in chunks:
        f.write_bytes(b"\0garbage" * 8)
    before = snapshot(wd)
    with pytest.raises(CheckpointError, match="corrupt"):
        run(_cfg(steps=5), str(wd))
    assert snapshot(wd) == before
    # A step folder missing an item.
    import shutil

    shutil.rmtree(step / "train_state")
    before = snapshot(wd)
    with pytest.raises(CheckpointError, match="no 'train_state' item"):
        run(_cfg(steps=5), str(wd))
    assert snapshot(wd) == before


def test_nonfinite_updates_are_skipped_then_the_run_stops(tmp_path):
    wd = tmp_path / "wd"
    c = _cfg(steps=20, lr=1e30, warmup_steps=0, clip_norm=0.0, max_nonfinite_in_a_row=3, checkpoint_every=1,
             keep_last=1)
    with pytest.raises(TrainingError, match=r"3 steps in a row had a non-finite loss.* The last checkpoint \(step \d+\) "):
        run(c, str(wd))
    seen = losses(wd)
    assert np.isfinite(seen[1]) and not np.isfinite(float(seen[max(seen)]))
    # The checkpoint left behind is complete and its weights finite (skipped steps never touch them).
    from phi3_jax.checkpoint import read_config, restore_params

    params = restore_params(wd, read_config(wd))
    import jax

    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    # Without checkpoints the message does not point at one.
    c.train.checkpoint_every = 0
    with pytest.raises(TrainingError, match="No checkpoint was saved before it"):
        run(c, str(tmp_path / "wd2"))


def test_resume_with_another_optimizer_names_the_changed_fields(tmp_path):
    wd = tmp_path / "wd"
    assert run(_cfg(steps=2), str(wd)).status == "done"
    before = snapshot(wd)
    with pytest.raises(CheckpointError, match=r"train_state: the saved optimizer state has another structure than "
                                              r"this config's optimizer \(train\.clip_norm, train\.steps changed"):
        run(_cfg(steps=3, clip_norm=0.0), str(wd))  # clipping off: one transformation fewer in the chain
    assert snapshot(wd) == before


def test_resume_with_another_data_split_names_it(tmp_path):
    wd = tmp_path / "wd"
    assert run(_cfg(steps=2), str(wd)).status == "done"
    before = snapshot(wd)
    # Config and data errors on a workdir with a run in it: the same messages, nothing touched (metrics.jsonl
    # included, which a resumed run truncates to its checkpoint).
    c = _cfg(steps=4)
    c.train.foo = 1
    with pytest.raises(ConfigError, match=r"config\.train\.foo: unknown field"):
        run(c, str(wd))
    c = _cfg(steps=4)
    c.data.sources = [dict(c.data.sources[0], name="mine", kind="jsonl", path=str(tmp_path / "nope.jsonl"))]
    with pytest.raises(DataError, match="path not found"):
        run(c, str(wd))
    assert snapshot(wd) == before
    with pytest.raises(CheckpointError, match="train.data_shards"):
        run(_cfg(steps=4, data_shards=2), str(wd))
    assert snapshot(wd) == before
    # A state written by two processes (as on a 2-host pod) cannot resume on one.
    data = wd / "checkpoints" / "2" / "data"
    (state,) = data.glob("process_*-of-*.json")
    state.rename(data / "process_0-of-2.json")
    before = snapshot(wd)
    with pytest.raises(CheckpointError, match=r"written by 2 process\(es\), this run has 1"):
        run(_cfg(steps=4), str(wd))
    assert snapshot(wd) == before


def test_no_held_out_rows_turns_evaluation_off_and_an_empty_workdir_says_so(tmp_path, capsys):
    import phi3_jax

    c = _cfg(steps=3, eval_every=2)
    c.data.eval_fraction = 0.0
    res = run(c, str(tmp_path / "wd"))
    assert res.status == "done" and res.eval_loss is None
    assert "no evaluation: the data has no held-out rows (data.eval_fraction=0.0)" in capsys.readouterr().out
    (tmp_path / "fresh" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="is a training workdir with no checkpoint yet"):
        phi3_jax.load(str(tmp_path / "fresh"))


def test_a_fresh_start_rewrites_metrics_and_a_finished_run_adds_no_rows(tmp_path):
    import json

    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "metrics.jsonl").write_text(json.dumps({"step": 0, "unigram_entropy": 9.0}) + "\n")  # a run killed early
    c = _cfg(steps=2, eval_every=1)
    assert run(c, str(wd)).status == "done"
    rows = (wd / "metrics.jsonl").read_text()
    assert rows.count('"unigram_entropy"') == 1 and '9.0' not in rows and rows.count('"eval_loss"') == 2
    assert run(c, str(wd)).status == "complete"
    assert (wd / "metrics.jsonl").read_text() == rows
