"""`python -m phi3_jax.aot --config configs/FILE.py[:ARG] --topology v5p-128 [--config.a.b=value ...]`

Compiles the real train step ahead of time for a TPU slice from a CPU host (libtpu installed, no TPU
needed) and says whether it fits in the chips' memory, before anyone pays for the slice.

What is compiled is what `python -m phi3_jax.train` runs: the config is loaded and validated the same
way, the mesh comes from its `mesh` section (over the topology's chips), and `train_state.build` gives
the same jitted `train_step` with the same state / batch shardings and donation. Everything is abstract:
the train state from `jax.eval_shape`, the global batch as `ShapeDtypeStruct`s; no data pipeline is
built, no tokenizer file is read (unless vocab_size=-1 needs one), no weights are allocated.

Prints the topology, the mesh, per-chip memory from `compiled.memory_analysis()` (arguments, outputs,
temporaries, generated code, total against the chip's HBM), whether it fits, FLOPs per chip from
`compiled.cost_analysis()`, the bytes that the step's collectives (all-gather, reduce-scatter, all-reduce,
collective-permute, all-to-all) handle per chip (`hlo.collective_bytes`: what a mesh shape costs in
communication), and the lowering / compile times. Exit status: 0 fits, 1 does not fit (or a
config / sharding error), 2 usage error (unknown topology, libtpu missing, bad flags).

Topology names: Cloud TPU slice names, `v5p-128` / `v4-32` (v4 and v5p count TensorCores: two per chip,
so v5p-128 is 64 chips, 4x4x4) and `v5e-16` / `v5litepod-16` / `v6e-16` (these count chips); or the form
libtpu takes, `v5p:4x4x4`, `v5e:4x4`.

Tracing targets the TPU: while the step is traced `jax.default_backend()` answers "tpu", so
`attention_impl="auto"` picks what it would pick on a TPU (the Pallas block-sparse kernel for
phi-3-small's sparse layers), not the CPU host's choice.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import sys
import time
from typing import Any

from phi3_jax import hlo

GiB = 1024 ** 3

# HBM per chip (GiB), by generation.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v6litepod": "v6e"}
_CORES_PER_NAME_UNIT = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}  # v4-8 / v5p-8 count TensorCores
_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
# Options libtpu needs to describe a slice the way JAX sees it on the hardware (one device per chip).
_TOPOLOGY_OPTIONS = {"v4": dict(chip_config_name="megacore")}

# The batch the data pipeline yields (phi3_jax/data/pipeline.py): int32 rows, a float32 loss mask.
BATCH_DTYPES = {"inputs": "int32", "targets": "int32", "segment_ids": "int32", "positions": "int32",
                "loss_mask": "float32"}


class TopologyError(ValueError):
    """An unknown topology name, or libtpu cannot describe it."""


class LoweringError(RuntimeError):
    """The train step cannot be lowered or compiled for the TPU (a code limitation, not a memory one)."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given
    generation: str  # v4 | v5e | v5p | v6e (or what a raw name says)
    libtpu_name: str  # "v5p:4x4x4"
    chips: int
    hbm_gib: float | None


def _shape_3d(chips: int) -> tuple[int, ...] | None:
    """2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ... (the shapes of v4 / v5p slices of 2^k chips)."""
    if chips == 1:
        return (1, 1, 1)
    if chips < 4 or chips & (chips - 1):
        return None
    shape = [2, 2, 1]
    while math.prod(shape) < chips:
        i = max(j for j, n in enumerate(shape) if n == min(shape))
        shape[i] *= 2
    return tuple(shape)


