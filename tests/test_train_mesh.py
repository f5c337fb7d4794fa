"""Mesh-shape invariance: the same run on 8 simulated CPU devices under several meshes (and with the batch in
micro-batches) gives the same losses, gradient norms and trained weights."""
import json

import jax
import numpy as np

from train_helpers import load_config

import phi3_jax
from phi3_jax.checkpoint import model_params
from phi3_jax.train import run


def _run(tmp_path, name, mesh, grad_accum=1, sample_tokens=0, sequence_parallel=False):
    c = load_config("tiny", "test")
    c.train.steps = 5
    c.train.warmup_steps = 0  # every step updates the weights (warmup's first step has lr 0)
    c.train.grad_accum = grad_accum
    c.sample.max_new_tokens = sample_tokens
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    c.mesh.sequence_parallel = sequence_parallel
    workdir = tmp_path / name
    res = run(c, str(workdir))
    assert res.status == "done"
    if sample_tokens:  # the closing sample decodes from the sharded state (KV cache through the mesh)
        assert isinstance(res.sample, str)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    grad_norms = [r["grad_norm"] for r in rows if "grad_norm" in r]
    params = jax.tree.map(np.asarray, model_params(phi3_jax.load(str(workdir))))
    return [res.losses[s] for s in sorted(res.losses)], grad_norms, params


def test_losses_do_not_depend_on_the_mesh(tmp_path):
    ref_loss, ref_gn, ref_params = _run(tmp_path, "data8", (8, 1, 1))
    assert len(ref_gn) == len(ref_loss) == 5
    for name, mesh, accum in (("fsdp8", (1, 8, 1), 1), ("d2f2t2", (2, 2, 2), 1), ("d4t2_accum2", (4, 1, 2), 2),
                              ("f4t2_sequence_parallel", (1, 4, 2), 1)):
        loss, gn, params = _run(tmp_path, name, mesh, grad_accum=accum, sample_tokens=8 if name == "d2f2t2" else 0,
                                sequence_parallel=name.endswith("sequence_parallel"))
        np.testing.assert_allclose(loss, ref_loss, rtol=2e-5, err_msg=name)
        # Adam hides a gradient's scale from the weights, so compare the gradients' norms as well.
        np.testing.assert_allclose(gn, ref_gn, rtol=1e-4, err_msg=name)
        # Sums in another order move a weight by ~1e-5 after 5 steps; one wrong update moves it by ~lr = 3e-3.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4, err_msg=name),
                     params, ref_params)
    assert ref_loss[-1] < ref_loss[0]
