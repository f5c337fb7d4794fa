"""Helpers for the training tests: configs, the CLI in a subprocess, metrics and workdir snapshots."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def load_config(name: str = "tiny", arg: str = "test"):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def env(devices: int = 8, **extra) -> dict:
    e = dict(os.environ)
    e.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONUNBUFFERED="1")
    e.update({k: str(v) for k, v in extra.items()})
    return e


def cli_args(workdir, config: str = "configs/tiny.py:test", overrides: dict | None = None, extra=()) -> list[str]:
    args = [PY, "-m", "phi3_jax.train", f"--config={REPO / config.split(':')[0]}"
            + (f":{config.split(':')[1]}" if ":" in config else ""), f"--workdir={workdir}"]
    args += [f"--config.{k}={v}" for k, v in (overrides or {}).items()]
    return args + list(extra)


def run_cli(workdir, config="configs/tiny.py:test", overrides=None, extra=(), timeout=300, devices=8, **kw):
    return subprocess.run(cli_args(workdir, config, overrides, extra), cwd=REPO, env=env(devices), capture_output=True,
                          text=True, timeout=timeout, **kw)


def losses(workdir, key: str = "loss") -> dict[int, float]:
    """{step: value} of one metric (the loss by default) from WORKDIR/metrics.jsonl."""
    out = {}
    text = (Path(workdir) / "metrics.jsonl").read_text()
    for line in text[:text.rfind("\n") + 1].splitlines():  # a running trainer may be mid-line
        row = json.loads(line)
        if key in row:
            out[row["step"]] = row[key]
    return out


def snapshot(directory) -> dict[str, str]:
    """{relative path: sha256} of every file under directory."""
    d = Path(directory)
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}