def parse_topology(name: str, hbm_gib: float | None = None) -> Topology:
    """A slice name (v5p-128, v5e-16) or a libtpu topology (v5p:4x4x4) -> Topology; TopologyError if unknown."""
    examples = "e.g. v5p-128, v4-32, v5e-16, v6e-16, or a libtpu topology such as v5p:4x4x4 or v5e:4x4"
    s = name.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", s)
    if m:
        gen = _ALIASES.get(m.group(1), m.group(1))
        if gen not in _DIMS:
            raise TopologyError(f"unknown TPU topology {name!r}: generation {m.group(1)!r} is not one of "
                                f"{sorted(_DIMS) + sorted(_ALIASES)} ({examples})")
        units, per = int(m.group(2)), _CORES_PER_NAME_UNIT[gen]
        chips = units // per if units % per == 0 else 0
        shape = _shape_3d(chips) if _DIMS[gen] == 3 else _SHAPES_2D.get(chips)
        if not chips or shape is None:
            raise TopologyError(f"unknown TPU topology {name!r}: no standard {gen} slice of {units} "
                                f"{'TensorCores' if per == 2 else 'chips'}; give the shape instead "
                                f"(e.g. {gen}:{'x'.join(['2'] * _DIMS[gen])})")
        libtpu_name = f"{gen}:{'x'.join(map(str, shape))}"
    else:
        m = re.fullmatch(r"([a-z0-9 ]+)[:=](\d+(?:x\d+)*)", s)
        if not m:
            raise TopologyError(f"unknown TPU topology {name!r} ({examples})")
        gen = _ALIASES.get(m.group(1), m.group(1))
        libtpu_name = f"{gen}:{m.group(2)}"
        chips = math.prod(int(n) for n in m.group(2).split("x"))
        if gen in _DIMS and len(m.group(2).split("x")) != _DIMS[gen]:
            raise TopologyError(f"unknown TPU topology {name!r}: {gen} topologies have {_DIMS[gen]} dimensions "
                                f"({examples})")
        if not chips:
            raise TopologyError(f"unknown TPU topology {name!r}: a dimension of 0 chips ({examples})")
    if hbm_gib is not None and hbm_gib <= 0:
        raise TopologyError(f"--hbm_gib={hbm_gib:g}: must be a positive number of GiB per chip")
    return Topology(name=name, generation=gen, libtpu_name=libtpu_name, chips=chips,
                    hbm_gib=hbm_gib if hbm_gib else HBM_GIB.get(gen))


def topology_devices(topo: Topology) -> list:
    """Compile-only TPU devices for the slice, from libtpu (no TPU needed). TopologyError if impossible."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise TopologyError("libtpu is not installed: `pip install libtpu` (or the package's [tpu] extra) to "
                            "compile for a TPU topology from this host") from None
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":  # compile-only: no TPU of this host is touched
        # libtpu asks the TPU VM metadata server for these when they are unset (warnings on other hosts) ...
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{topo.generation}-8")
        # ... and takes /tmp/libtpu_lockfile, which would stop a second compile (or a test) running beside it.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(topo.libtpu_name, "tpu", **_TOPOLOGY_OPTIONS.get(topo.generation, {}))
    except Exception as e:  # noqa: BLE001 - libtpu's messages are long; keep the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TopologyError(f"libtpu cannot describe TPU topology {topo.name!r} ({topo.libtpu_name}): "
                            f"{first}") from None
    devices = list(desc.devices)
    if len(devices) != topo.chips:
        raise TopologyError(f"TPU topology {topo.name!r} ({topo.libtpu_name}): libtpu gives {len(devices)} devices "
                            f"for {topo.chips} chips")
    return devices


@contextlib.contextmanager
def traced_as(platform: str):
    """`jax.default_backend()` answers `platform` inside (ops that pick an implementation per backend,
    such as attention_impl="auto", then trace what the target runs, not what this host would)."""
    import jax

    real = jax.default_backend
    jax.default_backend = lambda: platform
    try:
        yield
    finally:
        jax.default_backend = real


# ----------------------------------------------------------------------------------------------------
# The compile
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Report:
    topology: Topology
    device_kind: str
    mesh_shape: dict[str, int]
    model: str
    params: int
    batch_size: int
    seq_len: int
    grad_accum: int
    state_bytes: int  # per chip, from the state shardings
    batch_bytes: int  # per chip
    lower_s: float = 0.0
    compile_s: float = 0.0
    memory: dict[str, int] = dataclasses.field(default_factory=dict)  # per chip, bytes
    flops: float | None = None  # per chip per step, compiled.cost_analysis()
    model_flops: float = 0.0  # per chip per step, ModelConfig.flops_per_token
    scanned: bool = False  # layers under lax.scan: XLA's cost analysis counts the loop body once
    collectives: dict[str, int] = dataclasses.field(default_factory=dict)  # per chip per step, bytes by kind
    collectives_exact: bool = True  # every loop's trip count was read from the HLO
    error: str | None = None  # the compiler's out-of-memory message, or why nothing was compiled
    compiled: Any = dataclasses.field(default=None, repr=False)  # jax.stages.Compiled (as_text(), ...)

    @property
    def total_bytes(self) -> int | None:
        m = self.memory
        if not m:
            return None
        return (m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"])

    @property
    def fits(self) -> bool:
        if self.error is not None:
            return False
        if self.topology.hbm_gib is None or self.total_bytes is None:
            return True
        return self.total_bytes <= self.topology.hbm_gib * GiB


def _per_chip_bytes(tree) -> int:
    """Bytes of the largest shard of each leaf (ShapeDtypeStructs with shardings), summed."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def _resolve_model(r):
    """The ModelConfig; a tokenizer is built only when the config leaves vocab_size to it (-1)."""
    from phi3_jax import train_config as tcfg
    from phi3_jax.model.config import ConfigError

    if r.model is not None:
        return r.model
    from phi3_jax.data import make_tokenizer_from_config

    try:
        tokenizer = make_tokenizer_from_config(r.raw["data"])
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"config.model.vocab_size=-1 takes the tokenizer's, which cannot be built here ({e}); "
                          "set --config.model.vocab_size") from None
    return tcfg.resolve_model(r, tokenizer)


