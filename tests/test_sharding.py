"""phi3_jax.sharding: the logical-axis table, parameter rules, mesh construction, batch placement."""
import math

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from phi3_jax import sharding as shd
from phi3_jax.checkpoint import abstract_params
from phi3_jax.model import get_preset


@pytest.mark.parametrize("preset", ["phi-3-tiny", "phi-3-small-tiny", "phi-3-mini-4k", "phi-3-small-8k"])
def test_every_matrix_has_a_rule(preset):
    params = abstract_params(get_preset(preset))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in flat:
        axes = shd.param_logical_axes(path, leaf.ndim)
        assert axes is not None, shd.path_str(path)
        if shd.path_str(path).startswith("layers/"):
            assert axes[0] == "layers"


def test_resolve_mesh_shape():
    assert shd.resolve_mesh_shape({"data": 2, "fsdp": -1}, 8) == {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1}
    with pytest.raises(shd.ShardingError, match="needs 16 devices"):
        shd.resolve_mesh_shape({"data": 16}, 8)
    assert shd.make_mesh({"data": 2, "fsdp": 1}).devices.size == 2  # single process: a sub-mesh
    with pytest.raises(shd.ShardingError, match="unknown mesh axes"):
        shd.resolve_mesh_shape({"model": 2}, 8)
    with pytest.raises(shd.ShardingError, match="not divisible"):
        shd.resolve_mesh_shape({"data": 3, "fsdp": -1}, 8)


def test_specs_on_a_mesh():
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params = abstract_params(get_preset("phi-3-tiny"))
    sh = shd.tree_shardings(mesh, params)
    assert sh["layers"]["self_attn"]["qkv_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert sh["layers"]["mlp"]["down_proj"]["kernel"].spec == P(None, "tensor", "fsdp")
    assert sh["embed_tokens"]["embedding"].spec == P("tensor", "fsdp")
    assert sh["norm"]["scale"].spec == P(None)
    # A dimension the mesh does not divide is replicated instead of failing.
    assert shd.logical_to_spec(("vocab", "embed"), (321, 128), mesh) == P(None, "fsdp")
    assert shd.batch_sharding(mesh).spec == P(("data", "fsdp"), None)
    assert shd.batch_axis_size(mesh) == 4


def test_global_batch_is_split_over_batch_axes():
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    x = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)
    g = shd.make_global_batch(mesh, {"inputs": x}, 8)["inputs"]
    np.testing.assert_array_equal(np.asarray(g), x)
    assert len({s.index for s in g.addressable_shards}) == 8


def test_state_is_created_sharded():
    import optax

    from phi3_jax import train_state as ts

    mesh = shd.make_mesh({"fsdp": 8})
    cfg = get_preset("phi-3-tiny")
    tx = optax.adamw(1e-3)
    fns = ts.build(cfg, tx, mesh)
    state = fns.init(0)
    k = state["params"]["layers"]["mlp"]["gate_up_proj"]["kernel"]
    assert k.sharding.spec == P(None, "fsdp", None)
    assert k.addressable_shards[0].data.shape == (cfg.num_layers, cfg.hidden_size // 8, 2 * cfg.intermediate_size)
    mu = state["opt_state"][0].mu["layers"]["mlp"]["gate_up_proj"]["kernel"]
    assert mu.sharding.spec == P(None, "fsdp", None)


# ----------------------------------------------------------------------------------------------------
# Activation sharding constraints
# ----------------------------------------------------------------------------------------------------

def _jaxpr_primitives(fn, *args) -> set[str]:
    return {str(e.primitive) for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns}


def test_constrain_is_a_noop_without_the_context():
    import jax.numpy as jnp

    x = jnp.ones((8, 4, 16))
    assert shd.constrain(x, shd.ACT_BTD) is x
    assert "sharding_constraint" not in _jaxpr_primitives(lambda a: shd.constrain(a, shd.ACT_BTD), x)
    # A one-device mesh and mesh=None inside an outer context are no-ops too.
    with shd.activation_sharding(shd.make_mesh({"data": 1})):
        assert shd.constrain(x, shd.ACT_BTD) is x
    with shd.activation_sharding(shd.make_mesh({"fsdp": 8})), shd.activation_sharding(None):
        assert shd.constrain(x, shd.ACT_BTD) is x
    # The model traces without constraints outside the context (one device, conversion, plain jit).
    from phi3_jax.model import init_model

    model = init_model(get_preset("phi-3-tiny"))
    ids = jnp.zeros((2, 8), jnp.int32)
    assert "sharding_constraint" not in str(jax.make_jaxpr(lambda i: model(i))(ids))


def test_constrain_uses_the_table_inside_the_context():
    import jax.numpy as jnp

    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    cases = [(shd.ACT_BTD, (8, 4, 16), P(("data", "fsdp"), None, None)),
             (shd.ACT_BTNH, (8, 4, 4, 16), P(("data", "fsdp"), None, "tensor", None)),
             (shd.ACT_BTI, (8, 4, 32), P(("data", "fsdp"), None, "tensor")),
             (shd.ACT_BTV, (8, 4, 320), P(("data", "fsdp"), None, "tensor")),
             (shd.ACT_BTKH, (8, 4, 3, 16), P(("data", "fsdp"), None, None, None))]  # 3 kv heads: replicated
    for axes, shape, spec in cases:
        f = jax.jit(shd.with_activation_sharding(lambda a, axes=axes: shd.constrain(a * 2, axes), mesh))
        out = f.lower(jax.ShapeDtypeStruct(shape, jnp.float32)).compile().output_shardings
        assert out.is_equivalent_to(NamedSharding(mesh, spec), len(shape)), (axes, out)
    # Rules override entries of the table (here: sequence parallelism over tensor).
    with shd.activation_sharding(mesh, shd.SEQUENCE_PARALLEL):
        f = jax.jit(lambda a: shd.constrain(a * 2, shd.ACT_BTD))
        out = f.lower(jax.ShapeDtypeStruct((8, 4, 16), jnp.float32)).compile().output_shardings
        assert out.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), "tensor", None)), 3), out
    with shd.activation_sharding(mesh), pytest.raises(shd.ShardingError, match="logical axes"):
        shd.constrain(jnp.ones((8, 4)), shd.ACT_BTD)


