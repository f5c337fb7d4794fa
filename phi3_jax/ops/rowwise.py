"""Row-wise kernels of the train step that read each input once: Pallas Triton kernels for GPUs.

- `row_logsumexp(logits_BTV)` = logsumexp(logits.astype(float32), axis=-1) for finite logits: each row
  walked in `block`-wide slices with a running max and sum of exp(x - max) (one exp per logit). XLA's
  forms of the same reduction either read the logits twice (max, then sum of exp) or run its variadic
  (max, sum) reduce well below the memory bandwidth (bench/RESULTS.md, the H100 account of the step).
- `row_xent_grad(logits_BTV, targets_BT, scale_BT)` = (that logsumexp, (softmax - onehot(target)) * scale
  in the logits' dtype): the cross-entropy's logits gradient from the same program, which walks its row a
  second time (from L2 when it is still there) instead of a separate pass over the logits.
- `rms_norm(x_BTD, scale_D, eps)` = (HF Phi3RMSNorm of x, the float32 inverse norm [B, T, 1]): the row
  loaded once, where XLA reads it twice (the sum of squares, then the scaling).
- `add_rms_norm(x_BTD, a_BTD, scale_D, eps)` = (h = x + a, then rms_norm of h): a residual add and the
  norm after it, where XLA copies the residual so that the matmul producing `a` can add it in place, then
  reads h twice for the norm.
- `rms_norm_backward(x_BTD, r_BT1, scale_D, dy_BTD[, dres_BTD])` = (dx with a residual cotangent added, the
  programs' shares of d scale) of the norm: each row loaded once, where XLA reads x and d y twice (the
  rows' dot product, then dx and d scale). A program walks several rows.
- `swiglu_backward(z_BTF, dh_BTI)` = d [gate | up] of silu(gate) * up: each slice of a row reads gate, up
  and d out once and writes both halves of the gradient. XLA's elementwise forms either read every input
  once per output half or write the halves one after the other.

One program per row (a `vmap` of the kernel; the norm's backward: a few rows a program). `interpret`
(default: off a GPU) runs them in Pallas' interpreter, on any backend. None has a gradient: they are the
insides of hand-written backward passes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_LOW = float(jnp.finfo(jnp.float32).min)  # finite, so exp(m - m_new) never sees inf - inf


def _triton():
    from jax.experimental.pallas import triton as plt

    return plt


def _interpret(interpret: bool | None) -> bool:
    return jax.default_backend() != "gpu" if interpret is None else interpret


def _check_block(block: int) -> None:
    if block < 1 or block & (block - 1):
        raise ValueError(f"block={block} must be a power of 2")


def _row_lse(x_ref, block: int):
    """The float32 logsumexp of the row in x_ref, for one program."""
    plt = _triton()
    V = x_ref.shape[-1]

    def body(i, carry):
        m, s = carry
        idx_K = i * block + jnp.arange(block)
        mask_K = idx_K < V
        x_K = jnp.where(mask_K, plt.load(x_ref.at[idx_K], mask=mask_K, other=0).astype(jnp.float32), _LOW)
        m_new = jnp.maximum(m, jnp.max(x_K))
        e_K = jnp.where(mask_K, jnp.exp(x_K - m_new), 0.0)
        return m_new, s * jnp.exp(m - m_new) + jnp.sum(e_K)

    m, s = jax.lax.fori_loop(0, pl.cdiv(V, block), body, (jnp.float32(_LOW), jnp.float32(0.0)))
    return m + jnp.log(s)


def _logsumexp_kernel(x_ref, o_ref, *, block: int):
    o_ref[...] = _row_lse(x_ref, block)


def _params(num_warps: int):
    return _triton().CompilerParams(num_warps=num_warps)


@functools.partial(jax.jit, static_argnames=("block", "num_warps", "interpret"))
def row_logsumexp(logits_BTV, *, block: int = 4096, num_warps: int = 8, interpret: bool | None = None):
    """float32 [B, T] logsumexp over the last axis of float logits [B, T, V] (read in their own dtype)."""
    _check_block(block)
    B, T, V = logits_BTV.shape
    call = pl.pallas_call(functools.partial(_logsumexp_kernel, block=min(block, pl.next_power_of_2(V))),
                          out_shape=jax.ShapeDtypeStruct((), jnp.float32), grid=(),
                          compiler_params=_params(num_warps), interpret=_interpret(interpret), name="row_logsumexp")
    return jax.vmap(call)(logits_BTV.reshape(B * T, V)).reshape(B, T)


def _xent_grad_kernel(x_ref, t_ref, c_ref, lse_ref, d_ref, *, block: int):
    plt = _triton()
    V = x_ref.shape[-1]
    lse = _row_lse(x_ref, block)
    lse_ref[...] = lse
    target, scale = t_ref[...], c_ref[...]

    def body(i, carry):
        idx_K = i * block + jnp.arange(block)
        mask_K = idx_K < V
        p_K = jnp.exp(plt.load(x_ref.at[idx_K], mask=mask_K, other=0).astype(jnp.float32) - lse)
        d_K = (p_K - jnp.where(idx_K == target, 1.0, 0.0)) * scale
        plt.store(d_ref.at[idx_K], d_K.astype(d_ref.dtype), mask=mask_K)
        return carry

    jax.lax.fori_loop(0, pl.cdiv(V, block), body, 0)


@functools.partial(jax.jit, static_argnames=("block", "num_warps", "interpret"))
def row_xent_grad(logits_BTV, targets_BT, scale_BT, *, block: int = 4096, num_warps: int = 8,
                  interpret: bool | None = None):
    """(float32 [B, T] logsumexp of the logits rows, [B, T, V] (softmax - onehot(targets)) * scale in the
    logits' dtype, computed in float32) for float logits [B, T, V], int targets and float32 scales [B, T]."""
    _check_block(block)
    B, T, V = logits_BTV.shape
    call = pl.pallas_call(functools.partial(_xent_grad_kernel, block=min(block, pl.next_power_of_2(V))),
                          out_shape=(jax.ShapeDtypeStruct((), jnp.float32),
                                     jax.ShapeDtypeStruct((V,), logits_BTV.dtype)),
                          grid=(), compiler_params=_params(num_warps), interpret=_interpret(interpret),
                          name="row_xent_grad")
    lse_R, d_RV = jax.vmap(call)(logits_BTV.reshape(B * T, V), targets_BT.reshape(B * T).astype(jnp.int32),
                                 scale_BT.reshape(B * T).astype(jnp.float32))
    return lse_R.reshape(B, T), d_RV.reshape(B, T, V)


def _store_rms_norm(x_K, idx_K, mask_K, s_ref, y_ref, r_ref, eps: float):
    """Writes the norm of one row (float32 x_K, zero past the row's D entries) and its inverse norm."""
    plt = _triton()
    D = y_ref.shape[-1]
    r = jax.lax.rsqrt(jnp.sum(x_K * x_K) / D + eps)
    s_K = plt.load(s_ref.at[idx_K], mask=mask_K, other=0).astype(y_ref.dtype)
    plt.store(y_ref.at[idx_K], (x_K * r).astype(y_ref.dtype) * s_K, mask=mask_K)
    r_ref[...] = r


def _rms_norm_kernel(x_ref, s_ref, y_ref, r_ref, *, block: int, eps: float):
    idx_K = jnp.arange(block)
    mask_K = idx_K < x_ref.shape[-1]
    x_K = _triton().load(x_ref.at[idx_K], mask=mask_K, other=0).astype(jnp.float32)
    _store_rms_norm(x_K, idx_K, mask_K, s_ref, y_ref, r_ref, eps)


def _add_rms_norm_kernel(x_ref, a_ref, s_ref, h_ref, y_ref, r_ref, *, block: int, eps: float):
    plt = _triton()
    idx_K = jnp.arange(block)
    mask_K = idx_K < x_ref.shape[-1]
    h_K = (plt.load(x_ref.at[idx_K], mask=mask_K, other=0).astype(jnp.float32)
           + plt.load(a_ref.at[idx_K], mask=mask_K, other=0).astype(jnp.float32)).astype(h_ref.dtype)
    plt.store(h_ref.at[idx_K], h_K, mask=mask_K)
    _store_rms_norm(h_K.astype(jnp.float32), idx_K, mask_K, s_ref, y_ref, r_ref, eps)


@functools.partial(jax.jit, static_argnames=("eps", "num_warps", "interpret"))
def rms_norm(x_BTD, scale_D, eps: float, *, num_warps: int = 8, interpret: bool | None = None):
    """(y [B, T, D] in x's dtype, the float32 inverse norm [B, T, 1]): x normalised in float32, rounded to
    x's dtype, times the scale in x's dtype (HF Phi3RMSNorm). One program per row, the row in one block."""
    B, T, D = x_BTD.shape
    call = pl.pallas_call(functools.partial(_rms_norm_kernel, block=pl.next_power_of_2(D), eps=float(eps)),
                          out_shape=(jax.ShapeDtypeStruct((D,), x_BTD.dtype), jax.ShapeDtypeStruct((), jnp.float32)),
                          grid=(), compiler_params=_params(num_warps), interpret=_interpret(interpret), name="rms_norm")
    y_RD, r_R = jax.vmap(call, in_axes=(0, None))(x_BTD.reshape(B * T, D), scale_D)
    return y_RD.reshape(B, T, D), r_R.reshape(B, T, 1)


@functools.partial(jax.jit, static_argnames=("eps", "num_warps", "interpret"))
def add_rms_norm(x_BTD, a_BTD, scale_D, eps: float, *, num_warps: int = 8, interpret: bool | None = None):
    """(h = x + a in x's dtype, rms_norm(h, scale, eps)'s two outputs): a residual add and the norm after it,
    each row of x and a loaded once and h written once."""
    B, T, D = x_BTD.shape
    if a_BTD.shape != x_BTD.shape or a_BTD.dtype != x_BTD.dtype:
        raise ValueError(f"add_rms_norm: a {a_BTD.dtype}{a_BTD.shape} is not like x {x_BTD.dtype}{x_BTD.shape}")
    row = jax.ShapeDtypeStruct((D,), x_BTD.dtype)
    call = pl.pallas_call(functools.partial(_add_rms_norm_kernel, block=pl.next_power_of_2(D), eps=float(eps)),
                          out_shape=(row, row, jax.ShapeDtypeStruct((), jnp.float32)), grid=(),
                          compiler_params=_params(num_warps), interpret=_interpret(interpret), name="add_rms_norm")
    h_RD, y_RD, r_R = jax.vmap(call, in_axes=(0, 0, None))(x_BTD.reshape(B * T, D), a_BTD.reshape(B * T, D), scale_D)
    return h_RD.reshape(B, T, D), y_RD.reshape(B, T, D), r_R.reshape(B, T, 1)


def _rms_norm_backward_kernel(x_ref, r_ref, s_ref, dy_ref, *rest, block: int, rows: int, residual: bool):
    plt = _triton()
    dr_ref, dx_ref, ds_ref = rest if residual else (None, *rest)
    N, D = x_ref.shape
    idx_K = jnp.arange(block)
    mask_K = idx_K < D
    s_K = plt.load(s_ref.at[idx_K], mask=mask_K, other=0).astype(dx_ref.dtype).astype(jnp.float32)
    first = pl.program_id(0) * rows

    def body(i, ds_K):
        row = first + i
        m_K = mask_K & (row < N)  # past the last row: zeros in, nothing out
        x_K = plt.load(x_ref.at[row, idx_K], mask=m_K, other=0).astype(jnp.float32)
        dy_K = plt.load(dy_ref.at[row, idx_K], mask=m_K, other=0).astype(jnp.float32)
        r = plt.load(r_ref.at[jnp.minimum(row, N - 1)])
        n_K = x_K * r
        dn_K = dy_K * s_K
        dx_K = (r * (dn_K - n_K * (jnp.sum(dn_K * n_K) / D))).astype(dx_ref.dtype)
        if residual:
            dx_K = (dx_K.astype(jnp.float32)
                    + plt.load(dr_ref.at[row, idx_K], mask=m_K, other=0).astype(jnp.float32)).astype(dx_ref.dtype)
        plt.store(dx_ref.at[row, idx_K], dx_K, mask=m_K)
        return ds_K + dy_K * n_K.astype(dx_ref.dtype).astype(jnp.float32)

    ds_K = jax.lax.fori_loop(0, rows, body, jnp.zeros((block,), jnp.float32))
    plt.store(ds_ref.at[pl.program_id(0), idx_K], ds_K, mask=mask_K)


@functools.partial(jax.jit, static_argnames=("rows", "num_warps", "interpret"))
def rms_norm_backward(x_BTD, r_BT1, scale_D, dy_BTD, dres_BTD=None, *, rows: int = 32, num_warps: int = 8,
                      interpret: bool | None = None):
    """(dx [B, T, D] in x's dtype, float32 [programs, D] whose sum over programs is d scale) of
    y = rms_norm(x) (float32 inverse norm r) for d y, plus `dres_BTD` (the cotangent of a residual stream
    that is x itself) added to dx in x's dtype.

    Each program walks `rows` rows, each loaded once (x, d y, and d res), and writes its rows' share of
    d scale (summed by the caller, also across devices); XLA's form reads x and d y once for the rows' dot
    product and again for dx and d scale."""
    B, T, D = x_BTD.shape
    if rows < 1:
        raise ValueError(f"rows={rows} must be positive")
    for name, a in (("dy", dy_BTD), ("dres", dres_BTD)):
        if a is not None and (a.shape != x_BTD.shape or a.dtype != x_BTD.dtype):
            raise ValueError(f"rms_norm_backward: {name} {a.dtype}{a.shape} is not like x {x_BTD.dtype}{x_BTD.shape}")
    N, residual = B * T, dres_BTD is not None
    G = pl.cdiv(N, rows)
    call = pl.pallas_call(
        functools.partial(_rms_norm_backward_kernel, block=pl.next_power_of_2(D), rows=rows, residual=residual),
        out_shape=(jax.ShapeDtypeStruct((N, D), x_BTD.dtype), jax.ShapeDtypeStruct((G, D), jnp.float32)),
        grid=(G,), compiler_params=_params(num_warps), interpret=_interpret(interpret), name="rms_norm_backward")
    operands = [x_BTD.reshape(N, D), r_BT1.reshape(N).astype(jnp.float32), scale_D, dy_BTD.reshape(N, D)]
    dx_ND, ds_GD = call(*operands, *([dres_BTD.reshape(N, D)] if residual else []))
    return dx_ND.reshape(B, T, D), ds_GD


def _swiglu_backward_kernel(z_ref, dh_ref, o_ref, *, block: int):
    plt = _triton()
    I = dh_ref.shape[-1]

    def body(i, carry):
        idx_K = i * block + jnp.arange(block)
        mask_K = idx_K < I
        g_K = plt.load(z_ref.at[idx_K], mask=mask_K, other=0).astype(jnp.float32)
        u_K = plt.load(z_ref.at[idx_K + I], mask=mask_K, other=0).astype(jnp.float32)
        dh_K = plt.load(dh_ref.at[idx_K], mask=mask_K, other=0).astype(jnp.float32)
        s_K = 1.0 / (1.0 + jnp.exp(-g_K))
        dg_K = dh_K * u_K * s_K * (1.0 + g_K * (1.0 - s_K))  # d silu(g) = s (1 + g (1 - s))
        plt.store(o_ref.at[idx_K], dg_K.astype(o_ref.dtype), mask=mask_K)
        plt.store(o_ref.at[idx_K + I], (dh_K * g_K * s_K).astype(o_ref.dtype), mask=mask_K)
        return carry

    jax.lax.fori_loop(0, pl.cdiv(I, block), body, 0)


@functools.partial(jax.jit, static_argnames=("block", "num_warps", "interpret"))
def swiglu_backward(z_BTF, dh_BTI, *, block: int = 1024, num_warps: int = 4, interpret: bool | None = None):
    """d [gate | up] [B, T, 2I] in z's dtype, from z = [gate | up] [B, T, 2I] and d (silu(gate) * up)
    [B, T, I], computed in float32."""
    _check_block(block)
    B, T, F = z_BTF.shape
    if F % 2 or dh_BTI.shape != (B, T, F // 2):
        raise ValueError(f"swiglu_backward: z {z_BTF.shape} is not [B, T, 2I] for d out {dh_BTI.shape}")
    call = pl.pallas_call(functools.partial(_swiglu_backward_kernel, block=min(block, pl.next_power_of_2(F // 2))),
                          out_shape=jax.ShapeDtypeStruct((F,), z_BTF.dtype), grid=(),
                          compiler_params=_params(num_warps), interpret=_interpret(interpret), name="swiglu_backward")
    return jax.vmap(call)(z_BTF.reshape(B * T, F), dh_BTI.reshape(B * T, F // 2)).reshape(B, T, F)
