"""Building blocks: linear, embedding, norms, RoPE / LongRoPE, and the two MLP kinds.

Numerics follow the reference implementations where they keep float32: norms normalise in float32 and
cast back before the weight multiplies (spec §3.1); RoPE angles are float32 and cos/sin are cast to the
activation dtype.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.custom_derivatives import SymbolicZero

from phi3_jax import sharding as shd
from phi3_jax.model.config import ConfigError, ModelConfig


def dtype_of(name: str):
    return jnp.dtype(name)


def matmul(x_BTK, w_KN):
    """x @ w over x's last axis. On a CPU the rows are flattened first: for a [B, T, K] x [K, N] dot XLA:CPU
    computes the weight gradient from a transposed copy of the output gradient with a slower matmul kernel
    (bench/train_step.py's CPU step: about 10% faster flattened). Elsewhere the dot stays 3-D, which gives
    XLA:TPU fewer temporaries (phi-3-mini on v5p-64: 25.75 against 26.01 GiB flattened)."""
    if jax.default_backend() != "cpu":
        return jnp.dot(x_BTK, w_KN)
    return jnp.dot(x_BTK.reshape(-1, x_BTK.shape[-1]), w_KN).reshape(*x_BTK.shape[:-1], w_KN.shape[-1])


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] (the transpose of a torch weight)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, cfg: ModelConfig, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(cfg.initializer_range)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), dtype_of(cfg.param_dtype)))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype_of(cfg.param_dtype))) if bias else None
        self.dtype = dtype_of(cfg.dtype)

    def __call__(self, x):
        y = matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y

    def split(self, x_BTD, sizes: Sequence[int], shards: int, logical: str, regrouped: bool = False) -> list:
        """`self(x)` cut along its last axis into consecutive pieces of `sizes` ([q | k | v], [gate | up]).

        With `shards` > 1 (the number of devices that split the pieces' activation axis `logical`, dividing
        every piece) the kernel's columns are regrouped first, so that device s's contiguous block of the
        output holds the s-th slice of every piece and the cut stays on the device. Cutting the checkpoint's
        [q | k | v] order instead would move most of each piece between devices, forward (collective
        permutes) and backward (all-to-alls); regrouping moves the kernel, which holds fewer numbers than the
        activations wherever a device has more tokens than the layer has inputs. `regrouped`: the kernel and
        bias hold their columns regrouped already (the decoder regroups every layer's once, before its scan).
        """
        if any(size % shards for size in sizes):
            raise ValueError(f"Linear.split: {shards} shards do not divide every piece of {tuple(sizes)}")
        if shards == 1:
            y_BTF = self(x_BTD)
            offsets = np.cumsum(sizes)[:-1].tolist()
            return [y_BTF[..., a:b] for a, b in zip([0] + offsets, offsets + [y_BTF.shape[-1]])]
        regroup = (lambda a: a.reshape(*a.shape[:-1], shards, -1)) if regrouped else (  # noqa: E731
            lambda a: regroup_columns(a, sizes, shards))
        w_DSG = shd.constrain(regroup(self.kernel[...].astype(self.dtype)),
                              (None, logical, None))  # gathered over `embed` (FSDP), split over `logical`
        D, _, G = w_DSG.shape
        y_BTF = matmul(x_BTD.astype(self.dtype), w_DSG.reshape(D, shards * G))
        if self.bias is not None:
            y_BTF = y_BTF + regroup(self.bias[...].astype(self.dtype)).reshape(-1)
        B, T = y_BTF.shape[:2]
        y_BTSG = shd.constrain(y_BTF.reshape(B, T, shards, G), ("activation_batch", "activation_seq", logical, None))
        pieces, start = [], 0
        for size in sizes:
            pieces.append(y_BTSG[..., start:start + size // shards].reshape(B, T, size))
            start += size // shards
        return pieces


def regroup_columns(w_XF, sizes: Sequence[int], shards: int):
    """Columns [a | b | ...] (pieces of `sizes`, each divisible by `shards`) as [shards, F / shards]:
    row s is [a_s | b_s | ...], the s-th slice of every piece."""
    parts, start = [], 0
    for size in sizes:
        parts.append(w_XF[..., start:start + size].reshape(*w_XF.shape[:-1], shards, size // shards))
        start += size
    return jnp.concatenate(parts, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def embedding_lookup(table_VD, ids_BT, dtype):
    """Rows of the table in `dtype`; the gradient is accumulated in float32 (then given the table's dtype).

    Differentiating `take(table.astype(bf16), ids)` would scatter-add the row gradients in bf16, and a
    token repeated a few hundred times in a batch stops accumulating (the sum outgrows the addends' bits).
    The forward pass still converts before gathering, so FSDP all-gathers the table in `dtype`.
    """
    return _lookup_fwd(table_VD, ids_BT, dtype)[0]


def _lookup_fwd(table_VD, ids_BT, dtype):
    # FSDP: the table is all-gathered over its `embed` dimension before the lookup, as every other weight
    # is before its matmul; gathering rows from the embed-sharded table would leave the activations
    # split by hidden dimension and force XLA to replicate them to re-split them by rows.
    gathered_VD = shd.constrain(table_VD.astype(dtype), shd.GATHERED_VD)
    # The table itself is the residual only for its shape and dtype (it is a live parameter anyway).
    return jnp.take(gathered_VD, ids_BT, axis=0), (table_VD, ids_BT)


def _lookup_bwd(dtype, res, ct_BTD):
    table_VD, ids_BT = res
    # Each device scatter-adds its own rows into a table gathered over `embed` (the lookup's layout, mirrored);
    # XLA then sums the devices' tables into the table's sharding. Left to itself, it gives the scatter the table's
    # fsdp-over-`embed` layout, and so re-splits the residual gradient by hidden dimension, replicating the
    # whole batch on the way ("Involuntary full rematerialization", with tensor parallelism).
    zeros_VD = shd.constrain(jnp.zeros(table_VD.shape, jnp.float32), shd.GATHERED_VD)
    ct_BTD = shd.constrain(ct_BTD.astype(jnp.float32), shd.ACT_BTD)
    grad_VD = shd.constrain(zeros_VD.at[ids_BT].add(ct_BTD, mode="drop"), shd.GATHERED_VD)
    return grad_VD.astype(table_VD.dtype), None


embedding_lookup.defvjp(_lookup_fwd, _lookup_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 3))
def dropout(x_BTD, rate: float, keys_B, site: int):
    """Inverted dropout of activations [B, ...] with one PRNG key per row (`keys_B`, a typed key array).

    Row b's mask depends only on (keys_B[b], site), so the masks do not change with the mesh, the batch
    split into microbatches, or rematerialisation; the backward pass regenerates the mask from the keys
    instead of keeping it. The scaling runs in float32 (1 / 0.9 in bf16 would be 0.16% off)."""
    return _dropout_apply(x_BTD, rate, keys_B, site)


def _dropout_scale(keys_B, site, rate, shape):
    def row(key):
        keep = jax.random.bernoulli(jax.random.fold_in(key, site), 1.0 - rate, shape[1:])
        return jnp.where(keep, jnp.float32(1.0 / (1.0 - rate)), jnp.float32(0.0))

    return jax.vmap(row)(keys_B)


def _dropout_apply(x_BTD, rate, keys_B, site):
    return (x_BTD.astype(jnp.float32) * _dropout_scale(keys_B, site, rate, x_BTD.shape)).astype(x_BTD.dtype)


def _dropout_fwd(x_BTD, rate, keys_B, site):
    return _dropout_apply(x_BTD, rate, keys_B, site), keys_B


def _dropout_bwd(rate, site, keys_B, ct_BTD):
    return _dropout_apply(ct_BTD, rate, keys_B, site), None


dropout.defvjp(_dropout_fwd, _dropout_bwd)


def fold_rows(keys_B, data: int):
    """Each row's key folded with `data` (a layer index, a site family)."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, data)


class Embed(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(cfg.initializer_range)
        self.embedding = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.hidden_size),
                                        dtype_of(cfg.param_dtype)))
        self.dtype = dtype_of(cfg.dtype)

    def __call__(self, ids_BT):
        return embedding_lookup(self.embedding[...], ids_BT, self.dtype)


# The hand-written backward passes of rms_norm, swiglu and qkv_rope cut XLA:GPU's memory traffic or run its
# kernels at a better rate (bench/hlo_traffic.py: the SwiGLU backward was three kernels, the norm kept a
# float32 copy of x under the layer scan; bench/RESULTS.md for the H100 profile) but raise XLA:TPU's
# temporaries under full rematerialisation (phi-3-mini on v5p-64: 27.17 -> 36.17 GiB per chip,
# bench/RESULTS.md). None: on GPUs only; tests force True / False.
FUSED_BACKWARD: bool | None = None


def fused_backward() -> bool:
    return jax.default_backend() == "gpu" if FUSED_BACKWARD is None else FUSED_BACKWARD


def plain_rms_norm(x_BTD, scale_D, eps: float):
    """rms_norm's forward, differentiated by JAX."""
    x32 = x_BTD.astype(jnp.float32)
    y_BTD = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x_BTD.dtype)
    return y_BTD * scale_D.astype(x_BTD.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x_BTD, scale_D, eps: float):
    """HF Phi3RMSNorm: normalise in float32, round to x's dtype, multiply by the weight in x's dtype.

    The backward pass keeps x itself and the float32 inverse norm [B, T, 1]; autodiff would keep the
    float32 copy of x (twice the bytes of a bf16 activation, per norm and layer, under the layer scan)."""
    return _rms_norm_fwd(x_BTD, scale_D, eps)[0]


# How rms_norm's and add_rms_norm's forward passes run where their backward is hand-written
# (FUSED_BACKWARD): "xla" (two kernels: the row sums of squares, then the scaling; the add before them folded
# into the matmul that produces its addend) or "kernel" (`ops.rowwise.rms_norm` / `add_rms_norm`, Pallas
# Triton kernels that load each row once; GPUs, elsewhere Pallas' interpreter; "xla" where the hidden axis
# is split over devices). bench/train_step.py --form rms_norm_forward=... times them.
RMS_NORM_FORWARD = "xla"
RMS_NORM_FORWARD_FORMS = ("xla", "kernel")
# How their backward passes run: "xla" (a pass for the rows' dot products, then one for dx and the partial
# sums of d scale, each reading x and d y) or "kernel" (`ops.rowwise.rms_norm_backward`, each row loaded
# once; "xla" where the hidden axis is split). bench/train_step.py --form rms_norm_backward=...
RMS_NORM_BACKWARD = "xla"
RMS_NORM_BACKWARD_FORMS = ("xla", "kernel")


def _form(name: str) -> str:
    """The value of this module's form constant `name`, checked against its `name`_FORMS."""
    value, forms = globals()[name], globals()[name + "_FORMS"]
    if value not in forms:
        raise ValueError(f"layers.{name}={value!r}: must be one of {forms}")
    return value


def _norm_kernel_applies(name: str, x_BTD) -> bool:
    return _form(name) == "kernel" and x_BTD.ndim == 3 and not shd.context_axes("activation_embed")


def _rms_norm_fwd(x_BTD, scale_D, eps):
    if _norm_kernel_applies("RMS_NORM_FORWARD", x_BTD):
        from phi3_jax.ops import rowwise

        y_BTD, r_BT1 = shd.batch_parallel(lambda x: rowwise.rms_norm(x, scale_D, eps), x_BTD)
        return y_BTD, (x_BTD, scale_D, r_BT1)
    x32 = x_BTD.astype(jnp.float32)
    r_BT1 = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    y_BTD = (x32 * r_BT1).astype(x_BTD.dtype) * scale_D.astype(x_BTD.dtype)  # = plain_rms_norm
    return y_BTD, (x_BTD, scale_D, r_BT1)


def _rms_norm_grads(res, dy_BTD, dres_BTD=None):
    """(dx, d scale) of rms_norm from its residuals and d y; `dres_BTD`, the cotangent of a residual stream
    that is x itself, is added to dx (in x's dtype, as autodiff sums a value's cotangents)."""
    x_BTD, scale_D, r_BT1 = res
    if _norm_kernel_applies("RMS_NORM_BACKWARD", x_BTD):
        from phi3_jax.ops import rowwise

        arrays = (x_BTD, r_BT1, dy_BTD) + (() if dres_BTD is None else (dres_BTD,))
        dx_BTD, dscale_GD = shd.batch_parallel(
            lambda x, r, dy, *dres: rowwise.rms_norm_backward(x, r, scale_D, dy, *dres), *arrays)
        return dx_BTD, jnp.sum(dscale_GD, axis=0).astype(scale_D.dtype)
    x32, dy32 = x_BTD.astype(jnp.float32), dy_BTD.astype(jnp.float32)
    n_BTD = x32 * r_BT1
    dscale_D = jnp.sum(dy32 * n_BTD.astype(x_BTD.dtype).astype(jnp.float32), axis=tuple(range(x_BTD.ndim - 1)))
    dn_BTD = dy32 * scale_D.astype(x_BTD.dtype).astype(jnp.float32)
    dx_BTD = (r_BT1 * (dn_BTD - n_BTD * jnp.mean(dn_BTD * n_BTD, axis=-1, keepdims=True))).astype(x_BTD.dtype)
    return dx_BTD if dres_BTD is None else dres_BTD + dx_BTD, dscale_D.astype(scale_D.dtype)


def _rms_norm_bwd(eps, res, dy_BTD):
    return _rms_norm_grads(res, dy_BTD)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def add_rms_norm(x_BTD, a_BTD, scale_D, eps: float):
    """(h = x + a, rms_norm(h)): a residual add and the norm after it, as one op.

    In the "kernel" form of RMS_NORM_FORWARD one row kernel reads x and a once and writes h and the norm.
    As separate ops, XLA folds the add into the matmul that produces `a` (its output buffer starts as a
    copy of x, which XLA must make as x stays live for the backward pass) and the norm reads h again."""
    return _add_rms_norm_primal(x_BTD, a_BTD, scale_D, eps)[0]


def _add_rms_norm_fwd(x_BTD, a_BTD, scale_D, eps):
    return _add_rms_norm_primal(x_BTD.value, a_BTD.value, scale_D.value, eps)  # (CustomVJPPrimal: see defvjp)


def _add_rms_norm_primal(x_BTD, a_BTD, scale_D, eps):
    if _norm_kernel_applies("RMS_NORM_FORWARD", x_BTD):
        from phi3_jax.ops import rowwise

        h_BTD, y_BTD, r_BT1 = shd.batch_parallel(lambda x, a: rowwise.add_rms_norm(x, a, scale_D, eps), x_BTD, a_BTD)
        return (h_BTD, y_BTD), (h_BTD, scale_D, r_BT1)
    h_BTD = x_BTD + a_BTD
    y_BTD, res = _rms_norm_fwd(h_BTD, scale_D, eps)
    return (h_BTD, y_BTD), res


def _add_rms_norm_bwd(eps, res, cts):
    dh_BTD, dy_BTD = (None if isinstance(ct, SymbolicZero) else ct for ct in cts)
    if dy_BTD is None:
        dy_BTD = jnp.zeros(cts[1].shape, cts[1].dtype)
    dx_BTD, dscale_D = _rms_norm_grads(res, dy_BTD, dh_BTD)  # h's two uses: the norm and the residual stream
    return dx_BTD, dx_BTD, dscale_D


# Symbolic zeros: where h goes unused (the final norm), its cotangent is not a zero array to read.
add_rms_norm.defvjp(_add_rms_norm_fwd, _add_rms_norm_bwd, symbolic_zeros=True)


class Norm(nnx.Module):
    """RMSNorm (phi3) or LayerNorm with bias (phi3small), normalising in float32."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, pdt = cfg.hidden_size, dtype_of(cfg.param_dtype)
        self.kind = cfg.norm_type
        self.eps = cfg.norm_eps
        self.scale = nnx.Param(jnp.ones((D,), pdt))
        self.bias = nnx.Param(jnp.zeros((D,), pdt)) if self.kind == "layer" else None

    def __call__(self, x_BTD):
        if self.kind == "layer":
            x32 = x_BTD.astype(jnp.float32)
            # torch.nn.LayerNorm applies weight and bias in float32 and rounds once (bf16: bit-equal
            # on all but ~3e-5 of the entries, against ~37% when rounding before the weight).
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
            y32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
            y32 = y32 * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
            return y32.astype(x_BTD.dtype)
        norm = rms_norm if fused_backward() else plain_rms_norm
        return norm(x_BTD, self.scale[...], self.eps)

    def add_norm(self, x_BTD, a_BTD):
        """(h = x + a, the norm of h): a residual add and this norm, one op where the backward passes are
        hand-written (`add_rms_norm`)."""
        if self.kind == "layer" or not fused_backward():
            h_BTD = x_BTD + a_BTD
            return h_BTD, self(h_BTD)
        return add_rms_norm(x_BTD, a_BTD, self.scale[...], self.eps)


def rope_tables(cfg: ModelConfig, positions_BT, dtype):
    """cos, sin [B, T, head_dim] for integer positions (spec §4).

    LongRoPE picks one factor set for the whole call: long factors iff max(position) + 1 > L0 over the
    batch (the transformers rule), with the magnitude factor of that branch on cos and sin.
    """
    d = cfg.head_dim
    exps = jnp.arange(0, d, 2, dtype=jnp.float32) / d
    base_freq = jnp.float32(cfg.rope_theta) ** exps
    if cfg.rope_scaling == "longrope":
        if not cfg.rope_short_factor or not cfg.rope_long_factor:
            raise ConfigError("ModelConfig.rope_short_factor/rope_long_factor are empty: LongRoPE factors differ "
                              "per checkpoint revision; import the checkpoint (phi3_jax.load) or set both lists")
        inv_short = 1.0 / (jnp.asarray(cfg.rope_short_factor, jnp.float32) * base_freq)
        inv_long = 1.0 / (jnp.asarray(cfg.rope_long_factor, jnp.float32) * base_freq)
        use_long = jnp.max(positions_BT) + 1 > cfg.original_max_position_embeddings
        inv_freq = jnp.where(use_long, inv_long, inv_short)
        mscale = jnp.where(use_long, jnp.float32(cfg.rope_long_mscale), jnp.float32(cfg.rope_short_mscale))
    else:
        inv_freq = 1.0 / base_freq
        mscale = jnp.float32(1.0)
    ang_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    ang_BTH = jnp.concatenate([ang_BTF, ang_BTF], axis=-1)
    return (jnp.cos(ang_BTH) * mscale).astype(dtype), (jnp.sin(ang_BTH) * mscale).astype(dtype)


def apply_rope(x_BTNH, cos_BTH, sin_BTH):
    """Rotate-half RoPE: dimension k pairs with k + head_dim/2."""
    half = x_BTNH.shape[-1] // 2
    rot_BTNH = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
    return x_BTNH * cos_BTH[:, :, None, :] + rot_BTNH * sin_BTH[:, :, None, :]


def split_fused_qkv(qkv_BTF, heads: tuple[int, int, int]):
    """[all q | all k | all v] (heads = (N, K, H)) -> q [B,T,N,H], k and v [B,T,K,H]. Slices, not jnp.split:
    XLA fuses their padded transposes with RoPE's backward into one kernel per layer, which split's
    concatenation does not (bench/hlo_traffic.py)."""
    N, K, H = heads
    B, T, _ = qkv_BTF.shape
    q_BTNH = qkv_BTF[..., : N * H].reshape(B, T, N, H)
    k_BTKH = qkv_BTF[..., N * H:(N + K) * H].reshape(B, T, K, H)
    v_BTKH = qkv_BTF[..., (N + K) * H:].reshape(B, T, K, H)
    return q_BTNH, k_BTKH, v_BTKH


def _rope_transpose(dy_BTNH, cos_BTH, sin_BTH):
    """apply_rope's transpose in x: rot(x) = [-x2, x1] maps t = dy sin back to [t2, -t1]."""
    half = dy_BTNH.shape[-1] // 2
    t_BTNH = dy_BTNH * sin_BTH[:, :, None, :]
    return dy_BTNH * cos_BTH[:, :, None, :] + jnp.concatenate([t_BTNH[..., half:], -t_BTNH[..., :half]], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def qkv_rope(qkv_BTF, cos_BTH, sin_BTH, heads: tuple[int, int, int]):
    """phi3's fused projection [all q | all k | all v] (heads = (N, K, H)) -> RoPE'd q [B,T,N,H], RoPE'd k and
    v [B,T,K,H]. The backward pass writes d qkv as one concatenation of the three pieces, which XLA:GPU
    emits as a loop per piece; autodiff's form (the slices' zero-padded transposes summed, fused with
    RoPE's backward) ran at about half the memory bandwidth on an H100 (bench/RESULTS.md)."""
    q_BTNH, k_BTKH, v_BTKH = split_fused_qkv(qkv_BTF, heads)
    return apply_rope(q_BTNH, cos_BTH, sin_BTH), apply_rope(k_BTKH, cos_BTH, sin_BTH), v_BTKH


def _qkv_rope_fwd(qkv_BTF, cos_BTH, sin_BTH, heads):
    return qkv_rope(qkv_BTF, cos_BTH, sin_BTH, heads), (cos_BTH, sin_BTH)


def _qkv_rope_bwd(heads, res, g):
    cos_BTH, sin_BTH = res
    dq_BTNH, dk_BTKH, dv_BTKH = g
    B, T = dq_BTNH.shape[:2]
    dqkv_BTF = jnp.concatenate([_rope_transpose(dq_BTNH, cos_BTH, sin_BTH).reshape(B, T, -1),
                                _rope_transpose(dk_BTKH, cos_BTH, sin_BTH).reshape(B, T, -1),
                                dv_BTKH.reshape(B, T, -1)], axis=-1)
    # cos and sin come from positions alone: their zero cotangents are dropped by XLA.
    return dqkv_BTF, jnp.zeros_like(cos_BTH), jnp.zeros_like(sin_BTH)


qkv_rope.defvjp(_qkv_rope_fwd, _qkv_rope_bwd)


def plain_swiglu(z_BTF):
    """silu(gate) * up in z's dtype, differentiated by JAX."""
    g_BTI, u_BTI = jnp.split(z_BTF, 2, axis=-1)
    return jax.nn.silu(g_BTI) * u_BTI


def swiglu_of_halves(g_BTI, u_BTI):
    """silu(gate) * up from gate and up apart (tensor parallelism), differentiated by JAX, in the numbers
    of `swiglu` (float32, rounded once) where fused_backward() holds, else of `plain_swiglu`."""
    if not fused_backward():
        return jax.nn.silu(g_BTI) * u_BTI
    return (jax.nn.silu(g_BTI.astype(jnp.float32)) * u_BTI.astype(jnp.float32)).astype(g_BTI.dtype)


# How swiglu's backward pass writes d [gate | up] (bench/elementwise.py times them):
# - "one_pass": one elementwise expression over the whole width, each entry reading its partner half;
# - "halves": d gate and d up computed apart and concatenated, which XLA:GPU emits as one kernel with a
#   loop per half (its concatenate emitter);
# - "kernel": `ops.rowwise.swiglu_backward`, a Pallas Triton kernel that reads gate, up and d out once and
#   writes both halves (GPUs; elsewhere Pallas' interpreter); "one_pass" where the MLP width is split
#   over devices.
SWIGLU_BACKWARD = "one_pass"
SWIGLU_BACKWARD_FORMS = ("one_pass", "halves", "kernel")


@jax.custom_vjp
def swiglu(z_BTF):
    """silu(gate) * up for z = [gate | up] (the fused gate_up_proj output), computed in float32 and rounded
    once. The backward pass writes d z as one kernel from z and d out (SWIGLU_BACKWARD): differentiated
    through `split`, XLA assembles it from separate gate and up gradients plus a concatenation (about
    twice the memory traffic of the MLP's elementwise backward)."""
    g_BTI, u_BTI = jnp.split(z_BTF.astype(jnp.float32), 2, axis=-1)
    return (jax.nn.silu(g_BTI) * u_BTI).astype(z_BTF.dtype)


def _swiglu_fwd(z_BTF):
    return swiglu(z_BTF), z_BTF


def _swiglu_bwd(z_BTF, dh_BTI):
    form = _form("SWIGLU_BACKWARD")
    if form == "halves":
        return (jnp.concatenate(swiglu_backward_halves(z_BTF, dh_BTI), axis=-1),)
    if form == "kernel" and not shd.context_axes("activation_mlp"):
        from phi3_jax.ops.rowwise import swiglu_backward

        return (shd.batch_parallel(swiglu_backward, z_BTF, dh_BTI),)
    I = dh_BTI.shape[-1]
    z_BTF32 = z_BTF.astype(jnp.float32)
    partner_BTF = jnp.roll(z_BTF32, I, axis=-1)
    dh_BTF = jnp.concatenate([dh_BTI, dh_BTI], axis=-1).astype(jnp.float32)
    is_gate_F = jnp.arange(2 * I) < I
    g_BTF = jnp.where(is_gate_F, z_BTF32, partner_BTF)
    s_BTF = jax.nn.sigmoid(g_BTF)
    dg_BTF = dh_BTF * partner_BTF * s_BTF * (1.0 + g_BTF * (1.0 - s_BTF))  # d silu(g) = s (1 + g (1 - s))
    du_BTF = dh_BTF * g_BTF * s_BTF
    return (jnp.where(is_gate_F, dg_BTF, du_BTF).astype(z_BTF.dtype),)


def swiglu_backward_halves(z_BTF, dh_BTI):
    """(d gate, d up) of silu(gate) * up, in z's dtype, from z = [gate | up] and d out."""
    g_BTI, u_BTI = jnp.split(z_BTF.astype(jnp.float32), 2, axis=-1)
    dh_BTI = dh_BTI.astype(jnp.float32)
    s_BTI = jax.nn.sigmoid(g_BTI)
    dg_BTI = dh_BTI * u_BTI * s_BTI * (1.0 + g_BTI * (1.0 - s_BTI))  # d silu(g) = s (1 + g (1 - s))
    return dg_BTI.astype(z_BTF.dtype), (dh_BTI * g_BTI * s_BTI).astype(z_BTF.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def gate_up_split(cfg: ModelConfig) -> tuple[tuple[int, int], int]:
    """The fused [gate | up] kernel's pieces, and into how many device slices tensor parallelism cuts each
    (1: no split; phi-3-small's interleaved gegelu already keeps each device's pairs together)."""
    I = cfg.intermediate_size
    return (I, I), 1 if cfg.family == "phi3small" else shd.even_shards("activation_mlp", (I,))


class MLP(nnx.Module):
    """SwiGLU with fused [gate | up] (phi3) or the interleaved, clamped "gegelu" (phi3small).

    Both keep the checkpoint's fused layout in one `gate_up_proj` kernel [D, 2I] so that import and export
    are plain transposes.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, I = cfg.hidden_size, cfg.intermediate_size
        self.cfg = cfg
        self.kind = "gegelu" if cfg.family == "phi3small" else "swiglu"
        self.limit = cfg.gegelu_limit
        self.gate_up_proj = Linear(D, 2 * I, bias=cfg.has_bias, cfg=cfg, rngs=rngs)
        self.down_proj = Linear(I, D, bias=cfg.has_bias, cfg=cfg, rngs=rngs)

    def __call__(self, x_BTD, regrouped: bool = False):
        """[B, T, D] -> [B, T, D]; `regrouped`: see `Linear.split`."""
        sizes, shards = gate_up_split(self.cfg)
        if shards > 1:  # tensor parallelism: each device projects onto its own slices of gate and up
            h_BTI = swiglu_of_halves(*self.gate_up_proj.split(x_BTD, sizes, shards, "activation_mlp", regrouped))
            return self.down_proj(shd.constrain(h_BTI, shd.ACT_BTI))
        z_BTF = self.gate_up_proj(x_BTD)
        if self.kind == "swiglu":
            h_BTI = swiglu(z_BTF) if fused_backward() else plain_swiglu(z_BTF)
        else:
            # The interleaved [g_0, l_0, g_1, l_1, ...] layout keeps each device's pairs on that device.
            g_BTI, l_BTI = z_BTF[..., 0::2], z_BTF[..., 1::2]
            # Clamp finite values only; infinities pass through as in the reference.
            g_BTI = jnp.where(jnp.isinf(g_BTI), g_BTI, jnp.minimum(g_BTI, self.limit))
            l_BTI = jnp.where(jnp.isinf(l_BTI), l_BTI, jnp.clip(l_BTI, -self.limit, self.limit))
            h_BTI = g_BTI * jax.nn.sigmoid(1.702 * g_BTI) * (l_BTI + 1)
        return self.down_proj(shd.constrain(h_BTI, shd.ACT_BTI))
