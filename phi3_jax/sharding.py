"""The one table of logical axes -> mesh axes, parameter logical axes, mesh construction, shardings.

Nothing else in the code names a mesh axis. Layers and the trainer speak in *logical* axes (batch, seq,
embed, heads, kv_heads, head_dim, mlp, vocab, qkv, layers, expert); `LOGICAL_RULES` maps each to zero or
more mesh axes of the mesh (data, fsdp, tensor, expert):

- data:   pure data parallelism (parameters replicated).
- fsdp:   data parallelism with parameters and optimizer state sharded over their `embed` dimension
          (ZeRO-3 style; XLA all-gathers weights before use and reduce-scatters gradients).
- tensor: Megatron-style tensor parallelism over heads / mlp / vocab.
- expert: expert parallelism for MoE blocks (size 1 for dense models); also a data axis for activations.

Activations use their own logical names (activation_batch, activation_seq, activation_norm_seq (the residual
stream's sequence), activation_embed, activation_heads, activation_kv_heads, activation_head_dim,
activation_mlp, activation_vocab; the maxtext convention): the batch of every activation is split over all the
data-like mesh axes, fsdp included, while parameters use fsdp for their `embed` dimension. Layers call
`constrain(x, logical_axes)` at a few places (residual stream, q/k/v, MLP hidden, logits); it applies
`jax.lax.with_sharding_constraint` only inside an `activation_sharding(mesh)` context (set at trace time by
the jitted train / eval steps, or by whoever lowers a step ahead of time) and is a no-op otherwise, so the
model runs unchanged on one device, in tests, in conversion and under plain jit.
Under tensor parallelism the fused projections ([q | k | v], [gate | up]) have their kernels' columns
regrouped per device (`layers.Linear.split`, sized by `even_shards`; the decoder does it once a step for all
layers, before the layer scan), so each device cuts its own heads and MLP slices out of its block of the
output instead of trading activations with the others.
Without these constraints XLA's SPMD partitioner propagates the parameters' fsdp sharding into the residual
stream inside the layer scan and then has to replicate whole activations to undo it ("Involuntary full
rematerialization"). For the same reason the embedding lookup reads a table all-gathered over `embed`
(GATHERED_VD), as FSDP gathers every other weight before its matmul.

Parameters are stacked over a leading "layers" axis (the decoder scans over depth); `param_logical_axes`
assigns logical axes by parameter-path pattern, so any pytree whose leaf paths end in a parameter path
(the parameters themselves, AdamW's mu and nu) gets the same sharding. A dimension that the mesh axes do
not divide is replicated instead (a warning, once per axis and size), so odd vocabularies and tiny test
models always run.

Multi-host: `maybe_initialize_distributed` calls `jax.distributed.initialize` when asked; each process
then feeds its own rows of the global batch (`make_global_batch`).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)
_REPLICATED_SEEN: set = set()  # (logical axis, size, mesh axes) already warned about

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
    # Activations. Rows over every data-like axis (fsdp is data parallelism with sharded parameters, and
    # expert is a data axis outside MoE blocks), like `batch`; the residual stream's hidden dimension is
    # replicated (fsdp already splits the rows; Megatron tensor parallelism keeps the residual whole and
    # splits heads / mlp / vocab); sequence parallelism (SEQUENCE_PARALLEL) splits its sequence.
    "activation_batch": ("data", "fsdp", "expert"),
    "activation_seq": None,
    "activation_norm_seq": None,  # the residual stream's sequence: "tensor" under SEQUENCE_PARALLEL
    "activation_embed": None,
    "activation_heads": "tensor",
    "activation_kv_heads": "tensor",
    "activation_head_dim": None,
    "activation_mlp": "tensor",
    "activation_vocab": "tensor",
}

# Logical axes of the activations the model constrains (shape suffixes as in the layer bodies).
ACT_BTD = ("activation_batch", "activation_norm_seq", "activation_embed")  # residual stream
ACT_BTH = ("activation_batch", "activation_seq", "activation_head_dim")  # RoPE tables
ACT_BTNH = ("activation_batch", "activation_seq", "activation_heads", "activation_head_dim")  # q, attention out
ACT_BTKH = ("activation_batch", "activation_seq", "activation_kv_heads", "activation_head_dim")  # k, v
ACT_BTI = ("activation_batch", "activation_seq", "activation_mlp")  # MLP hidden
ACT_BTV = ("activation_batch", "activation_seq", "activation_vocab")  # logits
GATHERED_VD = ("vocab", None)  # the embedding table gathered over `embed` (fsdp) for the lookup

# Megatron sequence parallelism (`activation_sharding(mesh, SEQUENCE_PARALLEL)`, config mesh.sequence_parallel):
# between the tensor-parallel matmuls the residual stream, its norms and dropout are split over `tensor` by
# sequence, where plain tensor parallelism keeps them whole on every device of the tensor axis. XLA then
# all-gathers the sequence before the qkv and gate_up matmuls and reduce-scatters the attention and MLP outputs
# (which tensor parallelism otherwise all-reduces): the same bytes, a tensor-th of the residual activations.
SEQUENCE_PARALLEL: dict[str, Any] = {"activation_norm_seq": "tensor"}

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
                    mesh: Mesh | None = None, rules: Mapping[str, Any] | None = None) -> P:
    """PartitionSpec for logical axes; with shape and mesh, dimensions the mesh does not divide replicate.

    `rules` defaults to LOGICAL_RULES (the table); a mesh axis is used by at most one dimension."""
    rules = LOGICAL_RULES if rules is None else rules
    out, used = [], set()
    for i, name in enumerate(axes):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ShardingError(f"unknown logical axis {name!r}; known: {sorted(rules)}")
        mesh_axes = rules[name]
        mesh_axes = () if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape.get(a, 1) > 1)
            if shape is not None and mesh_axes:
                size = math.prod(mesh.shape[a] for a in mesh_axes)
                if shape[i] % size:
                    if (name, shape[i], mesh_axes) not in _REPLICATED_SEEN:
                        _REPLICATED_SEEN.add((name, shape[i], mesh_axes))
                        log.warning("logical axis %s of size %d is not divisible by mesh axes %s (%d devices): "
                                    "replicated there (every such array is whole on each of those devices)",
                                    name, shape[i], mesh_axes, size)
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


# ----------------------------------------------------------------------------------------------------
# Activation sharding constraints
# ----------------------------------------------------------------------------------------------------

# (mesh, rules) while an `activation_sharding` context is active, else None. Read at trace time.
_ACTIVATION_CONTEXT: contextvars.ContextVar[tuple[Mesh, Mapping[str, Any]] | None] = contextvars.ContextVar(
    "phi3_jax_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Mapping[str, Any] | None = None):
    """Within this context `constrain` pins activations to the shardings the table gives on `mesh`.

    `rules` overrides entries of LOGICAL_RULES for the activations (e.g. {"activation_seq": "tensor"}).
    The context matters while a function is *traced*: enter it around `jax.jit(f).lower(...)` or the first
    call, or wrap the function before jitting (`with_activation_sharding`), which is what the train and eval
    steps do. jit's trace cache does not know about the context, so do not trace one jitted function both
    inside and outside it. `mesh=None` switches the constraints off inside an outer context.
    """
    value = None if mesh is None else (mesh, {**LOGICAL_RULES, **(rules or {})})
    token = _ACTIVATION_CONTEXT.set(value)
    try:
        yield
    finally:
        _ACTIVATION_CONTEXT.reset(token)


def with_activation_sharding(fn: Callable, mesh: Mesh | None, rules: Mapping[str, Any] | None = None) -> Callable:
    """`fn` running inside `activation_sharding(mesh, rules)`: jit the result, and every trace has the context."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_sharding(mesh, rules):
            return fn(*args, **kwargs)

    return wrapped


