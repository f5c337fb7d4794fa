"""MFU peak table lookup, the metrics file's resume truncation, and profiles of chosen train steps."""
import json
import types

import pytest

from phi3_jax import metrics


@pytest.mark.parametrize("kind,peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
                                       ("NVIDIA A100-SXM4-80GB", 312e12), ("TPU v5 lite", 197e12),
                                       ("TPU v5p", 459e12), ("TPU v4", 275e12), ("TPU v6 lite", 918e12),
                                       ("TPU v6e", 918e12), ("Some New Chip", None)])
def test_peak_flops(kind, peak):
    dev = types.SimpleNamespace(platform="gpu", device_kind=kind)
    assert metrics.peak_flops(dev) == peak


def test_cpu_has_no_mfu():
    assert metrics.peak_flops(types.SimpleNamespace(platform="cpu", device_kind="cpu")) is None
    assert metrics.mfu(1000.0, 1e9, 1, None) is None
    assert metrics.mfu(1000.0, 1e9, 2, 1e12) == pytest.approx(0.5)


def test_truncate_on_resume(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    metrics.truncate_jsonl(p, 5)
    assert [json.loads(x)["step"] for x in p.read_text().splitlines()] == [1, 2, 3, 4, 5]


def _trace_calls(directory, name: str) -> int:
    """Events of calls to the jitted function `name` in the one trace under directory."""
    import gzip

    (trace,) = list(directory.glob("plugins/profile/*/*.trace.json.gz"))
    events = json.load(gzip.open(trace))["traceEvents"]
    return sum(e.get("name") == f"PjitFunction({name})" for e in events)


def test_step_profiler_traces_the_steps_it_is_given(tmp_path):
    import jax
    import jax.numpy as jnp

    @jax.jit
    def marked_step(x):
        return jnp.sin(x) @ x

    counts = {}
    for first, last in ((2, 2), (2, 4)):
        prof = metrics.StepProfiler(tmp_path / f"{first}_{last}", first, last)
        x = jnp.ones((64, 64))
        marked_step(x)  # compiled before the traced steps
        for step in range(1, 7):
            prof.before(step)
            x = marked_step(x) / 64
            assert prof.after(step, x) == (step == last)
        assert not prof.active
        counts[last] = _trace_calls(tmp_path / f"{first}_{last}", "marked_step")
    assert counts[2] > 0 and counts[4] == 3 * counts[2]


def test_profile_steps_of_a_training_run(tmp_path):
    from train_helpers import load_config

    from phi3_jax.model.config import ConfigError
    from phi3_jax.train import run

    c = load_config("tiny", "test")
    c.train.profile_steps = (2, 3)
    run(c, str(tmp_path / "wd"))
    assert _trace_calls(tmp_path / "wd" / "tensorboard", "train_step") > 0
    for bad, words in (((3, 2), "1 <= first <= last"), ((0, 2), "1 <= first <= last"), ((1, 2, 3), "expected"),
                       ((2, 99), r"the run ends at train.steps=6")):
        c.train.profile_steps = bad
        with pytest.raises(ConfigError, match=r"config\.train\.profile_steps=.*" + words):
            run(c, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