def compile_train_step(config, topology: str | Topology, *, hbm_gib: float | None = None, log=print) -> Report:
    """Lowers and compiles train.py's train step for `topology`; returns the report (fits or not).

    Raises TopologyError, ConfigError, ShardingError for things the user must fix, LoweringError when the
    step cannot be lowered or compiled for the TPU for another reason than memory."""
    import jax

    from phi3_jax import optim
    from phi3_jax import sharding as shd
    from phi3_jax import train_config as tcfg
    from phi3_jax import train_state as ts
    from phi3_jax.checkpoint import abstract_params

    topo = topology if isinstance(topology, Topology) else parse_topology(topology, hbm_gib)
    devices = topology_devices(topo)
    kind = devices[0].device_kind
    hbm = f"{topo.hbm_gib:g} GiB HBM per chip" if topo.hbm_gib else "HBM unknown (pass --hbm_gib)"
    log(f"topology {topo.name} = {topo.libtpu_name}: {topo.chips} chips ({kind}), {hbm}")

    # ---- the same steps as train.run, minus the data pipeline and the workdir ----
    r = tcfg.validate(config)
    t = r.train
    model_cfg = _resolve_model(r)
    shape = shd.resolve_mesh_shape(r.mesh, len(devices))
    if math.prod(shape.values()) != len(devices):  # a pod runs one process per host: a smaller mesh is an error
        raise shd.ShardingError(f"mesh {shape} uses {math.prod(shape.values())} of the topology's {len(devices)} "
                                "chips; set one mesh axis to -1 to fill")
    mesh = shd.make_mesh(shape, devices)
    n_batch = shd.batch_axis_size(mesh)
    if (t.batch_size // t.grad_accum) % n_batch:
        raise shd.ShardingError(f"config.train.batch_size={t.batch_size} (grad_accum={t.grad_accum}): each microbatch "
                                f"must split evenly over the {n_batch} batch shards of mesh {dict(mesh.shape)}")
    params = abstract_params(model_cfg, r.precision["param_dtype"])
    tx, _ = optim.make_optimizer_from_config(params, t)
    fns = ts.build(model_cfg, tx, mesh, compute_dtype=r.precision["compute_dtype"], grad_accum=t.grad_accum,
                   loss_chunks=t.loss_chunks, seed=t.seed, sequence_parallel=r.sequence_parallel,
                   objective=t.objective, dpo=ts.DPOLoss.from_config(t))

    batch = {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len), BATCH_DTYPES[k], sharding=fns.batch_sharding)
             for k in ts.BATCH_KEYS}
    name = tcfg.model_name(r.raw["model"]["preset"], model_cfg)
    rep = Report(topology=topo, device_kind=kind, mesh_shape=dict(mesh.shape), model=name,
                 params=model_cfg.param_count(), batch_size=t.batch_size, seq_len=t.seq_len, grad_accum=t.grad_accum,
                 state_bytes=_per_chip_bytes(fns.abstract_state), batch_bytes=_per_chip_bytes(batch),
                 model_flops=model_cfg.flops_per_token(t.seq_len) * (4 / 3 if t.objective == "dpo" else 1) * t.batch_size * t.seq_len / len(devices),
                 scanned=bool(model_cfg.scan_layers) and model_cfg.num_layers > model_cfg.layer_period)
    size = f"{rep.params / 1e9:.2f}B" if rep.params >= 1e9 else f"{rep.params / 1e6:.2f}M"
    log(f"model {rep.model}: {size} parameters; batch {t.batch_size} x {t.seq_len} tokens"
        f"{f', grad_accum {t.grad_accum}' if t.grad_accum > 1 else ''}; compute {r.precision['compute_dtype']}, "
        f"params {r.precision['param_dtype']}, remat {model_cfg.remat}, attention {model_cfg.attention_impl}")
    log(f"mesh {rep.mesh_shape}{' (sequence parallel)' if r.sequence_parallel else ''}: batch split {n_batch} ways "
        f"({t.batch_size // n_batch} rows per shard)")
    log(f"train state {rep.state_bytes / GiB:.2f} GiB per chip, batch {rep.batch_bytes / GiB:.3f} GiB per chip")
    if topo.hbm_gib and rep.state_bytes + rep.batch_bytes > topo.hbm_gib * GiB:
        rep.error = (f"the train state and batch alone take {(rep.state_bytes + rep.batch_bytes) / GiB:.2f} GiB "
                     f"per chip, more than the {topo.hbm_gib:g} GiB of HBM (not compiled)")
        return rep

    t0 = time.perf_counter()
    try:
        with traced_as("tpu"):
            lowered = fns.train_step.lower(fns.abstract_state, batch)
    except Exception as e:  # noqa: BLE001 - e.g. a Pallas kernel that cannot be partitioned over the mesh
        first = (str(e).strip().splitlines() or [""])[0]
        raise LoweringError(f"the train step does not lower for {topo.libtpu_name} with mesh {rep.mesh_shape} "
                            f"(attention_impl={model_cfg.attention_impl!r}): {type(e).__name__}: {first}") from e
    rep.lower_s = time.perf_counter() - t0
    log(f"lowered in {rep.lower_s:.1f} s; compiling for {topo.libtpu_name} ...")
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - the TPU compiler refuses programs that exceed HBM
        rep.compile_s = time.perf_counter() - t0
        msg = str(e)
        if re.search(r"RESOURCE_EXHAUSTED|HbmOom|Ran out of memory", msg):
            rep.error = "the compiler ran out of HBM: " + _oom_summary(msg)
            return rep
        first = (msg.strip().splitlines() or [""])[0]
        raise LoweringError(f"the TPU compiler failed for {topo.libtpu_name}: {type(e).__name__}: {first}") from e
    rep.compile_s = time.perf_counter() - t0
    rep.compiled = compiled
    m = compiled.memory_analysis()
    if m is not None:
        rep.memory = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
                      "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
                      "generated_code": m.generated_code_size_in_bytes,
                      "peak": getattr(m, "peak_memory_in_bytes", 0) or 0}
    rep.collectives, rep.collectives_exact = hlo.collective_bytes(compiled.as_text())
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if cost and cost.get("flops", -1) >= 0:
        rep.flops = float(cost["flops"])
    return rep