def constrain(x, logical_axes: Sequence[str | None]):
    """`x` with a sharding constraint from its logical axes inside `activation_sharding`; else `x` itself.

    Dimensions the mesh axes do not divide are replicated (as for parameters). A mesh of one device, or no
    context, leaves `x` untouched, so the model traces exactly as before outside training.
    """
    ctx = _ACTIVATION_CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    if len(logical_axes) != x.ndim:
        raise ShardingError(f"constrain: {len(logical_axes)} logical axes {tuple(logical_axes)} for an array of "
                            f"shape {x.shape}")
    if mesh.size == 1:
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_parallel(fn: Callable, *arrays, split_heads: bool = False):
    """fn(*arrays), run per batch shard under `shard_map` inside `activation_sharding` on several devices.

    For kernels XLA cannot partition (Pallas / Mosaic custom calls): every array is split over the
    activation batch axes on its leading dimension and replicated otherwise, so each device runs the kernel
    on its own rows. With `split_heads` (kernels whose heads are independent and alike), the [B, T, heads,
    H] arrays are also split over the activation heads axes (tensor parallelism) where those divide every
    array's head count, so no device gathers the others' heads. Outside the context, or on one device, it
    is a plain call. Every output's leading dimension is split like the batch (with `split_heads`, outputs
    are sharded like the first array).
    """
    ctx = _ACTIVATION_CONTEXT.get()
    if ctx is None or ctx[0].size == 1:
        return fn(*arrays)
    mesh, rules = ctx
    batch = _context_axes(mesh, rules, "activation_batch")
    heads = _head_axes(mesh, rules, arrays) if split_heads else ()
    specs = tuple(P(batch, None, heads or None, None) if a.ndim == 4 else P(batch, *([None] * (a.ndim - 1)))
                  for a in arrays)
    out_specs = specs[0] if split_heads else P(batch)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=out_specs, check_vma=False)(*arrays)


