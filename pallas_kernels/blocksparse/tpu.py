"""Pallas Mosaic TPU block-sparse attention: forward, dq and dk/dv calls wired with custom_vjp.

Each call's grid is (batch, heads, schedule step): the step axis walks a flat, scalar-prefetched list of
the non-empty (query tile, key tile) pairs of the head's pattern (schedule.py), so masked tiles cost
neither a grid step nor a DMA. Tensors enter head-major ([batch, heads, seq, head_dim]) so a tile is a 2-D
(seq, head_dim) block; the sequence is padded to the tiles (padded keys are only seen by padded queries).
A schedule too long for SMEM is split into several calls that write disjoint rows of one aliased output.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.blocksparse import schedule
from pallas_kernels.blocksparse.layout import Layout
from pallas_kernels.blocksparse.reference import check_inputs
from pallas_kernels.blocksparse.tpu_kernels import Config, default_tiles, dkv_kernel, dq_kernel, fwd_kernel


def _unpack(sched_ref, select_ref, row_index, step, width):
    return schedule.decode(sched_ref[select_ref[row_index] * width + step])


def _q_major_specs(cfg: Config, width: int, head_dim: int):
    """BlockSpecs following a q-major schedule: (q-side, kv-side, per-query rows, seg column, seg row)."""
    bq, bk, G = cfg.block_q, cfg.block_k, cfg.group

    def q_map(b, h, t, sched, pat):
        return b, h, _unpack(sched, pat, h, t, width)[0], 0

    def kv_map(b, h, t, sched, pat):
        return b, lax.div(h, G), _unpack(sched, pat, h, t, width)[1], 0

    def row_map(b, h, t, sched, pat):
        return b, h, 0, _unpack(sched, pat, h, t, width)[0]

    def seg_q_map(b, h, t, sched, pat):
        return b, _unpack(sched, pat, h, t, width)[0], 0

    def seg_k_map(b, h, t, sched, pat):
        return b, 0, _unpack(sched, pat, h, t, width)[1]

    return (pl.BlockSpec((None, None, bq, head_dim), q_map), pl.BlockSpec((None, None, bk, head_dim), kv_map),
            pl.BlockSpec((None, None, 1, bq), row_map), pl.BlockSpec((None, bq, 1), seg_q_map),
            pl.BlockSpec((None, 1, bk), seg_k_map))


def _k_major_specs(cfg: Config, width: int, head_dim: int):
    """BlockSpecs following a k-major schedule (grid axis 1 is the kv head, entries carry the query head)."""
    bq, bk, G = cfg.block_q, cfg.block_k, cfg.group

    def q_map(b, kh, t, sched, sets):
        q_tile, _, _, _, _, g = _unpack(sched, sets, kh, t, width)
        return b, kh * G + g, q_tile, 0

    def kv_map(b, kh, t, sched, sets):
        return b, kh, _unpack(sched, sets, kh, t, width)[1], 0

    def row_map(b, kh, t, sched, sets):
        q_tile, _, _, _, _, g = _unpack(sched, sets, kh, t, width)
        return b, kh * G + g, 0, q_tile

    def seg_q_map(b, kh, t, sched, sets):
        return b, 0, _unpack(sched, sets, kh, t, width)[0]

    def seg_k_map(b, kh, t, sched, sets):
        return b, _unpack(sched, sets, kh, t, width)[1], 0

    return (pl.BlockSpec((None, None, bq, head_dim), q_map), pl.BlockSpec((None, None, bk, head_dim), kv_map),
            pl.BlockSpec((None, None, 1, bq), row_map), pl.BlockSpec((None, 1, bq), seg_q_map),
            pl.BlockSpec((None, bk, 1), seg_k_map))


def _without_aliases(kernel, skip_from: int, count: int):
    """Drops the refs of aliased previous outputs: each call only writes its own rows."""
    if not count:
        return kernel
    return lambda *refs: kernel(*refs[:skip_from], *refs[skip_from + count:])


def _chunked_call(kernel, name, cfg: Config, chunks, select, grid_head, specs_fn, args, out_fn,
                  scratch_shapes):
    """Runs `kernel` once per schedule chunk, chaining outputs through input_output_aliases.

    specs_fn(width) -> (in_specs, out_specs); out_fn() -> out_shape list; args are the tensor inputs.
    """
    outs = None
    batch = args[0].shape[0]
    for sched_PT in chunks:
        width = sched_PT.shape[1]
        in_specs, out_specs = specs_fn(width)
        extra, aliases = [], {}
        if outs is not None:
            extra = list(outs)
            first = 2 + len(args)  # operand index, counting the two scalar-prefetch operands
            aliases = {first + i: i for i in range(len(outs))}
            in_specs = in_specs + [pl.BlockSpec(memory_space=pl.ANY)] * len(outs)
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(batch, grid_head, width), in_specs=in_specs, out_specs=out_specs,
            scratch_shapes=scratch_shapes)
        outs = pl.pallas_call(
            _without_aliases(functools.partial(kernel, cfg=cfg, width=width), 2 + len(args), len(extra)),
            grid_spec=grid_spec, out_shape=out_fn(), input_output_aliases=aliases,
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=cfg.interpret, name=name,
        )(jnp.asarray(sched_PT.reshape(-1)), jnp.asarray(select), *args, *extra)
    return outs


def _segment_views(segment_ids_BS):
    """Segment ids as a column [B, S, 1] and a row [B, 1, S]: kernels compare one against the other."""
    if segment_ids_BS is None:
        return None
    return segment_ids_BS[:, :, None], segment_ids_BS[:, None, :]


def _forward(q_BNSD, k_BKSD, v_BKSD, segment_ids_BS, cfg: Config):
    batch, heads, seq, head_dim = q_BNSD.shape
    sched_PT, pattern_N = schedule.q_major(cfg.layout, seq, cfg.block_q, cfg.block_k)
    segs = _segment_views(segment_ids_BS)

    def specs(width):
        q_spec, kv_spec, row_spec, seg_q_spec, seg_k_spec = _q_major_specs(cfg, width, head_dim)
        return [q_spec, kv_spec, kv_spec] + ([seg_q_spec, seg_k_spec] if segs else []), [q_spec, row_spec]

    def out_shapes():
        return [jax.ShapeDtypeStruct(q_BNSD.shape, q_BNSD.dtype),
                jax.ShapeDtypeStruct((batch, heads, 1, seq), jnp.float32)]

    scratch = [pltpu.VMEM((cfg.block_q, 1), jnp.float32), pltpu.VMEM((cfg.block_q, 1), jnp.float32),
               pltpu.VMEM((cfg.block_q, head_dim), jnp.float32)]
    args = (q_BNSD, k_BKSD, v_BKSD) + (segs or ())
    return _chunked_call(fwd_kernel, "blocksparse_fwd", cfg, schedule.split_rows(sched_PT, "q"), pattern_N,
                         heads, specs, args, out_shapes, scratch)


def _backward_dq(q_BNSD, k_BKSD, v_BKSD, do_BNSD, lse_BN1S, di_BN1S, segment_ids_BS, cfg: Config):
    heads, head_dim = q_BNSD.shape[1], q_BNSD.shape[3]
    sched_PT, pattern_N = schedule.q_major(cfg.layout, q_BNSD.shape[2], cfg.block_q, cfg.block_k)
    segs = _segment_views(segment_ids_BS)

    def specs(width):
        q_spec, kv_spec, row_spec, seg_q_spec, seg_k_spec = _q_major_specs(cfg, width, head_dim)
        ins = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
        return ins + ([seg_q_spec, seg_k_spec] if segs else []), [q_spec]

    args = (q_BNSD, k_BKSD, v_BKSD, do_BNSD, lse_BN1S, di_BN1S) + (segs or ())
    (dq_BNSD,) = _chunked_call(
        dq_kernel, "blocksparse_dq", cfg, schedule.split_rows(sched_PT, "q"), pattern_N, heads, specs, args,
        lambda: [jax.ShapeDtypeStruct(q_BNSD.shape, q_BNSD.dtype)],
        [pltpu.VMEM((cfg.block_q, head_dim), jnp.float32)])
    return dq_BNSD


def _backward_dkv(q_BNSD, k_BKSD, v_BKSD, do_BNSD, lse_BN1S, di_BN1S, segment_ids_BS, cfg: Config):
    kv_heads, seq, head_dim = k_BKSD.shape[1:]
    sched_ST, set_K = schedule.k_major(cfg.layout, seq, cfg.block_q, cfg.block_k, kv_heads)
    segs = _segment_views(segment_ids_BS)

    def specs(width):
        q_spec, kv_spec, row_spec, seg_q_spec, seg_k_spec = _k_major_specs(cfg, width, head_dim)
        ins = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
        return ins + ([seg_q_spec, seg_k_spec] if segs else []), [kv_spec, kv_spec]

    seg_args = (segs[1], segs[0]) if segs else ()  # row view for queries, column view for keys
    args = (q_BNSD, k_BKSD, v_BKSD, do_BNSD, lse_BN1S, di_BN1S) + seg_args
    return _chunked_call(
        dkv_kernel, "blocksparse_dkv", cfg, schedule.split_rows(sched_ST, "k"), set_K, kv_heads, specs, args,
        lambda: [jax.ShapeDtypeStruct(k_BKSD.shape, k_BKSD.dtype),
                 jax.ShapeDtypeStruct(v_BKSD.shape, v_BKSD.dtype)],
        [pltpu.VMEM((cfg.block_k, head_dim), jnp.float32), pltpu.VMEM((cfg.block_k, head_dim), jnp.float32)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q_BNSD, k_BKSD, v_BKSD, segment_ids_BS, cfg: Config):
    return _forward(q_BNSD, k_BKSD, v_BKSD, segment_ids_BS, cfg)[0]


def _attention_fwd(q_BNSD, k_BKSD, v_BKSD, segment_ids_BS, cfg: Config):
    o_BNSD, lse_BN1S = _forward(q_BNSD, k_BKSD, v_BKSD, segment_ids_BS, cfg)
    return o_BNSD, (q_BNSD, k_BKSD, v_BKSD, segment_ids_BS, o_BNSD, lse_BN1S)


def _attention_bwd(cfg: Config, residuals, do_BNSD):
    q_BNSD, k_BKSD, v_BKSD, segment_ids_BS, o_BNSD, lse_BN1S = residuals
    di_BN1S = jnp.sum(do_BNSD.astype(jnp.float32) * o_BNSD.astype(jnp.float32), axis=-1)[:, :, None, :]
    args = (q_BNSD, k_BKSD, v_BKSD, do_BNSD, lse_BN1S, di_BN1S, segment_ids_BS, cfg)
    dk_BKSD, dv_BKSD = _backward_dkv(*args)
    return _backward_dq(*args), dk_BKSD, dv_BKSD, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def blocksparse_attention(q_BTNH, k_BSKH, v_BSKH, *, layout: Layout, sm_scale=None, segment_ids=None,
                          interpret=False, block_q: int | None = None, block_k: int | None = None):
    """TPU kernel behind `pallas_kernels.blocksparse.blocksparse_attention(backend="tpu")`.

    interpret: False (compile for TPU), True (run on any backend, e.g. CPU tests) or a
    `pltpu.InterpretParams` for the TPU-faithful interpreter. block_q / block_k: kernel tiles, each a
    multiple or divisor of layout.block_size (on a real TPU also a multiple of 128 unless it covers the
    whole padded sequence); defaults in `default_tiles`.
    """
    check_inputs(q_BTNH, k_BSKH, v_BSKH, layout, segment_ids)
    batch, seq, q_heads, head_dim = q_BTNH.shape
    block_q, block_k = default_tiles(layout, seq, block_q, block_k)
    tile = block_q * block_k // math.gcd(block_q, block_k)
    padded = -(-seq // tile) * tile
    if not interpret:
        for name, size in (("block_q", block_q), ("block_k", block_k)):
            if size % 128 and size != padded:  # both tiles are a lane dimension in some kernel
                raise ValueError(f"{name}={size} must be a multiple of 128 on TPU (or cover the padded "
                                 f"sequence, {padded})")
    cfg = Config(layout=layout, block_q=block_q, block_k=block_k, group=q_heads // k_BSKH.shape[2],
                 sm_scale=float(1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale),
                 has_segments=segment_ids is not None, interpret=interpret)

    def to_kernel(x_BSNH):
        x_BNSH = jnp.swapaxes(x_BSNH, 1, 2)
        return jnp.pad(x_BNSH, ((0, 0), (0, 0), (0, padded - seq), (0, 0)))

    seg_BS = None
    if segment_ids is not None:
        # Padding gets a segment of its own so padded tokens never meet real ones.
        seg_BS = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, padded - seq)),
                         constant_values=jnp.iinfo(jnp.int32).min)
    o_BNSH = _attention(to_kernel(q_BTNH), to_kernel(k_BSKH), to_kernel(v_BSKH), seg_BS, cfg)
    return jnp.swapaxes(o_BNSH[:, :, :seq], 1, 2)
