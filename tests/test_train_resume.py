"""Preemption: SIGTERM mid-run saves and exits cleanly; rerunning the command resumes with exactly the
losses an uninterrupted run gives, step for step."""
import signal
import subprocess
import sys
import time

import pytest

from train_helpers import REPO, cli_args, env, load_config, losses

from phi3_jax.train import run

STEPS = 300


def test_sigterm_then_resume_gives_identical_losses(tmp_path):
    over = {"train.steps": STEPS, "train.checkpoint_every": 0, "train.log_every": 1}
    wd = tmp_path / "interrupted"
    p = subprocess.Popen(cli_args(wd, overrides=over), cwd=REPO, env=env(8), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    metrics = wd / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(losses(wd)) >= 5:
            break
        time.sleep(0.05)
    if p.poll() is not None:
        pytest.fail("run ended before it could be interrupted:\n" + p.communicate()[0][-3000:])
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 0, out[-3000:]
    assert "received SIGTERM" in out, out[-3000:]
    stopped = max(losses(wd))
    assert 5 <= stopped < STEPS, stopped
    assert (wd / "checkpoints" / str(stopped)).is_dir()

    resumed = subprocess.run(cli_args(wd, overrides=over), cwd=REPO, env=env(8), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {wd / 'checkpoints' / str(stopped)}" in resumed.stdout + resumed.stderr

    c = load_config("tiny", "test")
    c.train.steps, c.train.checkpoint_every, c.train.log_every = STEPS, 0, 1
    ref = run(c, str(tmp_path / "straight")).losses
    got = losses(wd)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in sorted(got)] == [ref[s] for s in sorted(ref)]  # exact, step for step


def test_async_checkpoints_keep_last_and_every_and_hold_the_step_state(tmp_path, capsys):
    from phi3_jax.checkpoint import read_config, restore_params

    def cfg(steps):
        c = load_config("tiny", "test")
        c.train.steps, c.train.schedule, c.train.warmup_steps = steps, "constant", 0
        c.train.checkpoint_every, c.train.keep_last, c.train.keep_every = 1, 2, 3
        c.mesh.fsdp = 1
        return c

    run(cfg(7), str(tmp_path / "long"))
    kept = sorted(int(p.name) for p in (tmp_path / "long/checkpoints").iterdir() if p.name.isdigit())
    assert kept == [3, 6, 7]
    # Step 3's checkpoint was written asynchronously while later steps reused (donated) the state buffers:
    # it must still hold exactly the weights a 3-step run ends with.
    run(cfg(3), str(tmp_path / "short"))
    step3 = restore_params(tmp_path / "long/checkpoints/3", read_config(tmp_path / "long/checkpoints/3"))
    short = restore_params(tmp_path / "short", read_config(tmp_path / "short"))
    import jax
    import numpy as np

    jax.tree.map(np.testing.assert_array_equal, step3, short)
    # Extending a finished run resumes it, and says what changed since its checkpoint.
    capsys.readouterr()
    run(cfg(5), str(tmp_path / "short"))
    assert "config changed since that checkpoint (1): train.steps: 3 -> 5" in capsys.readouterr().out


def test_bf16_compute_resume_recasts_the_weights_and_matches(tmp_path, monkeypatch):
    """bf16 compute keeps cast weights in the state but not in checkpoints; a resumed run casts them again
    from the restored float32 master weights and continues exactly."""
    import orbax.checkpoint as ocp

    from phi3_jax import train_state

    monkeypatch.setattr(train_state, "COMPUTE_COPY", True)  # kept on GPU meshes by default

    def cfg(steps):
        c = load_config("tiny", "test")
        c.precision.compute_dtype = "bfloat16"
        c.train.steps, c.train.checkpoint_every, c.train.log_every = steps, 3, 1
        c.mesh.fsdp = 1
        return c

    ref = run(cfg(6), str(tmp_path / "straight")).losses
    run(cfg(3), str(tmp_path / "resumed"))
    saved = ocp.StandardCheckpointer().metadata(tmp_path / "resumed/checkpoints/3/train_state")
    assert "compute_params" not in saved.item_metadata.tree and "opt_state" in saved.item_metadata.tree
    got = run(cfg(6), str(tmp_path / "resumed")).losses
    assert sorted(got) == [4, 5, 6]
    assert [got[s] for s in (4, 5, 6)] == [ref[s] for s in (4, 5, 6)]  # exact, step for step


FINAL_SAVE_SIGNALLED = """
import os, signal, sys
sys.path.insert(0, "tests")
from train_helpers import load_config
from phi3_jax import checkpoint
from phi3_jax.train import run

save = checkpoint.TrainCheckpointer.save


def save_then_signal(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)
    if step == 3:
        os.kill(os.getpid(), signal.SIGTERM)


checkpoint.TrainCheckpointer.save = save_then_signal
c = load_config("tiny", "test")
c.train.steps, c.train.checkpoint_every, c.sample.max_new_tokens = 3, 0, 8
res = run(c, sys.argv[1])
print("RESULT", res.status, res.sample)
"""


def test_sigterm_during_the_final_save_waits_for_it(tmp_path):
    # The last step's checkpoint (the only one with checkpoint_every=0) is written under the signal
    # handlers: a SIGTERM then lets it finish, and the run ends cleanly without its sample.
    wd = tmp_path / "wd"
    r = subprocess.run([sys.executable, "-c", FINAL_SAVE_SIGNALLED, str(wd)], cwd=REPO, env=env(8),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    assert "received SIGTERM after the last step" in r.stdout and "RESULT done None" in r.stdout, r.stdout[-2000:]
    from phi3_jax.checkpoint import resolve

    assert resolve(str(wd)).step == 3
