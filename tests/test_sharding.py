"""phi3_jax.sharding: the logical-axis table, parameter rules, mesh construction, batch placement."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

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
