"""phi3_jax.hlo: the collectives a compiled step runs, per device, with loops counted per iteration."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from phi3_jax import hlo


def test_collective_bytes_of_a_scan_compiled_here():
    """A psum in a 3-step scan over 8 CPU devices: three all-reduces of each device's [1, 256] float32 rows."""
    mesh = jax.make_mesh((8,), ("i",))

    def body(c_1F, _):
        return jax.lax.psum(c_1F, "i") * 0.5, None

    f = jax.jit(jax.shard_map(lambda x: jax.lax.scan(body, x, None, length=3)[0], mesh=mesh,
                              in_specs=P("i"), out_specs=P("i"), check_vma=False))
    x = jax.device_put(np.ones((8, 256), np.float32), NamedSharding(mesh, P("i")))
    text = f.lower(x).compile().as_text()
    assert hlo.collective_bytes(text) == ({"all-reduce": 3 * 256 * 4}, True)
    np.testing.assert_allclose(np.asarray(f(x)), 64.0)  # 1 -> 8 * 0.5 = 4 -> 32 * 0.5 = 16 -> 128 * 0.5


# XLA:TPU's text, cut down: a scan whose trip count only its condition gives, an asynchronous permute, the
# reduce-scatter fusion, an attribute written over several lines, and a conditional.
TPU_TEXT = """HloModule jit_train_step

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add.1 = f32[] add(%x, %y)
}

%all-reduce-scatter.clone (input.5: bf16[2048,3072]) -> bf16[2048,1536] {
  %input.5 = bf16[2048,3072]{1,0:T(8,128)(2,1)S(1)} parameter(0)
  %all-reduce.47 = bf16[2048,3072]{1,0:T(8,128)(2,1)} all-reduce(%input.5), channel_id=41, to_apply=%add
  ROOT %ds = bf16[2048,1536]{1,0} dynamic-slice(%all-reduce.47, %c0, %c1), dynamic_slice_sizes={2048,1536}
}

%cond.1 (p: (s32[], bf16[64])) -> pred[] {
  %constant.278.clone.3 = s32[]{:T(128)} constant(32)
  %p = (s32[]{:T(128)}, bf16[64]{0}) parameter(0)
  %gte = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt.71 = pred[]{:T(512)} compare(%gte, %constant.278.clone.3), direction=LT, metadata={op_name="lt"}
}

%body.1 (p: (s32[], bf16[64])) -> (s32[], bf16[64]) {
  %p = (s32[]{:T(128)}, bf16[64]{0}) parameter(0)
  %all-gather.54 = bf16[3072,1,2304]{0,2,1:T(8,128)(2,1)} all-gather(%w), channel_id=8, dimensions={0}
  %cp-start = (bf16[1536,768]{0,1}, bf16[1536,768]{0,1}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%w2), channel_id=3
  %kernel = (bf16[8,8]{1,0}, f32[8]{0}) custom-call(%q), custom_call_target="tpu_custom_call", backend_config={"a":"x
}}, metadata={op_name="pallas_call"}, backend_config={"b":1
}}
  %cp-done = bf16[1536,768]{0,1} collective-permute-done(%cp-start), metadata={op_name="slice"}
  %fusion.348 = bf16[2048,1536]{1,0:T(8,128)(2,1)} fusion(%copy-done.15), kind=kCustom, calls=%all-reduce-scatter.clone
  ROOT %t = (s32[]{:T(128)}, bf16[64]{0}) tuple(%i, %x)
}

%branch_small (a: f32[16]) -> f32[16] {
  %a = f32[16]{0} parameter(0)
  ROOT %ar = f32[16]{0} all-reduce(%a), to_apply=%add
}

%branch_large (a: f32[16]) -> f32[16] {
  %a = f32[16]{0} parameter(0)
  ROOT %ag = f32[64]{0} all-gather(%a), dimensions={0}
}

ENTRY %main.34_spmd (param: bf16[64]) -> bf16[64] {
  %while.40 = (s32[]{:T(128)}, bf16[64]{0}) while(%tuple), condition=%cond.1, body=%body.1, backend_config={"flag_configs":[]}
  %cond = f32[16]{0} conditional(%pred, %x, %x), branch_computations={%branch_small, %branch_large}
  ROOT %all-reduce.52 = bf16[8,4096]{1,0:T(8,128)(2,1)} all-reduce(%fusion.367), channel_id=10, to_apply=%add
}
"""


@pytest.mark.parametrize("counter", ["s32", "u32"])  # a scan's counter; the windowed matmuls' loops count in u32
def test_collective_bytes_of_tpu_text(counter):
    text = TPU_TEXT.replace("s32[]{:T(128)} constant(32)",
                            f'{counter}[]{{:T(128)}} constant(32), metadata={{op_name="dot_general"}}')
    got, exact = hlo.collective_bytes(text)
    assert exact
    assert got == {
        "all-gather": 32 * 3072 * 2304 * 2 + 64 * 4,  # the loop's gather, and the conditional's larger branch
        "collective-permute": 32 * 1536 * 768 * 2,  # counted at its -done, once per iteration
        "reduce-scatter": 32 * 2048 * 3072 * 2,  # XLA:TPU's fusion of an all-reduce and a slice: the operand
        "all-reduce": 8 * 4096 * 2 + 16 * 4,  # the entry's, and the conditional's other branch
    }


def test_a_loop_of_unknown_length_counts_once_and_says_so():
    text = TPU_TEXT.replace("direction=LT", "direction=NE")
    got, exact = hlo.collective_bytes(text)
    assert not exact and got["collective-permute"] == 1536 * 768 * 2


def test_an_asynchronous_wrapper_counts_its_collective_once():
    text = """HloModule m

%wrapped_all_gather (p: f32[8]) -> f32[64] {
  %p = f32[8]{0} parameter(0)
  ROOT %ag = f32[64]{0} all-gather(%p), dimensions={0}
}

ENTRY %main (x: f32[8]) -> f32[64] {
  %x = f32[8]{0} parameter(0)
  %start = ((f32[8]{0}), f32[64]{0}, u32[]) async-start(%x), calls=%wrapped_all_gather
  %update = ((f32[8]{0}), f32[64]{0}, u32[]) async-update(%start), calls=%wrapped_all_gather
  ROOT %done = f32[64]{0} async-done(%update), calls=%wrapped_all_gather
}
"""
    assert hlo.collective_bytes(text) == ({"all-gather": 64 * 4}, True)
