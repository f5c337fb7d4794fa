"""Mesh-shape invariance: the same run on 8 simulated CPU devices under several meshes gives the same losses."""
import numpy as np

from train_helpers import load_config

from phi3_jax.train import run


def _run(tmp_path, name, mesh, grad_accum=1, sample_tokens=0):
    c = load_config("tiny", "test")
    c.train.steps = 4
    c.train.grad_accum = grad_accum
    c.sample.max_new_tokens = sample_tokens
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    res = run(c, str(tmp_path / name))
    assert res.status == "done"
    if sample_tokens:  # the closing sample decodes from the sharded state (KV cache through the mesh)
        assert isinstance(res.sample, str)
    return [res.losses[s] for s in sorted(res.losses)]


def test_losses_do_not_depend_on_the_mesh(tmp_path):
    ref = _run(tmp_path, "data8", (8, 1, 1))
    for name, mesh in (("fsdp8", (1, 8, 1)), ("d2f2t2", (2, 2, 2))):
        got = _run(tmp_path, name, mesh, sample_tokens=8 if name == "d2f2t2" else 0)
        np.testing.assert_allclose(got, ref, rtol=2e-5, err_msg=name)
    assert ref[-1] < ref[0]