def test_train_step_keeps_the_residual_stream_sharded_over_the_batch():
    """fsdp=8: activations are split by rows ([B/8, T, D] per device), never by the hidden dimension that the
    parameters' fsdp sharding would propagate into them, and never whole."""
    import dataclasses
    import re

    import jax.numpy as jnp
    import optax

    from phi3_jax import train_state as ts

    mesh = shd.make_mesh({"fsdp": 8})
    B, T, D = 16, 24, 64
    cfg = dataclasses.replace(get_preset("phi-3-tiny"), vocab_size=320, hidden_size=D, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=16, intermediate_size=96, attention_impl="xla")
    fns = ts.build(cfg, optax.adamw(1e-3), mesh)
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=fns.batch_sharding) for k in ts.BATCH_KEYS}
    lowered = fns.train_step.lower(fns.abstract_state, batch)
    assert "sharding_constraint" in lowered.as_text()
    hlo = lowered.compile().as_text()
    shapes = re.findall(r"f32\[(\d+),(\d+),(\d+)\]", hlo)
    assert (str(B // 8), str(T), str(D)) in shapes  # the residual stream, per device
    assert (str(B), str(T), str(D)) not in shapes  # never whole
    assert (str(B), str(T), str(D // 8)) not in shapes  # never split over its hidden dimension
    # The layer scans (forward and backward) carry the residual stream (its gradient) as per-device rows.
    loops = [line for line in hlo.splitlines() if " while(" in line]
    assert len(loops) == 2 and all(f"(s32[], f32[{B // 8},{T},{D}]" in line for line in loops), loops


def _in_loops(hlo: str, ops) -> list[str]:
    """The instructions of kinds `ops` inside `while` bodies (and the computations those call)."""
    import re

    from phi3_jax.hlo import computations

    comps, _ = computations(hlo)
    seen, todo = set(), re.findall(r"body=%([\w.\-]+)", hlo)
    while todo:
        name = todo.pop()
        if name not in seen and name in comps:
            seen.add(name)
            for line in comps[name]:
                todo += re.findall(r"\b(?:calls|to_apply|body|condition)=%([\w.\-]+)", line)
    return [line for name in seen for line in comps[name] if re.search(rf"\s({'|'.join(ops)})(-start)?\(", line)]


@pytest.mark.parametrize("preset,kv_heads", [("phi-3-tiny", 4), ("phi-3-tiny", 2), ("phi-3-small-tiny", 2)])
def test_tensor_parallelism_moves_weights_not_activations(preset, kv_heads, capfd):
    """fsdp=4 x tensor=2: each device cuts its own q, k, v and gate, up out of the fused projections (the
    kernels' columns are regrouped per device, once a step), so no activation is permuted between devices,
    and the embedding's gradient does not replicate the batch. Cutting the checkpoint's [q | k | v] and
    [gate | up] orders moved [B/4, T, ...] slices (collective permutes, all-to-alls in the backward pass);
    regrouping inside the layer scan permuted each layer's weights in every pass.
    phi-3-small's fused layouts (q, k, v grouped per kv head; gate and up interleaved) split in place."""
    import dataclasses
    import re

    import jax.numpy as jnp
    import optax

    from phi3_jax import train_state as ts

    mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
    B, T, D, H = 8, 128, 64, 16
    cfg = dataclasses.replace(get_preset(preset), vocab_size=320, hidden_size=D, num_layers=2, num_heads=4,
                              num_kv_heads=kv_heads, head_dim=H, intermediate_size=96, attention_impl="xla")
    fns = ts.build(cfg, optax.adamw(1e-3), mesh)
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=fns.batch_sharding) for k in ts.BATCH_KEYS}
    hlo = fns.train_step.lower(fns.abstract_state, batch).compile().as_text()

    def moved(op):
        """Element counts of the arrays each `op` in the HLO produces."""
        counts = []
        for line in hlo.splitlines():
            m = re.search(rf"= (\(.*?\)|\S+) {op}(-start)?\(", line)
            if m:
                counts += [math.prod(int(d) for d in dims.split(",") if d)
                           for dims in re.findall(r"\[([\d,]*)\]", m.group(1))]
        return counts

    # An activation slice holds at least (B/4) * T * H numbers; the regrouped kernels' slices [D/4, <= 2I/2] fewer.
    permuted = moved("collective-permute") + moved("all-to-all")
    assert max(permuted, default=0) < (B // 4) * T * H, permuted
    # The kernels are regrouped once a step, before the layer scan: no pass over a layer permutes its weights.
    assert not _in_loops(hlo, ("collective-permute", "all-to-all"))
    assert max(moved("all-gather")) < B * T * D, moved("all-gather")  # never the whole batch's residual stream
    # XLA's SPMD partitioner says so on stderr when it must replicate an array to re-split it (here: the
    # embedding's gradient, given the table's fsdp-over-`embed` layout, re-split the residual gradient).
    assert "Involuntary full rematerialization" not in capfd.readouterr().err


def test_sequence_parallelism_splits_the_residual_stream_by_sequence():
    """fsdp=4 x tensor=2 with mesh.sequence_parallel: the layer scans carry the residual stream (and its
    gradient) as [B/4, T/2, D] per device, where tensor parallelism alone keeps [B/4, T, D] on each device of
    the tensor axis. (What it does to the collectives shows on a TPU compile: test_aot.)"""
    import dataclasses

    import jax.numpy as jnp
    import optax

    from phi3_jax import train_state as ts

    mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
    B, T, D = 8, 128, 64
    cfg = dataclasses.replace(get_preset("phi-3-tiny"), vocab_size=320, hidden_size=D, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=16, intermediate_size=96, attention_impl="xla")
    for sp, rows in ((False, T), (True, T // 2)):
        fns = ts.build(cfg, optax.adamw(1e-3), mesh, sequence_parallel=sp)
        batch = {k: jax.ShapeDtypeStruct((B, T), jnp.float32 if k == "loss_mask" else jnp.int32,
                                         sharding=fns.batch_sharding) for k in ts.BATCH_KEYS}
        hlo = fns.train_step.lower(fns.abstract_state, batch).compile().as_text()
        loops = [line for line in hlo.splitlines() if " while(" in line]
        assert len(loops) == 2 and all(f"(s32[], f32[{B // 4},{rows},{D}]" in line for line in loops), (sp, loops)


def test_linear_split_regrouped_for_tensor_parallelism_matches_the_plain_cut():
    """Linear.split over fsdp=4 x tensor=2 (the kernel regrouped, each device cutting its own slices) gives the
    pieces, and the gradients of kernel, bias and input, of the plain cut of x @ kernel + bias."""
    import dataclasses

    import jax.numpy as jnp
    from flax import nnx

    from phi3_jax.model.layers import Linear

    cfg = dataclasses.replace(get_preset("phi-3-tiny"), dtype="float32", param_dtype="float32")
    lin = Linear(16, 48, bias=True, cfg=cfg, rngs=nnx.Rngs(0))
    lin.bias[...] = jax.random.normal(jax.random.key(1), (48,))
    graphdef, params = nnx.split(lin)
    x = jax.random.normal(jax.random.key(2), (8, 4, 16))
    sizes = (24, 12, 12)
    w = jax.random.normal(jax.random.key(3), (8, 4, 48))

    def loss(params, x, shards):
        pieces = nnx.merge(graphdef, params).split(x, sizes, shards, "activation_heads")
        assert [p.shape for p in pieces] == [(8, 4, n) for n in sizes]
        return jnp.sum(jnp.concatenate(pieces, axis=-1) * w)

    want = jax.value_and_grad(lambda p, x: jnp.sum((x @ p["kernel"][...] + p["bias"][...]) * w),
                              argnums=(0, 1))(params, x)
    mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
    plain = jax.jit(jax.value_and_grad(lambda p, x: loss(p, x, 1), argnums=(0, 1)))
    regrouped = jax.jit(shd.with_activation_sharding(
        jax.value_and_grad(lambda p, x: loss(p, x, 2), argnums=(0, 1)), mesh))
    for got in (plain(params, x), regrouped(params, x)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)
    with pytest.raises(ValueError, match="divide"):
        lin.split(x, (20, 28), 3, "activation_heads")
