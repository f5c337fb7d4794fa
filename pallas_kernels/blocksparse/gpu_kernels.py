"""Pallas Mosaic GPU kernels for block-sparse attention (Hopper: wgmma, TMA, warp specialization).

Each CTA runs three warpgroups: two compute warpgroups (64 query or key rows each) and one that only
issues TMA copies, as in JAX's attention_mgpu. Lists of blocks to visit come from `gpu.fwd_plan` /
`gpu.bwd_plan`; `gpu.py` holds the plans, padding and the custom VJP, and describes the tiling.

Under an interpreter (`interpret` set) the kernels run in Pallas' GPU interpreter on CPU. It reads wgmma
operands only from SMEM and has neither `run_state` nor TMA reduction, so there the register operands
of P @ V, dS @ Q, P^T @ dO and dS @ K go through SMEM, and dq partials go to a side buffer summed
outside; lists, masks, barriers and pipelining are the same code either way.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BLOCK = 64  # rows per warpgroup tile; the layout block must be the same
COMPUTE_WGS = 2
STEP_KEYS = 2 * BLOCK  # keys per forward step: two gathered layout blocks
FWD_SLOTS = 2  # K/V tiles in flight (2 x 64 KiB at head_dim 128)
# (q, do, lse, delta) tiles in flight in the dk/dv kernel. Even, so each slot always serves the same
# warpgroup (a barrier's phase is tracked per thread, and a warpgroup that skipped phases would read a
# stale parity). Four give each warpgroup its next tile while it computes on the current one; with
# fused dq the two fp32 dq staging tiles leave SMEM for two only.
BWD_SLOTS = {False: 4, True: 2}  # by fuse_dq
_LOG2E = math.log2(math.e)
_MASKED = -1e30  # finite, so a row whose first tiles are all masked never computes inf - inf


# ---- kernel helpers ------------------------------------------------------------------------------


def _smem_tile(shape, dtype):
    """SMEM tile laid out for wgmma and TMA: (8, 64)-element tiles with a 128-byte swizzle."""
    elems = 128 // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(128)))


def _mm_acc(acc, lhs, rhs_smem, lhs_smem=None):
    """acc + lhs @ rhs, lhs in registers.

    On hardware wgmma reads lhs from registers and accumulates in place (`run_state`). The interpreter
    only takes SMEM operands, so with `lhs_smem` given lhs is stored there first and the product added.
    """
    if lhs_smem is None:
        return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, lhs, rhs_smem))(plgpu.ACC.init(acc))
    lhs_smem[...] = lhs
    plgpu.commit_smem()
    return acc + _mm(lhs_smem, rhs_smem, acc.shape)


def _mm(lhs_smem, rhs_smem, shape, between=None):
    """lhs @ rhs from SMEM into a fresh fp32 accumulator; `between` runs while the wgmma is in flight."""

    def body(acc_ref):
        plgpu.wgmma(acc_ref, lhs_smem, rhs_smem)
        if between is not None:
            between()
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _rows(x, shape):
    return lax.broadcast_in_dim(x, shape, [0])


def _cols(x, shape):
    return lax.broadcast_in_dim(x, shape, [1])


def _iota(shape, dim):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _kernel_kwargs(interpret):
    if not interpret:
        return {}
    params = interpret if isinstance(interpret, plgpu.InterpretGPUParams) else plgpu.InterpretGPUParams()
    return {"interpret": params}


def _edge_keep(meta_ref, h, c, s, wg, row0, shape):
    """Token mask of step s for warpgroup wg: its query block sees the key block, and key <= query."""
    m0 = meta_ref[h, c, 2 * s]
    m1 = meta_ref[h, c, 2 * s + 1]
    col = _iota(shape, 1)
    first = col < BLOCK
    k_pos = jnp.where(first, (m0 // 4) * BLOCK + col, (m1 // 4) * BLOCK + (col - BLOCK))
    sees = jnp.where(first, lax.shift_right_logical(m0, wg), lax.shift_right_logical(m1, wg))
    return ((sees & 1) == 1) & (k_pos <= row0 + _iota(shape, 0))


def _fetch_kv_pairs(meta_ref, h, c, n_steps, b, g, k_ref, v_ref, seg_ref, k_smem, v_smem, segk_smem,
                    k_bar, v_bar, k_free, v_free):
    """Memory warpgroup of the query-tile kernels: gathers each step's two key blocks into one tile."""

    @pl.loop(0, n_steps)
    def _fetch(s):
        slot = lax.rem(s, FWD_SLOTS)
        kbs = [meta_ref[h, c, 2 * s + i] // 4 for i in range(2)]
        for src, dst, bar, free, with_seg in ((k_ref, k_smem, k_bar, k_free, seg_ref is not None),
                                              (v_ref, v_smem, v_bar, v_free, False)):
            @pl.when(s >= FWD_SLOTS)
            def _():
                plgpu.barrier_wait(free.at[slot])

            for i, kb in enumerate(kbs):
                rows, half = pl.ds(kb * BLOCK, BLOCK), pl.ds(i * BLOCK, BLOCK)
                plgpu.copy_gmem_to_smem(src.at[b, rows, g], dst.at[slot, half], bar.at[slot])
                if with_seg:
                    plgpu.copy_gmem_to_smem(seg_ref.at[b, rows], segk_smem.at[slot, half], bar.at[slot])

    _drain(n_steps, FWD_SLOTS, k_free, v_free)


def _drain(n, slots, *free_bars):
    """Waits for the consumers to release the last `slots` steps' buffers before the CTA ends.

    Nothing is fetched after them, but every thread that waits on a barrier must observe all its phases:
    jax 0.11's GPU interpreter checks this when it deallocates the barrier.
    """

    @pl.loop(jnp.maximum(n - slots, 0), n)
    def _(s):
        for bar in free_bars:
            plgpu.barrier_wait(bar.at[lax.rem(s, slots)])


# ---- forward -------------------------------------------------------------------------------------


def forward(q_BTNH, k_BTKH, v_BTKH, seg_BT, plan, *, sm_scale: float, interpret):
    """Padded inputs (T a multiple of 128) and `gpu.fwd_plan` -> (out_BTNH, lse_BNT in log2 units)."""
    batch, seq, heads, dim = q_BTNH.shape
    kv_heads = k_BTKH.shape[2]
    group = heads // kv_heads
    dtype = q_BTNH.dtype
    nb = seq // BLOCK
    tiles = nb // 2
    meta_HCW, steps_HC2 = (jnp.asarray(x) for x in plan)
    has_seg = seg_BT is not None
    staged = bool(interpret)
    scale2 = float(sm_scale) * _LOG2E
    shape_s = (BLOCK, STEP_KEYS)
    shape_o = (BLOCK, dim)

    def body(*refs):
        q_ref, k_ref, v_ref, meta_ref, steps_ref, *refs = refs
        seg_ref = refs.pop(0) if has_seg else None
        out_ref, lse_ref, smem, bars = refs
        q_smem, k_smem, v_smem, lse_smem, p_smem, segq_smem, segk_smem = smem
        q_bar, k_bar, v_bar, k_free, v_free, sched = bars
        b = lax.axis_index("batch")
        h = lax.axis_index("heads")
        c = (tiles - 1) - lax.axis_index("q_tile")  # late tiles see the most keys: start them first
        wg = lax.axis_index("wg")
        n_full = steps_ref[h, c, 0]
        n_steps = steps_ref[h, c, 1]

        def pingpong():
            # Alternates the two compute warpgroups between tensor-core work and softmax.
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            qo_smem = q_smem.at[wg]
            row0 = (2 * c + wg) * BLOCK
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, BLOCK), h], qo_smem, q_bar.at[wg])
            if has_seg:
                plgpu.copy_gmem_to_smem(seg_ref.at[b, pl.ds(row0, BLOCK)], segq_smem.at[wg], q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            segq = plgpu.load(segq_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1)) if has_seg else None

            def mask_of(s, slot, edge):
                keep = _edge_keep(meta_ref, h, c, s, wg, row0, shape_s) if edge else None
                if has_seg:
                    segk = plgpu.load(segk_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                    same = _rows(segq, shape_s) == _cols(segk, shape_s)
                    keep = same if keep is None else keep & same
                return keep

            def step(s, carry, edge):
                acc, m_i, l_i = carry
                slot = lax.rem(s, FWD_SLOTS)
                plgpu.barrier_wait(k_bar.at[slot])
                s_qk = _mm(qo_smem, k_smem.at[slot].transpose((1, 0)), shape_s, between=pingpong)
                plgpu.barrier_arrive(k_free.at[slot])
                s_qk = s_qk * scale2
                keep = mask_of(s, slot, edge)
                if keep is not None:
                    s_qk = jnp.where(keep, s_qk, _MASKED)
                m_new = jnp.maximum(m_i, s_qk.max(axis=1))
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s_qk - _rows(m_new, shape_s))
                acc = acc * _rows(alpha, shape_o)
                l_i = l_i * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                plgpu.barrier_arrive(sched)  # softmax done: let the other warpgroup issue its wgmma
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_wait(sched)
                acc = _mm_acc(acc, p16, v_smem.at[slot], p_smem.at[wg] if staged else None)
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l_i

            carry = (
                plgpu.layout_cast(jnp.zeros(shape_o, jnp.float32), plgpu.Layout.WGMMA),
                plgpu.layout_cast(jnp.full((BLOCK,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
                plgpu.layout_cast(jnp.zeros((BLOCK,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
            )
            pl.when(wg == 1)(pingpong)  # start the warpgroups half a step apart
            carry = lax.fori_loop(0, n_full, functools.partial(step, edge=False), carry)
            acc, m_i, l_i = lax.fori_loop(n_full, n_steps, functools.partial(step, edge=True), carry)
            pl.when(wg == 0)(pingpong)

            qo_smem[...] = (acc / _rows(l_i, shape_o)).astype(dtype)
            lse_smem.at[wg][...] = m_i + jnp.log2(l_i)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[b, pl.ds(row0, BLOCK), h])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(row0, BLOCK)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WGS)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            _fetch_kv_pairs(meta_ref, h, c, n_steps, b, lax.div(h, jnp.int32(group)), k_ref, v_ref, seg_ref,
                            k_smem, v_smem, segk_smem, k_bar, v_bar, k_free, v_free)

    copies_k = 4 if has_seg else 2
    smem = (
        _smem_tile((COMPUTE_WGS, BLOCK, dim), dtype),
        _smem_tile((FWD_SLOTS, STEP_KEYS, dim), dtype),
        _smem_tile((FWD_SLOTS, STEP_KEYS, dim), dtype),
        plgpu.SMEM((COMPUTE_WGS, BLOCK), jnp.float32),
        _smem_tile((COMPUTE_WGS, BLOCK, STEP_KEYS), dtype) if staged else None,
        plgpu.SMEM((COMPUTE_WGS, BLOCK), jnp.int32) if has_seg else None,
        plgpu.SMEM((FWD_SLOTS, STEP_KEYS), jnp.int32) if has_seg else None,
    )
    bars = (
        plgpu.Barrier(num_arrivals=2 if has_seg else 1, num_barriers=COMPUTE_WGS),
        plgpu.Barrier(num_arrivals=copies_k, num_barriers=FWD_SLOTS),
        plgpu.Barrier(num_arrivals=2, num_barriers=FWD_SLOTS),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=FWD_SLOTS),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=FWD_SLOTS),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),
    )
    out_type = (
        jax.ShapeDtypeStruct(q_BTNH.shape, dtype),
        jax.ShapeDtypeStruct((batch, heads, seq), jnp.float32),
    )
    call = plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=(smem, bars),
        grid=(heads, tiles, batch),
        grid_names=("heads", "q_tile", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **_kernel_kwargs(interpret),
    )
    args = (q_BTNH, k_BTKH, v_BTKH, meta_HCW, steps_HC2) + ((seg_BT,) if has_seg else ())
    return call(*args)


# ---- backward: dk, dv (and dq partials) per key block --------------------------------------------


def dkv(q_BTNH, k_BTKH, v_BTKH, do_BTNH, lse_BNT, delta_BNT, seg_BT, dq_ref, plan,
        *, sm_scale: float, interpret, fuse_dq: bool):
    """(dk, dv, dq or None) from `gpu.bwd_plan`.

    With `fuse_dq`, unscaled fp32 dq partials are reduce-added into the ref `dq_ref` on hardware; under
    the interpreter they are summed from a side buffer and returned.
    """
    batch, seq, heads, dim = q_BTNH.shape
    kv_heads = k_BTKH.shape[2]
    group = heads // kv_heads
    dtype = q_BTNH.dtype
    nb = seq // BLOCK
    meta, counts, order = plan
    width = meta.shape[-1]
    meta_KBW, counts_KB, order_KB = (jnp.asarray(x) for x in (meta, counts, order))
    has_seg = seg_BT is not None
    staged = bool(interpret)
    dq_side = fuse_dq and staged  # the interpreter has no TMA reduction: partials go to a side buffer
    slots = BWD_SLOTS[bool(fuse_dq)]
    scale2 = float(sm_scale) * _LOG2E
    shape_s = (BLOCK, BLOCK)  # [keys, queries]
    shape_o = (BLOCK, dim)

    def body(*refs):
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, meta_ref, counts_ref, order_ref, *refs = refs
        seg_ref = refs.pop(0) if has_seg else None
        if fuse_dq and not dq_side:
            dqacc_ref = refs.pop(0)
        dk_ref, dv_ref, *refs = refs
        if dq_side:
            dqacc_ref = refs.pop(0)
        smem, bars = refs
        k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ds_smem, p_smem, f32_smem, segq_smem, segk_smem = smem
        kv_bar, q_bar, do_bar, free, buf_free, part_ready = bars
        b = lax.axis_index("batch")
        g = lax.axis_index("kv_heads")
        kb = order_ref[g, lax.axis_index("kv_block")]  # longest streams first
        n = counts_ref[g, kb]
        wg = lax.axis_index("wg")

        def entry(i):
            m = meta_ref[g, kb, i]
            return g * group + lax.rem(lax.div(m, 2), 128), lax.div(m, 256)  # (query head, query block)

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            plgpu.barrier_wait(kv_bar)
            segk = plgpu.load(segk_smem, layout=plgpu.Layout.WGMMA.reduce(1)) if has_seg else None

            def step(j, carry, diag):
                dk, dv = carry
                i = wg + 2 * j
                slot = lax.rem(i, slots)
                h, qb = entry(i)
                plgpu.barrier_wait(q_bar.at[slot])
                s_kq = _mm(k_smem, q_smem.at[slot].transpose((1, 0)), shape_s) * scale2
                lse = plgpu.load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                keep = None
                if diag:  # the diagonal block: causal inside it
                    keep = _iota(shape_s, 0) <= _iota(shape_s, 1)
                if has_seg:
                    segq = plgpu.load(segq_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                    same = _rows(segk, shape_s) == _cols(segq, shape_s)
                    keep = same if keep is None else keep & same
                if keep is not None:
                    s_kq = jnp.where(keep, s_kq, -jnp.inf)
                p_kq = jnp.exp2(s_kq - _cols(lse, shape_s))
                plgpu.barrier_wait(do_bar.at[slot])
                dp_kq = _mm(v_smem, do_smem.at[slot].transpose((1, 0)), shape_s)
                dv = _mm_acc(dv, p_kq.astype(dtype), do_smem.at[slot], p_smem.at[wg] if staged else None)
                delta = plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                ds16 = (p_kq * (dp_kq - _cols(delta, shape_s))).astype(dtype)
                dk = _mm_acc(dk, ds16, q_smem.at[slot], ds_smem.at[wg] if staged else None)
                if fuse_dq:
                    if not staged:  # dq needs dS^T as an SMEM operand
                        ds_smem.at[wg][...] = ds16
                        plgpu.commit_smem()
                    dq = _mm(ds_smem.at[wg].transpose((1, 0)), k_smem, shape_o)
                plgpu.barrier_arrive(free.at[slot])
                if fuse_dq:
                    dq_smem = f32_smem.at[wg]
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # previous partial has left SMEM
                    dq_smem[...] = dq
                    plgpu.commit_smem()
                    if dq_side:
                        plgpu.copy_smem_to_gmem(dq_smem, dqacc_ref.at[b, g, kb, i])
                    else:
                        plgpu.copy_smem_to_gmem(dq_smem, dqacc_ref.at[b, pl.ds(qb * BLOCK, BLOCK), h],
                                                reduction_op="add")
                return dk, dv

            zeros = plgpu.layout_cast(jnp.zeros(shape_o, jnp.float32), plgpu.Layout.WGMMA)
            # Entries alternate between the warpgroups; the last `group` entries are diagonal blocks.
            n_plain = jnp.maximum(n - group - wg + 1, 0) // 2
            n_mine = (n - wg + 1) // 2
            carry = lax.fori_loop(0, n_plain, functools.partial(step, diag=False), (zeros, zeros))
            dk, dv = lax.fori_loop(n_plain, n_mine, functools.partial(step, diag=True), carry)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

            # Sum the two warpgroups' partials through one fp32 SMEM tile, dk then dv; warpgroup 0 writes
            # the results over the K and V tiles (warpgroup 1 has finished reading them by then).
            sum_smem = f32_smem.at[0]

            @pl.when(wg == 1)
            def _():
                for part in (dk, dv):
                    plgpu.barrier_wait(buf_free)
                    sum_smem[...] = part
                    plgpu.commit_smem()
                    plgpu.barrier_arrive(part_ready)

            @pl.when(wg == 0)
            def _():
                for part, scale, dst in ((dk, sm_scale, k_smem), (dv, 1.0, v_smem)):
                    plgpu.barrier_arrive(buf_free)
                    plgpu.barrier_wait(part_ready)
                    dst[...] = ((part + sum_smem[...]) * scale).astype(dtype)
                plgpu.commit_smem()
                rows = pl.ds(kb * BLOCK, BLOCK)
                plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[b, rows, g])
                plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[b, rows, g])
                plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WGS)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            rows = pl.ds(kb * BLOCK, BLOCK)
            plgpu.copy_gmem_to_smem(k_ref.at[b, rows, g], k_smem, kv_bar)
            plgpu.copy_gmem_to_smem(v_ref.at[b, rows, g], v_smem, kv_bar)
            if has_seg:
                plgpu.copy_gmem_to_smem(seg_ref.at[b, rows], segk_smem, kv_bar)

            @pl.loop(0, n)
            def _fetch(i):
                slot = lax.rem(i, slots)
                h, qb = entry(i)
                q_rows = pl.ds(qb * BLOCK, BLOCK)

                @pl.when(i >= slots)
                def _():
                    plgpu.barrier_wait(free.at[slot])

                plgpu.copy_gmem_to_smem(q_ref.at[b, q_rows, h], q_smem.at[slot], q_bar.at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[b, h, q_rows], lse_smem.at[slot], q_bar.at[slot])
                if has_seg:
                    plgpu.copy_gmem_to_smem(seg_ref.at[b, q_rows], segq_smem.at[slot], q_bar.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[b, q_rows, h], do_smem.at[slot], do_bar.at[slot])
                plgpu.copy_gmem_to_smem(delta_ref.at[b, h, q_rows], delta_smem.at[slot], do_bar.at[slot])

            _drain(n, slots, free)

    smem = (
        _smem_tile((BLOCK, dim), dtype),
        _smem_tile((BLOCK, dim), dtype),
        _smem_tile((slots, BLOCK, dim), dtype),
        _smem_tile((slots, BLOCK, dim), dtype),
        plgpu.SMEM((slots, BLOCK), jnp.float32),
        plgpu.SMEM((slots, BLOCK), jnp.float32),
        _smem_tile((COMPUTE_WGS, BLOCK, BLOCK), dtype) if (fuse_dq or staged) else None,
        _smem_tile((COMPUTE_WGS, BLOCK, BLOCK), dtype) if staged else None,
        _smem_tile((COMPUTE_WGS if fuse_dq else 1, BLOCK, dim), jnp.float32),  # dq staging / partial sums
        plgpu.SMEM((slots, BLOCK), jnp.int32) if has_seg else None,
        plgpu.SMEM((BLOCK,), jnp.int32) if has_seg else None,
    )
    bars = (
        plgpu.Barrier(num_arrivals=3 if has_seg else 2),
        plgpu.Barrier(num_arrivals=3 if has_seg else 2, num_barriers=slots),
        plgpu.Barrier(num_arrivals=2, num_barriers=slots),
        plgpu.Barrier(num_arrivals=1, num_barriers=slots),
        plgpu.Barrier(num_arrivals=1),
        plgpu.Barrier(num_arrivals=1),
    )
    out_type = [jax.ShapeDtypeStruct(k_BTKH.shape, dtype), jax.ShapeDtypeStruct(v_BTKH.shape, dtype)]
    if dq_side:
        out_type.append(jax.ShapeDtypeStruct((batch, kv_heads, nb, width, BLOCK, dim), jnp.float32))
    call = plgpu.kernel(
        body,
        out_type=tuple(out_type),
        scratch_types=(smem, bars),
        grid=(kv_heads, nb, batch),
        grid_names=("kv_heads", "kv_block", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **_kernel_kwargs(interpret),
    )
    args = [q_BTNH, k_BTKH, v_BTKH, do_BTNH, lse_BNT, delta_BNT, meta_KBW, counts_KB, order_KB]
    if has_seg:
        args.append(seg_BT)
    if fuse_dq and not dq_side:
        args.append(dq_ref)
    outs = call(*args)
    if not dq_side:
        return outs[0], outs[1], None
    # Sum the side buffer where the hardware would have reduce-added: rows of (query head, query block).
    dk, dv, parts = outs
    valid = np.arange(width)[None, None, :] < counts[..., None]
    head = (meta // 2) % 128 + np.arange(kv_heads)[:, None, None] * group
    qb = meta // 256
    kk, bb, ww = np.nonzero(valid)
    dq_BQNBD = jnp.zeros((batch, nb, heads, BLOCK, dim), jnp.float32)
    dq_BQNBD = dq_BQNBD.at[:, qb[kk, bb, ww], head[kk, bb, ww]].add(parts[:, kk, bb, ww])
    return dk, dv, dq_BQNBD.transpose(0, 1, 3, 2, 4).reshape(batch, seq, heads, dim)


# ---- backward: dq per query tile (used when dq is not fused into the dk/dv kernel) ----------------


def dq(q_BTNH, k_BTKH, v_BTKH, do_BTNH, lse_BNT, delta_BNT, seg_BT, plan, *, sm_scale: float, interpret):
    """dq (scaled, input dtype) from `gpu.fwd_plan`, recomputing scores per query tile."""
    batch, seq, heads, dim = q_BTNH.shape
    group = heads // k_BTKH.shape[2]
    dtype = q_BTNH.dtype
    nb = seq // BLOCK
    tiles = nb // 2
    meta_HCW, steps_HC2 = (jnp.asarray(x) for x in plan)
    has_seg = seg_BT is not None
    staged = bool(interpret)
    scale2 = float(sm_scale) * _LOG2E
    shape_s = (BLOCK, STEP_KEYS)
    shape_o = (BLOCK, dim)

    def body(*refs):
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, meta_ref, steps_ref, *refs = refs
        seg_ref = refs.pop(0) if has_seg else None
        dq_ref, smem, bars = refs
        q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, ds_smem, segq_smem, segk_smem = smem
        q_bar, k_bar, v_bar, k_free, v_free = bars
        b = lax.axis_index("batch")
        h = lax.axis_index("heads")
        c = (tiles - 1) - lax.axis_index("q_tile")
        wg = lax.axis_index("wg")
        n_full = steps_ref[h, c, 0]
        n_steps = steps_ref[h, c, 1]

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            row0 = (2 * c + wg) * BLOCK
            rows = pl.ds(row0, BLOCK)
            plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[wg], q_bar.at[wg])
            plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem.at[wg], q_bar.at[wg])
            plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[wg], q_bar.at[wg])
            plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem.at[wg], q_bar.at[wg])
            if has_seg:
                plgpu.copy_gmem_to_smem(seg_ref.at[b, rows], segq_smem.at[wg], q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            lse = plgpu.load(lse_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
            delta = plgpu.load(delta_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
            segq = plgpu.load(segq_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1)) if has_seg else None

            def step(s, dq, edge):
                slot = lax.rem(s, FWD_SLOTS)
                plgpu.barrier_wait(k_bar.at[slot])
                s_qk = _mm(q_smem.at[wg], k_smem.at[slot].transpose((1, 0)), shape_s) * scale2
                keep = _edge_keep(meta_ref, h, c, s, wg, row0, shape_s) if edge else None
                if has_seg:
                    segk = plgpu.load(segk_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                    same = _rows(segq, shape_s) == _cols(segk, shape_s)
                    keep = same if keep is None else keep & same
                if keep is not None:
                    s_qk = jnp.where(keep, s_qk, -jnp.inf)
                p = jnp.exp2(s_qk - _rows(lse, shape_s))
                plgpu.barrier_wait(v_bar.at[slot])
                dp = _mm(do_smem.at[wg], v_smem.at[slot].transpose((1, 0)), shape_s)
                plgpu.barrier_arrive(v_free.at[slot])
                ds16 = (p * (dp - _rows(delta, shape_s))).astype(dtype)
                dq = _mm_acc(dq, ds16, k_smem.at[slot], ds_smem.at[wg] if staged else None)
                plgpu.barrier_arrive(k_free.at[slot])
                return dq

            dq = plgpu.layout_cast(jnp.zeros(shape_o, jnp.float32), plgpu.Layout.WGMMA)
            dq = lax.fori_loop(0, n_full, functools.partial(step, edge=False), dq)
            dq = lax.fori_loop(n_full, n_steps, functools.partial(step, edge=True), dq)
            q_smem.at[wg][...] = (dq * sm_scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[b, rows, h])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WGS)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            _fetch_kv_pairs(meta_ref, h, c, n_steps, b, lax.div(h, jnp.int32(group)), k_ref, v_ref, seg_ref,
                            k_smem, v_smem, segk_smem, k_bar, v_bar, k_free, v_free)

    smem = (
        _smem_tile((COMPUTE_WGS, BLOCK, dim), dtype),
        _smem_tile((COMPUTE_WGS, BLOCK, dim), dtype),
        plgpu.SMEM((COMPUTE_WGS, BLOCK), jnp.float32),
        plgpu.SMEM((COMPUTE_WGS, BLOCK), jnp.float32),
        _smem_tile((FWD_SLOTS, STEP_KEYS, dim), dtype),
        _smem_tile((FWD_SLOTS, STEP_KEYS, dim), dtype),
        _smem_tile((COMPUTE_WGS, BLOCK, STEP_KEYS), dtype) if staged else None,
        plgpu.SMEM((COMPUTE_WGS, BLOCK), jnp.int32) if has_seg else None,
        plgpu.SMEM((FWD_SLOTS, STEP_KEYS), jnp.int32) if has_seg else None,
    )
    bars = (
        plgpu.Barrier(num_arrivals=5 if has_seg else 4, num_barriers=COMPUTE_WGS),
        plgpu.Barrier(num_arrivals=4 if has_seg else 2, num_barriers=FWD_SLOTS),
        plgpu.Barrier(num_arrivals=2, num_barriers=FWD_SLOTS),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=FWD_SLOTS),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=FWD_SLOTS),
    )
    call = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(q_BTNH.shape, dtype),
        scratch_types=(smem, bars),
        grid=(heads, tiles, batch),
        grid_names=("heads", "q_tile", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **_kernel_kwargs(interpret),
    )
    args = (q_BTNH, k_BTKH, v_BTKH, do_BTNH, lse_BNT, delta_BNT, meta_HCW, steps_HC2) + ((seg_BT,) if has_seg else ())
    return call(*args)