def _oom_summary(msg: str) -> str:
    """The lines of XLA's out-of-memory message that say how much (its program dump is long)."""
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    keep = [ln for ln in lines if re.search(r"Ran out of memory|Used .* of .*hbm|Exceeded|RESOURCE_EXHAUSTED", ln)]
    return " ".join(keep[:3] or lines[:1])[:600]


def format_report(rep: Report) -> str:
    out = []
    if rep.memory:
        m, hbm = rep.memory, rep.topology.hbm_gib
        g = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
        out.append(f"compiled in {rep.compile_s:.1f} s (lowering {rep.lower_s:.1f} s)")
        out.append("per-chip memory (compiled.memory_analysis()):")
        out.append(f"  arguments      {g(m['argument'])}  (train state {rep.state_bytes / GiB:.2f} GiB + batch)")
        out.append(f"  outputs        {g(m['output'])}  ({m['alias'] / GiB:.2f} GiB aliased with donated arguments)")
        out.append(f"  temporaries    {g(m['temp'])}")
        out.append(f"  generated code {g(m['generated_code'])}")
        share = f" ({100 * rep.total_bytes / (hbm * GiB):.1f}%)" if hbm else ""
        out.append(f"  total          {g(rep.total_bytes)}  of {hbm:g} GiB HBM{share}" if hbm else
                   f"  total          {g(rep.total_bytes)}")
        if m.get("peak"):
            out.append(f"  (compiler's peak estimate {m['peak'] / GiB:.2f} GiB)")
    if rep.flops is not None:
        note = " (XLA counts the scanned layer loop once: a lower bound)" if rep.scanned else ""
        out.append(f"FLOPs per chip per step: {rep.flops:.3g} from compiled.cost_analysis(){note}; "
                   f"{rep.model_flops:.3g} by the model's estimate (ModelConfig.flops_per_token)")
    if rep.memory:
        kinds = [k for k in hlo.COLLECTIVES if rep.collectives.get(k)]
        size = lambda b: f"{b / GiB:.2f} GiB" if b >= GiB / 10 else f"{b / 2 ** 20:.2f} MiB"  # noqa: E731
        parts = ", ".join(f"{k} {size(rep.collectives[k])}" for k in kinds)
        bound = "" if rep.collectives_exact else " (a loop of unknown length counted once: a lower bound)"
        out.append(f"collectives per chip per step: {parts}; {size(sum(rep.collectives.values()))} in all (the "
                   f"arrays they handle, from the compiled HLO, every layer of the scans counted){bound}"
                   if kinds else "collectives per chip per step: none")
    if rep.error:
        if rep.compile_s:
            out.append(f"compile stopped after {rep.compile_s:.1f} s (lowering {rep.lower_s:.1f} s)")
    elif rep.fits:
        out.append("fits" if rep.topology.hbm_gib else "compiled (HBM unknown: fit not checked)")
    return "\n".join(out)


