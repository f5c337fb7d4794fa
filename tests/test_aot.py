"""Ahead-of-time compilation of the train step for TPU slices from this CPU host (phi3_jax/aot.py).

Topology-name parsing runs everywhere; the compiles need libtpu (they skip cleanly without it) and are
marked slow and tpu.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from phi3_jax import aot

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------
# Topology names (no libtpu needed)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,libtpu_name,chips,hbm", [
    ("v5p-128", "v5p:4x4x4", 64, 95),  # v5p and v4 names count TensorCores: two per chip
    ("v5p-8", "v5p:2x2x1", 4, 95),
    ("v5p-16", "v5p:2x2x2", 8, 95),
    ("v5p-256", "v5p:4x4x8", 128, 95),
    ("v4-32", "v4:2x2x4", 16, 32),
    ("v5e-16", "v5e:4x4", 16, 16),  # v5e and v6e names count chips
    ("v5litepod-8", "v5e:2x4", 8, 16),
    ("v5e-1", "v5e:1x1", 1, 16),
    ("v6e-16", "v6e:4x4", 16, 32),
    ("V6E-256", "v6e:16x16", 256, 32),
    ("v5p:4x4x4", "v5p:4x4x4", 64, 95),  # the form libtpu takes
    ("v5e:2x2", "v5e:2x2", 4, 16),
])
def test_topology_names(name, libtpu_name, chips, hbm):
    t = aot.parse_topology(name)
    assert (t.libtpu_name, t.chips, t.hbm_gib) == (libtpu_name, chips, hbm)


@pytest.mark.parametrize("name", ["v9z-8", "v5p-3", "v5p-12", "v5e-3", "tpu", "v5p:4x4", "v5e-16x", "v5p:0x4x4"])
def test_unknown_topology_names(name):
    with pytest.raises(aot.TopologyError, match="unknown TPU topology"):
        aot.parse_topology(name)


def test_hbm_override():
    assert aot.parse_topology("v5e-4", hbm_gib=15.75).hbm_gib == 15.75
    with pytest.raises(aot.TopologyError, match="--hbm_gib=-1: must be a positive number"):
        aot.parse_topology("v5e-4", hbm_gib=-1)


# ----------------------------------------------------------------------------------------------------
# Compiles (libtpu)
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def libtpu():
    """Skips unless libtpu can describe a TPU topology here.

    The compiles run at the default matmul precision, as the aot CLI does: conftest's "highest" makes the
    TPU compiler emit six-pass bf16 float32 matmuls, which more than doubles each compile's time.
    """
    pytest.importorskip("libtpu", reason="libtpu not installed: pip install libtpu to compile for TPU")
    try:
        aot.topology_devices(aot.parse_topology("v5e:1x1"))
    except aot.TopologyError as err:
        pytest.skip(str(err))
    previous = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", None)
    yield
    jax.config.update("jax_default_matmul_precision", previous)


def load_config(spec: str, **overrides):
    """configs/FILE.py[:ARG] as the train CLI loads it, with SECTION__FIELD=value overrides."""
    path, _, arg = spec.partition(":")
    mod_spec = importlib.util.spec_from_file_location("cfg_" + Path(path).stem, ROOT / path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    c = mod.get_config(arg)
    for key, value in overrides.items():
        section, field = key.split("__")
        setattr(c[section], field, value)
    return c


def run_cli(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "phi3_jax.aot", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.tpu
@pytest.mark.parametrize("config,overrides,topology", [
    ("configs/tiny.py", {}, "v5e-4"),
    ("configs/tiny.py", {}, "v5p-8"),  # megacore: a v5p-8 is 4 chips of two TensorCores
    ("configs/phi3_small.py:tiny", {"model__attention_impl": "xla"}, "v5e-4"),
], ids=["phi3-tiny-v5e-4", "phi3-tiny-v5p-8", "phi3small-tiny-xla-v5e-4"])
def test_tiny_configs_fit(libtpu, config, overrides, topology):
    rep = aot.compile_train_step(load_config(config, mesh__fsdp=-1, **overrides), topology, log=lambda *_: None)
    chips = aot.parse_topology(topology).chips
    assert rep.mesh_shape == {"data": 1, "fsdp": chips, "tensor": 1, "expert": 1}
    assert rep.error is None and rep.fits
    m = rep.memory
    assert 0 < rep.total_bytes < rep.topology.hbm_gib * aot.GiB
    assert m["argument"] >= rep.state_bytes and m["temp"] > 0
    assert m["alias"] >= rep.state_bytes * 0.99  # the state is donated
    assert rep.compile_s > 0 and rep.flops and rep.flops > 0
    # Every float32 gradient is reduced over the chips once a step: reduce-scattered to its fsdp shard, or
    # all-reduced where it is replicated (norm scales); FSDP gathers the weights.
    c = rep.collectives
    assert rep.collectives_exact and c["all-gather"] > 0
    assert abs(c.get("reduce-scatter", 0) + c.get("all-reduce", 0) - 4 * rep.params) < 0.01 * 4 * rep.params, c
    assert "fits" in aot.format_report(rep).splitlines()[-1]


@pytest.mark.slow
@pytest.mark.tpu
def test_sequence_parallelism_trades_all_reduces_for_less_memory(libtpu):
    """fsdp 2 x tensor 2 on a v5e-4: with mesh.sequence_parallel the attention and MLP outputs are
    reduce-scattered (all-reduced without it) and, with rows long enough for activations to matter, the step
    needs less temporary memory (here 634 MB without, 552 MB with)."""
    reps = {sp: aot.compile_train_step(load_config("configs/tiny.py", mesh__fsdp=2, mesh__tensor=2,
                                                   mesh__sequence_parallel=sp, train__seq_len=1024,
                                                   train__batch_size=16), "v5e-4", log=lambda *_: None)
            for sp in (False, True)}
    plain, split = reps[False].collectives, reps[True].collectives
    assert split.get("all-reduce", 0) < 0.5 * plain["all-reduce"], (plain, split)
    assert split["reduce-scatter"] > plain.get("reduce-scatter", 0) + 0.25 * plain["all-reduce"], (plain, split)
    assert reps[True].memory["temp"] < reps[False].memory["temp"], (reps[False].memory, reps[True].memory)


@pytest.mark.slow
@pytest.mark.tpu
@pytest.mark.parametrize("config,overrides,topology", [
    # The block-sparse layers run the Mosaic kernel ("auto" traces as on a TPU).
    ("configs/phi3_small.py:tiny", {}, "v5p:1x1x1"),
    # It runs per batch shard (shard_map), so it lowers on a multi-chip mesh.
    ("configs/phi3_small.py:tiny", {"mesh__fsdp": -1}, "v5e-4"),
    # Heads stay split over `tensor` around the block-sparse and splash kernels (seq 256: splash applies).
    ("configs/phi3_small.py:tiny", {"mesh__fsdp": 2, "mesh__tensor": 2, "train__seq_len": 256}, "v5e-4"),
    # Dense causal attention (with a window) runs the splash kernels.
    ("configs/tiny.py", {"mesh__fsdp": -1, "model__attention_impl": "auto", "train__seq_len": 256,
                         "model__sliding_window": 100}, "v5e-4"),
], ids=["phi3small-one-chip", "phi3small-fsdp", "phi3small-tensor", "phi3-splash"])
def test_kernels_compile_for_tpu(libtpu, config, overrides, topology):
    rep = aot.compile_train_step(load_config(config, **overrides), topology, log=lambda *_: None)
    assert rep.fits
    assert "tpu_custom_call" in rep.compiled.as_text()


@pytest.mark.slow
@pytest.mark.tpu
def test_activations_that_do_not_fit(libtpu):
    """The state fits but the activations do not: the TPU compiler refuses, the report says why."""
    rep = aot.compile_train_step(load_config("configs/tiny.py", train__batch_size=64, train__seq_len=8192),
                                 "v5e-1", log=lambda *_: None)
    assert not rep.fits and "ran out of HBM" in rep.error
    assert "does not fit" in aot.failure_line(rep)


@pytest.mark.slow
@pytest.mark.tpu
def test_cli_fits(libtpu):
    r = run_cli("--config", "configs/tiny.py:test", "--topology", "v5e-4", "--config.mesh.fsdp=-1")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for needle in ("v5e:2x2: 4 chips", "'fsdp': 4", "arguments", "outputs", "temporaries", "generated code",
                   "of 16 GiB HBM", "FLOPs per chip", "compiled in", "collectives per chip per step: all-gather"):
        assert needle in out, (needle, out)
    assert out.strip().splitlines()[-1] == "fits"


@pytest.mark.slow
@pytest.mark.tpu
def test_cli_does_not_fit(libtpu):
    """Full phi-3-medium (14B) on one v5e chip: the sharded state alone is ten times its HBM."""
    r = run_cli("--config", "configs/phi3_medium.py", "--topology", "v5e-1", "--config.mesh.fsdp=1")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: does not fit: phi-3-medium-4k on v5e-1"), r.stderr
    assert "GiB" in lines[0] and "16 GiB" in lines[0]


@pytest.mark.slow
@pytest.mark.tpu
def test_cli_compiler_out_of_memory(libtpu):
    r = run_cli("--config", "configs/tiny.py:test", "--topology", "v5e-1", "--config.train.batch_size=64",
                "--config.train.seq_len=8192")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: does not fit:") and "HBM" in lines[0], r.stderr


@pytest.mark.slow
@pytest.mark.tpu
def test_cli_mesh_must_cover_the_slice(libtpu):
    r = run_cli("--config", "configs/tiny.py:test", "--topology", "v5e-4", "--config.mesh.fsdp=2")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "uses 2 of the topology's 4 chips" in r.stderr


@pytest.mark.slow
@pytest.mark.tpu
def test_cli_unknown_topology():
    r = run_cli("--config", "configs/tiny.py:test", "--topology", "v9z-8")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith("error: unknown TPU topology 'v9z-8'")
