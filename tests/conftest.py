"""Test set-up: 8 simulated CPU devices for sharding tests, float32 matmuls at full precision.

Tests marked `slow` run only with --runslow (the full run CI does); `gpu` tests skip unless
that backend is present (`tpu` AOT tests skip themselves when libtpu is missing).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    backend = jax.default_backend()
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(pytest.mark.skip(reason="slow: run with --runslow"))
        if "gpu" in item.keywords and backend != "gpu":
            item.add_marker(pytest.mark.skip(reason="needs a GPU"))