def context_axes(logical: str) -> tuple[str, ...]:
    """The mesh axes of more than one device that a logical activation axis is split over inside
    `activation_sharding` (none outside it)."""
    ctx = _ACTIVATION_CONTEXT.get()
    if ctx is None:
        return ()
    mesh, rules = ctx
    return tuple(a for a in _context_axes(mesh, rules, logical) if mesh.shape[a] > 1)


def even_shards(logical: str, sizes: Sequence[int]) -> int:
    """Into how many slices `activation_sharding` splits the activation axis `logical`, where that number
    divides every one of `sizes` (head counts, widths); 1 otherwise, and outside the context."""
    ctx = _ACTIVATION_CONTEXT.get()
    if ctx is None:
        return 1
    n = math.prod(ctx[0].shape[a] for a in context_axes(logical))
    return n if all(size % n == 0 for size in sizes) else 1


def head_shards(*arrays) -> int:
    """Into how many slices `batch_parallel(..., split_heads=True)` would cut these arrays' heads (1: none)."""
    ctx = _ACTIVATION_CONTEXT.get()
    if ctx is None or ctx[0].size == 1:
        return 1
    mesh, rules = ctx
    return math.prod(mesh.shape[a] for a in _head_axes(mesh, rules, arrays))


def _context_axes(mesh: Mesh, rules: Mapping[str, Any], logical: str) -> tuple[str, ...]:
    axes = rules[logical]
    return tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a in mesh.shape)


def _head_axes(mesh: Mesh, rules: Mapping[str, Any], arrays) -> tuple[str, ...]:
    """The activation heads axes, where they divide the head count of every [B, T, heads, H] array."""
    heads = _context_axes(mesh, rules, "activation_heads")
    n = math.prod(mesh.shape[a] for a in heads)
    if n == 1 or any(a.ndim == 4 and a.shape[2] % n for a in arrays):
        return ()
    return heads


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
