"""Where the bytes go in the GPU train step (or, `--decode`, the sampler), from a CPU host: compile
bench/train_step.py's step for an H100 without a GPU (XLA's deviceless compilation through the jax CUDA
plugin) and tally each kernel's operand and output bytes in the optimized HLO.

Not a timing: XLA skips autotuning without a device (GEMM back-ends may differ from a real compile), and a
kernel's operand bytes are an upper bound on what it reads (except operands a fusion only slices or
gathers from, which count the slices; a scatter or dynamic-update-slice into an existing buffer counts
the elements it updates, as XLA runs it in place); a `lax.scan` (a `while` with a known trip count)
counts its body's kernels once per iteration; a `lax.cond` counts its true branch (`--packed`: the
cuDNN packed-layout attention batches take). It shows which kernels
move whole activations or weights and how a model change moves the total, on a host without a GPU.

    pip install --target /tmp/cudaplug --no-deps jax-cuda13-pjrt==JAXVERSION jax-cuda13-plugin==JAXVERSION
    JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 PYTHONPATH=/tmp/cudaplug python bench/hlo_traffic.py [--unroll] [--packed] [--top 30]
        [--form NAME=VALUE ...]   # a kernel form of the step, as bench/train_step.py --form
    JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 PYTHONPATH=/tmp/cudaplug python bench/hlo_traffic.py --decode   # the sampler

JAXVERSION: 0.12.0.1 (the figures in bench/RESULTS.md; it also runs under jax 0.12.1). The 0.12.1 plugin
stops at the cuDNN attention call: "deviceless cuDNN compilation is not enabled", and with
XLA_FLAGS=--xla_gpu_cudnn_deviceless_compilation_mode=CUDNN_DEVICELESS_COMPILATION_ALWAYS "Deviceless cuDNN
compilation requires cuDNN >= 9.8" (with cuDNN 9.24 installed beside it).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from phi3_jax.hlo import INSTR as _INSTR, shape_bytes, shape_elements  # noqa: E402

H100_SXM = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 24 }
runtime_version { major: 13 minor: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
H100_BANDWIDTH = 3.35e12  # bytes/s (HBM3, SXM)
KERNEL_OPS = {"fusion", "custom-call", "copy", "scatter", "gather", "reduce", "transpose", "dynamic-update-slice",
              "while", "sort"}
_SLICING = ("slice", "dynamic-slice", "gather")
_COMPUTATION = re.compile(r"^%([\w.\-]+) \(.*\{$")


def fused_reads(hlo_text: str) -> dict[str, tuple[list[int | None], int | None]]:
    """For every fused computation: (per parameter, the bytes its slices read where the parameter is only
    sliced (slice, dynamic-slice, gather, through bitcasts and converts), else None (the whole operand is
    read); the bytes written where the fusion updates a parameter's buffer in place, else None).

    A fusion whose root is a scatter or dynamic-update-slice of one of its parameters runs in place on a GPU
    (XLA aliases the output with that operand, inserting a copy kernel where it cannot): it reads and
    writes the updated elements only, not the whole buffer."""
    reads: dict[str, tuple[list[int | None], int | None]] = {}
    name, body, root = None, [], None
    for line in hlo_text.split("\n"):
        m = _COMPUTATION.match(line)
        if m:
            name, body, root = m.group(1), [], None
        elif line.startswith("}") and name:
            reads[name] = _param_reads(body, root)
            name = None
        elif name:
            im = _INSTR.match(line.strip())
            if im:
                body.append(im.groups())
                if line.strip().startswith("ROOT "):
                    root = im.group(1)
    return reads


_IN_PLACE = {"scatter": 2, "dynamic-update-slice": 1}  # op: index of its update operand


def _param_reads(body: list[tuple], root: str | None = None) -> tuple[list[int | None], int | None]:
    users: dict[str, list[tuple]] = collections.defaultdict(list)
    params, shapes, ops = {}, {}, {}
    for instr in body:
        iname, shape, op, args = instr
        shapes[iname], ops[iname] = shape, (op, re.findall(r"%([\w.\-]+)", args))
        if op == "parameter":
            params[iname] = int(args)
        for a in ops[iname][1]:
            users[a].append(instr)

    def sliced_elements(node: str) -> int | None:
        total = 0
        for uname, ushape, uop, uargs in users[node]:
            if uop in ("bitcast", "convert"):  # a gather of converted logits reads only what it gathers
                sub = sliced_elements(uname)
                if sub is None:
                    return None
                total += sub
            elif uop in _SLICING and re.findall(r"%([\w.\-]+)", uargs)[:1] == [node]:
                total += shape_elements(ushape)
            else:
                return None
        return total if users[node] else None

    out: list[int | None] = [None] * (max(params.values()) + 1 if params else 0)
    for pname, index in params.items():
        n, size = sliced_elements(pname), shape_elements(shapes[pname])
        out[index] = None if n is None or not size else n * shape_bytes(shapes[pname]) // size
    written = None
    root_op, root_args = ops.get(root, (None, []))
    if root_op in _IN_PLACE:
        target = root_args[0]
        while ops[target][0] == "bitcast":
            target = ops[target][1][0]
        if target in params and len(users[target]) == 1:  # the buffer is only updated, not read otherwise
            out[params[target]] = 0
            written = shape_bytes(shapes[root_args[_IN_PLACE[root_op]]])
    return out, written


def kernels(hlo_text: str, computation: str | None = None) -> list[dict]:
    """The kernel-launching instructions of the entry computation (or of `computation`): name, op, kind,
    operand / output bytes, shape, and the JAX op name they came from. A fusion operand that the fusion only
    slices counts its slices. A `conditional` stands for its true branch's kernels (`lax.cond`'s first
    function: in the step, the packed-attention path that batches whose rows fit take)."""
    return _kernels(hlo_text, fused_reads(hlo_text), computation)


def _kernels(hlo_text: str, fused: dict[str, tuple[list[int | None], int | None]],
             computation: str | None) -> list[dict]:
    if computation is None:
        start = hlo_text.index("\nENTRY")
    else:
        start = re.search(r"\n%" + re.escape(computation) + r" \(", hlo_text).start()
    body = hlo_text[start:hlo_text.index("\n}", start)]
    sizes: dict[str, int] = {}
    out = []
    for line in body.split("\n")[1:]:
        m = _INSTR.match(line.strip())
        if not m:
            continue
        name, shape, op, args = m.groups()
        sizes[name] = shape_bytes(shape)
        if op == "conditional":
            branch = re.search(r"true_computation=%([\w.\-]+)", line)
            out += _kernels(hlo_text, fused, branch.group(1)) if branch else []
            continue
        loop = re.search(r"body=%([\w.\-]+)", line) if op == "while" else None
        trips = re.search(r'known_trip_count":\{"n":"(\d+)"', line) if loop else None
        if trips:  # a scan: its body's kernels, once per iteration
            out += _kernels(hlo_text, fused, loop.group(1)) * int(trips.group(1))
            continue
        if op not in KERNEL_OPS:
            continue
        operands = [a.strip()[1:] for a in args.split(",") if a.strip().startswith("%")]
        kind = re.search(r"kind=(k\w+)", line) or re.search(r'custom_call_target="([^"]+)"', line)
        source = re.search(r'op_name="([^"]+)"', line)
        calls = re.search(r"calls=%([\w.\-]+)", line)
        sliced, written = fused.get(calls.group(1), ([], None)) if op == "fusion" and calls else ([], None)
        if op in _IN_PLACE:  # an unfused in-place update: reads and writes its update operand only
            sliced, written = [0], sizes.get(operands[_IN_PLACE[op]], 0)
        read = sum(min(sliced[i], sizes.get(a, 0)) if i < len(sliced) and sliced[i] is not None else sizes.get(a, 0)
                   for i, a in enumerate(operands))
        out.append(dict(name=name, op=op, kind=kind.group(1) if kind else op, read=read,
                        written=sizes[name] if written is None else written,
                        shape=shape, source=source.group(1) if source else ""))
    return out


def report(ks: list[dict], top: int) -> str:
    total = sum(k["read"] + k["written"] for k in ks)
    lines = [f"{len(ks)} kernels; operand + output bytes {total / 1e9:.1f} GB "
             f"({total / H100_BANDWIDTH * 1e3:.1f} ms at {H100_BANDWIDTH / 1e12:.2f} TB/s, an upper bound)"]
    by_kind = collections.Counter()
    for k in ks:
        by_kind[k["kind"]] += k["read"] + k["written"]
    lines += [f"  {kind:32s} {b / 1e9:8.2f} GB" for kind, b in by_kind.most_common()]
    lines.append(f"top {top} kernels other than GEMMs (kCustom) by bytes:")
    rest = sorted((k for k in ks if k["kind"] != "kCustom"), key=lambda k: -(k["read"] + k["written"]))
    lines += [f"  {(k['read'] + k['written']) / 1e9:6.2f} GB  {k['name'][:32]:32s} {k['shape'][:56]:56s} "
              f"{k['source'][-70:]}" for k in rest[:top]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--unroll", action="store_true", help="layers unrolled instead of lax.scan")
    p.add_argument("--loss-chunks", type=int, default=1)
    p.add_argument("--packed", action="store_true", help="rows of several documents (segment ids, positions)")
    p.add_argument("--decode", action="store_true",
                   help="phi3_jax.generate's sampler instead (64 new tokens a row, KV cache of the train shape's length)")
    p.add_argument("--form", action="append", metavar="NAME=VALUE",
                   help="a kernel form of the step, as bench/train_step.py --form (repeatable)")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--hlo-out", metavar="FILE", help="also write the optimized HLO text here")
    args = p.parse_args(argv)
    os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    import train_step as bench
    from phi3_jax import optim, sharding as shd, train_state as ts
    from phi3_jax.checkpoint import abstract_params

    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=H100_SXM, topology="1x1x1")
    except Exception as e:  # noqa: BLE001  (no plugin, or the plugin refused to start)
        print(f"no deviceless CUDA compiler: {e}\n(install the jax CUDA plugin as the docstring says)", file=sys.stderr)
        return 2
    from common import apply_forms

    apply_forms(args.form)
    # Pallas' Triton lowering (the kernel forms) asks the local GPU for its compute capability; the target
    # here is an H100.
    try:
        from jax._src.pallas.triton import gpu_info
    except ImportError:  # a jax without it: the XLA forms still compile
        gpu_info = None
    if gpu_info is not None:
        gpu_info.get_gpu_info = lambda: gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H100)
    s = dict(bench.GPU_SHAPE)
    if args.decode:
        return decode_step(topo, s, args)
    cfg = bench.model_config(s, "bfloat16", "gpu", "cudnn", "none", not args.unroll)
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, topo.devices[:1])
    tx, _ = optim.make_optimizer(abstract_params(cfg), lr=1e-4, steps=1000, warmup_steps=0, weight_decay=0.1,
                                 clip_norm=1.0)
    fns = ts.build(cfg, tx, mesh, compute_dtype="bfloat16", loss_chunks=args.loss_chunks)
    B, T = s["batch"], s["seq"]
    keys = ("inputs", "targets", "loss_mask") + (("segment_ids", "positions") if args.packed else ())
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=fns.batch_sharding) for k in keys}
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa

    from phi3_jax.aot import traced_as

    # JAX's cuDNN attention asks the local GPU which kernels it may use; the target here is an H100.
    cudnn_fa.check_compute_capability = lambda capability: tuple(map(int, capability.split("."))) <= (9, 0)
    with traced_as("gpu"):  # the model picks its GPU code paths (attention, fused backward passes)
        lowered = fns.train_step.lower(fns.abstract_state, batch)
    compiled = lowered.compile()
    text = compiled.as_text()
    if args.hlo_out:
        with open(args.hlo_out, "w") as f:
            f.write(text)
    mem = compiled.memory_analysis()
    print(f"train step at bench/train_step.py's GPU shape, {'unrolled' if args.unroll else 'scanned'} layers, "
          f"{'packed rows, ' if args.packed else ''}"
          f"jax {jax.__version__}, compiled for {topo.devices[0].device_kind} without a device")
    print(f"memory: arguments {mem.argument_size_in_bytes / 1e9:.2f} GB, temporaries {mem.temp_size_in_bytes / 1e9:.2f} GB")
    print(report(kernels(text), args.top))
    return 0


def decode_step(topo, s: dict, args) -> int:
    """Tally `phi3_jax.generate`'s compiled sampler: a 64-token prompt per row, then 64 greedy tokens
    against a KV cache with room for the train shape's sequence, from float32 weights as a trained
    checkpoint holds them; the token loop's kernels are also summed per token."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import train_step as bench
    from phi3_jax import generate
    from phi3_jax.aot import traced_as
    from phi3_jax.model.decoder import abstract_model

    cfg = bench.model_config(s, "bfloat16", "gpu", None, "none", True)  # generate scans the layers anyway
    graphdef, state = nnx.split(abstract_model(cfg))
    device = jax.sharding.SingleDeviceSharding(topo.devices[0])
    on_device = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=device)  # noqa: E731
    state = jax.tree.map(lambda a: on_device(a.shape, a.dtype), state)
    B, S, P, N = s["batch"], s["seq"], 64, 64
    with traced_as("gpu"):
        compiled = generate._generate.lower(graphdef, state, on_device((B, P), jnp.int32), on_device((B,), jnp.int32),
                                            jax.random.key(0), capacity=S, new_tokens=N, temperature=0.0,
                                            top_k=0).compile()
    text = compiled.as_text()
    if args.hlo_out:
        with open(args.hlo_out, "w") as f:
            f.write(text)
    cache_gb = 2 * cfg.num_layers * B * S * cfg.num_kv_heads * cfg.head_dim * 2 / 1e9
    print(f"generate: batch {B}, prompt {P}, {N} new tokens, KV cache of {S} tokens ({cache_gb:.2f} GB bf16), "
          f"{cfg.num_layers} layers at bench/train_step.py's GPU width, "
          f"float32 weights ({sum(a.size for a in jax.tree.leaves(state)) * 4 / 1e9:.2f} GB), jax {jax.__version__}, "
          f"compiled for {topo.devices[0].device_kind} without a device")
    print(report(kernels(text), args.top))
    loop = re.search(r"while\(.*?body=%([\w.\-]+).*?known_trip_count\":\{\"n\":\"" + str(N) + '"', text)
    if loop:
        per_token = kernels(text, loop.group(1))
        print(f"per generated token (the token loop's body): {len(per_token)} kernels, "
              f"{sum(k['read'] + k['written'] for k in per_token) / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
