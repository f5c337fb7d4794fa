"""--branch_from and warmup-stable-decay: a decay branched from a checkpoint of the stable phase is the run
that would have been trained to that length from the start."""
import shutil

import pytest

from train_helpers import load_config, losses, run_cli

from phi3_jax.checkpoint import CheckpointError
from phi3_jax.model.config import ConfigError
from phi3_jax.train import run


def _cfg(steps: int):
    c = load_config("tiny", "test")  # 2 warmup steps
    t = c.train
    t.steps, t.decay_steps, t.schedule, t.checkpoint_every, t.keep_last = steps, 2, "sqrt", 4, 3
    return c


def test_a_decay_branched_from_the_stable_phase_matches_a_run_of_that_length(tmp_path):
    long, short, branch = tmp_path / "long", tmp_path / "short", tmp_path / "branch"
    assert run(_cfg(8), str(long)).status == "done"  # stable through step 6, checkpoints at 4 and 8
    assert run(_cfg(6), str(short)).status == "done"  # decays over steps 5-6
    res = run(_cfg(6), str(branch), branch_from=str(long / "checkpoints" / "4"))
    assert res.status == "done"
    l_long, l_short, l_branch = losses(long), losses(short), losses(branch)
    assert sorted(l_branch) == [5, 6]
    assert [l_long[s] for s in (1, 2, 3, 4)] == [l_short[s] for s in (1, 2, 3, 4)]  # same rates up to step 4
    assert [l_branch[s] for s in (5, 6)] == [l_short[s] for s in (5, 6)]
    lr_long, lr_branch = losses(long, "lr"), losses(branch, "lr")
    assert lr_branch[6] < lr_long[6] == lr_long[4]  # the long run was still at the full rate there
    assert losses(branch, "tokens") == {5: 5 * 512, 6: 6 * 512}  # counted on from the source's checkpoint
    # The source is only read: its checkpoints are as they were.
    assert sorted(p.name for p in (long / "checkpoints").iterdir()) == ["4", "8"]


def test_branch_from_errors_leave_nothing_behind(tmp_path):
    src = tmp_path / "src"
    c = _cfg(4)
    assert run(c, str(src)).status == "done"
    weights_only = tmp_path / "weights" / "4"
    shutil.copytree(src / "checkpoints" / "4", weights_only)
    shutil.rmtree(weights_only / "train_state")
    wd = tmp_path / "wd"
    with pytest.raises(CheckpointError, match=r"holds weights only, no training state .*--init_from"):
        run(_cfg(6), str(wd), branch_from=str(weights_only))
    with pytest.raises(CheckpointError, match="no such file"):
        run(_cfg(6), str(wd), branch_from=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="--init_from and --branch_from: give one"):
        run(_cfg(6), str(wd), init_from=str(src), branch_from=str(src))
    other = load_config("tiny", "test")
    other.model.num_layers = 3
    with pytest.raises(CheckpointError, match=str(src / "checkpoints" / "4")):
        run(other, str(wd), branch_from=str(src))
    assert not wd.exists()


def test_cli_branch_from_a_workdir_takes_its_latest_step(tmp_path):
    src, wd = tmp_path / "src", tmp_path / "wd"
    assert run(_cfg(4), str(src)).status == "done"
    r = run_cli(wd, overrides={"train.steps": 6, "train.decay_steps": 2, "train.schedule": "sqrt"},
                extra=[f"--branch_from={src}"], devices=1)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"branched from {src / 'checkpoints' / '4'}" in r.stdout + r.stderr
    assert sorted(losses(wd)) == [5, 6]
