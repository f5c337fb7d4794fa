"""Two processes with jax.distributed (4 CPU devices each) reproduce the single-process losses, gradient norms
and trained weights, and a run branched from their checkpoint (--branch_from) continues as one process's."""
import socket
import subprocess

import jax
import numpy as np
import pytest

from train_helpers import REPO, cli_args, env, load_config, losses

import phi3_jax
from phi3_jax.checkpoint import model_params
from phi3_jax.train import run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(workdir, overrides: dict, extra=()) -> None:
    """Runs the tiny test config as two processes of one jax.distributed job."""
    port = _free_port()
    procs = []
    for i in range(2):
        args = cli_args(workdir, overrides=overrides, extra=[*extra, f"--coordinator_address=127.0.0.1:{port}",
                                                               "--num_processes=2", f"--process_id={i}"])
        procs.append(subprocess.Popen(args, cwd=REPO, env=env(4, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo"),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=400)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("multi-process run timed out")
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)


def test_two_processes_match_one(tmp_path):
    # warmup 0: every step updates the weights (warmup's first step has lr 0).
    over = {"train.steps": 4, "train.warmup_steps": 0, "train.data_shards": 2, "mesh.data": 2, "mesh.fsdp": -1}
    _two_processes(tmp_path / "multi", over)

    c = load_config("tiny", "test")
    c.train.steps, c.train.warmup_steps, c.train.data_shards, c.mesh.data, c.mesh.fsdp = 4, 0, 2, 2, -1
    single = run(c, str(tmp_path / "single"))
    multi = losses(tmp_path / "multi")
    steps = sorted(single.losses)
    assert sorted(multi) == steps
    np.testing.assert_allclose([multi[s] for s in steps], [single.losses[s] for s in steps], rtol=2e-5)
    # Adam hides a gradient's scale from the losses: the gradient norms and the weights must match too.
    gn_multi, gn_single = losses(tmp_path / "multi", "grad_norm"), losses(tmp_path / "single", "grad_norm")
    assert sorted(gn_multi) == steps
    np.testing.assert_allclose([gn_multi[s] for s in steps], [gn_single[s] for s in steps], rtol=1e-4)
    # Both processes wrote their data-iterator state; the checkpoint loads as a model.
    assert sorted(p.name for p in (tmp_path / "multi/checkpoints/4/data").glob("process_*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    got, want = (jax.tree.map(np.asarray, model_params(phi3_jax.load(str(tmp_path / w)))) for w in ("multi", "single"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), got, want)  # as test_train_mesh

    # A run branched from the checkpoint by both processes continues as one process's branch does.
    _two_processes(tmp_path / "multi_branch", {**over, "train.steps": 6},
                   extra=[f"--branch_from={tmp_path / 'multi' / 'checkpoints' / '4'}"])
    c.train.steps = 6
    run(c, str(tmp_path / "single_branch"), branch_from=str(tmp_path / "single"))
    multi, single = losses(tmp_path / "multi_branch"), losses(tmp_path / "single_branch")
    assert sorted(multi) == sorted(single) == [5, 6]
    np.testing.assert_allclose([multi[s] for s in (5, 6)], [single[s] for s in (5, 6)], rtol=2e-5)
