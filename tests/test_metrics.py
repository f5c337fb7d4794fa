"""MFU peak table lookup and the metrics file's resume truncation."""
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
