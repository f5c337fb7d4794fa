"""The one table of logical axes -> mesh axes, parameter logical axes, mesh construction, shardings.

Nothing else in the code names a mesh axis. Layers and the trainer speak in *logical* axes (batch, seq,
embed, heads, kv_heads, head_dim, mlp, vocab, qkv, layers, expert); `LOGICAL_RULES` maps each to zero or
more mesh axes of the mesh (data, fsdp, tensor, expert):

- data:   pure data parallelism (parameters replicated).
- fsdp:   data parallelism with parameters and optimizer state sharded over their `embed` dimension
          (ZeRO-3 style; XLA all-gathers weights before use and reduce-scatters gradients).
- tensor: Megatron-style tensor parallelism over heads / mlp / vocab.
- expert: expert parallelism for MoE blocks (size 1 for dense models); also a data axis for activations.

Parameters are stacked over a leading "layers" axis (the decoder scans over depth); `param_logical_axes`
assigns logical axes by parameter-path pattern, so any pytree whose leaf paths end in a parameter path
(the parameters themselves, AdamW's mu and nu) gets the same sharding. A dimension that the mesh axes do
not divide is replicated instead (logged once), so odd vocabularies and tiny test models always run.

Multi-host: `maybe_initialize_distributed` calls `jax.distributed.initialize` when asked; each process
then feeds its own rows of the global batch (`make_global_batch`).
"""
from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# The table. Values: None (replicated), one mesh axis, or a tuple of mesh axes (sharded over their product).
LOGICAL_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp", "expert"),
    "seq": None,
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "qkv": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
    "expert": "expert",
    "norm": None,  # vectors of size hidden_size (norm scales, output biases): small, replicated
}

# Parameter path pattern (searched in "/".join(path)) -> logical axes of the *unstacked* parameter.
# A parameter under "layers/" carries one more leading dimension, the "layers" axis. First match wins.
PARAM_RULES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"embed_tokens/embedding$", ("vocab", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"(qkv_proj|query_key_value)/kernel$", ("embed", "qkv")),
    (r"(qkv_proj|query_key_value)/bias$", ("qkv",)),
    (r"(o_proj|dense)/kernel$", ("heads", "embed")),
    (r"gate_up_proj/kernel$", ("embed", "mlp")),
    (r"gate_up_proj/bias$", ("mlp",)),
    (r"down_proj/kernel$", ("mlp", "embed")),
    (r"router/kernel$", ("embed", None)),
    (r"(scale|bias)$", ("norm",)),
]


class ShardingError(ValueError):
    """A mesh shape that does not fit the devices, or a parameter with no sharding rule."""


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path) -> str:
    """'layers/self_attn/qkv_proj/kernel' for a tuple of strings or a jax key path."""
    return "/".join(p if isinstance(p, str) else _key_str(p) for p in path)


def param_logical_axes(path, ndim: int) -> tuple[str | None, ...] | None:
    """Logical axes of the leaf at `path` with `ndim` dims, or None if no rule matches."""
    s = path_str(path)
    for pattern, axes in PARAM_RULES:
        if re.search(pattern, s):
            axes = tuple(axes)
            if ndim == len(axes) + 1 and re.search(r"(^|/)layers/", s):
                axes = ("layers",) + axes
            if ndim == len(axes) + 1 and re.search(r"(^|/)experts?/", s):
                axes = ("expert",) + axes
            if len(axes) != ndim:
                return None
            return axes
    return None


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
    """PartitionSpec for logical axes; with shape and mesh, dimensions the mesh does not divide replicate."""
    out, used = [], set()
    for i, name in enumerate(axes):
        if name is None:
            out.append(None)
            continue
        if name not in LOGICAL_RULES:
            raise ShardingError(f"unknown logical axis {name!r}; known: {sorted(LOGICAL_RULES)}")
        mesh_axes = LOGICAL_RULES[name]
        mesh_axes = () if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape.get(a, 1) > 1)
            if shape is not None and mesh_axes:
                size = math.prod(mesh.shape[a] for a in mesh_axes)
                if shape[i] % size:
                    log.info("dimension %d (%s, size %d) not divisible by mesh axes %s (%d): replicated",
                             i, name, shape[i], mesh_axes, size)
                    mesh_axes = ()
        used.update(mesh_axes)
        out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*out)