def failure_line(rep: Report) -> str:
    where = f"{rep.model} on {rep.topology.name} ({rep.topology.libtpu_name}) with mesh {rep.mesh_shape}"
    if rep.error:
        return f"does not fit: {where}: {rep.error}"
    return (f"does not fit: {where} needs {rep.total_bytes / GiB:.2f} GiB per chip, the chip has "
            f"{rep.topology.hbm_gib:g} GiB of HBM")


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

@functools.cache  # absl flags may be defined only once per process
def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None,
        "Config file with get_config(arg): configs/FILE.py[:ARG]. Override fields with --config.SECTION.FIELD=value.",
        lock_config=True)
    flags.DEFINE_string("topology", None, "TPU slice: v5p-128, v4-32, v5e-16, v6e-16, or a libtpu topology "
                        "such as v5p:4x4x4.")
    flags.DEFINE_float("hbm_gib", None, "HBM per chip in GiB (default: v4 32, v5e 16, v5p 95, v6e 32).")
    return flags.FLAGS


def main(argv) -> None:
    from phi3_jax import sharding as shd
    from phi3_jax.data import DataError
    from phi3_jax.model.config import ConfigError

    FLAGS = _define_flags()
    if len(argv) > 1:
        sys.stderr.write(f"error: unexpected arguments {argv[1:]}\n")
        sys.exit(2)
    if FLAGS.config is None:
        sys.stderr.write("error: --config is required (e.g. --config configs/phi3_small.py)\n")
        sys.exit(2)
    if not FLAGS.topology:
        sys.stderr.write("error: --topology is required (e.g. --topology v5p-128)\n")
        sys.exit(2)
    try:
        topo = parse_topology(FLAGS.topology, FLAGS.hbm_gib)
        rep = compile_train_step(FLAGS.config, topo)
    except TopologyError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    except (ConfigError, DataError, shd.ShardingError, LoweringError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    text = format_report(rep)
    if text:
        print(text, flush=True)
    if not rep.fits:
        sys.stderr.write(f"error: {failure_line(rep)}\n")
        sys.exit(1)
    sys.exit(0)


def cli() -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the TPU from this host; never look for a local one
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_platforms", os.environ["JAX_PLATFORMS"])
    from absl import app, logging

    from phi3_jax.train import parse_flags  # the same one-line errors for bad --config fields as train.py

    _define_flags()
    if not any(a.startswith(("--verbosity", "-v", "--v=")) for a in sys.argv[1:]):
        logging.set_verbosity(logging.WARNING)
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()


__all__ = ["compile_train_step", "parse_topology", "topology_devices", "traced_as", "format_report", "Report",
           "Topology", "TopologyError", "LoweringError", "HBM_GIB", "cli"]