def tree_shardings(mesh: Mesh, abstract_tree):
    """NamedSharding for every leaf: parameter-like leaves by PARAM_RULES, everything else replicated.

    Works for the parameters and for any state whose leaves end in a parameter path (optimizer moments).
    """
    def one(path, leaf):
        shape = getattr(leaf, "shape", ())
        axes = param_logical_axes(path, len(shape)) if len(shape) else None
        if axes is None:
            if len(shape) >= 2:
                log.warning("no sharding rule for %s %s: replicated", path_str(path), shape)
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows over the batch mesh axes; the other dimensions replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + ("seq",) * (ndim - 1), None, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_axis_size(mesh: Mesh) -> int:
    """How many ways the batch is split (the product of the batch mesh axes)."""
    names = LOGICAL_RULES["batch"]
    return math.prod(mesh.shape.get(a, 1) for a in names)


def resolve_mesh_shape(shape: dict[str, int], num_devices: int) -> dict[str, int]:
    """Fills the one -1 entry (if any) so that the product equals num_devices; checks the product."""
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ShardingError(f"unknown mesh axes {unknown}; known: {MESH_AXES}")
    shape = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    fill = [a for a, n in shape.items() if n == -1]
    if len(fill) > 1:
        raise ShardingError(f"mesh: at most one axis may be -1, got {fill}")
    for a, n in shape.items():
        if n == 0 or n < -1:
            raise ShardingError(f"mesh.{a}={n}: must be a positive integer or -1 (fill)")
    known = math.prod(n for n in shape.values() if n != -1)
    if fill:
        if num_devices % known:
            raise ShardingError(f"mesh {shape}: {num_devices} devices are not divisible by {known}")
        shape[fill[0]] = num_devices // known
    need = math.prod(shape.values())
    if need > num_devices or (need < num_devices and (fill or jax.process_count() > 1)):
        raise ShardingError(f"mesh {shape} needs {need} devices, there are {num_devices}; "
                            "set one axis to -1 to fill")
    return shape


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh with axes MESH_AXES from a {axis: size} dict (-1 = fill with the remaining devices).

    Without a -1 the sizes must multiply to the device count, except in a single process, where a smaller
    mesh takes the first devices (debugging, tests)."""
    devices = list(jax.devices() if devices is None else devices)
    resolved = resolve_mesh_shape(shape, len(devices))
    sizes = tuple(resolved[a] for a in MESH_AXES)
    if math.prod(sizes) < len(devices):  # single process: an explicit smaller mesh uses the first devices
        log.warning("mesh %s uses %d of %d devices", resolved, math.prod(sizes), len(devices))
        devices = devices[:math.prod(sizes)]
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(sizes, devices=devices, allow_split_physical_axes=True)
    except Exception:  # noqa: BLE001 - CPU / unusual topologies: plain order (process-major)
        arr = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(arr, MESH_AXES)


def make_global_batch(mesh: Mesh, local_batch: dict[str, np.ndarray], global_batch_size: int) -> dict[str, jax.Array]:
    """Global arrays from each process's rows of the batch (its contiguous slice, process order).

    Single process: `local_batch` is the whole batch. Multi-process: process i holds rows
    [i * B / n, (i + 1) * B / n) of the global batch, which is what its devices hold under the batch
    sharding when devices are ordered process-major (as `make_mesh` does on CPU and GPU hosts).
    """
    out = {}
    for name, x in local_batch.items():
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim)
        if jax.process_count() == 1:
            out[name] = jax.device_put(x, sharding)
        else:
            out[name] = jax.make_array_from_process_local_data(sharding, x, (global_batch_size,) + x.shape[1:])
    return out


def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
    """`jax.distributed.initialize` when asked by arguments or the environment; True if it ran.

    Environment: PHI3_COORDINATOR_ADDRESS, PHI3_NUM_PROCESSES, PHI3_PROCESS_ID; or PHI3_DISTRIBUTED=1 to
    let JAX discover a cluster (TPU pods, SLURM, Open MPI).
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("PHI3_COORDINATOR_ADDRESS") or None
    if num_processes is None and env.get("PHI3_NUM_PROCESSES"):
        num_processes = int(env["PHI3_NUM_PROCESSES"])
    if process_id is None and env.get("PHI3_PROCESS_ID"):
        process_id = int(env["PHI3_PROCESS_ID"])
    if coordinator_address:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
        return True
    if env.get("PHI3_DISTRIBUTED") == "1":
        jax.distributed.initialize()
        return True
    return False
