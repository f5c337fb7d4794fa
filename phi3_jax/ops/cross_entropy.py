"""The output head and the next-token cross-entropy in one differentiable op.

`head_loss(x_BTD, w_DV, targets_BT, mask_BT)` = sum over unmasked tokens of
logsumexp(logits) - logits[target], with logits = (x @ w) / divisor in float32 and the `dummy_ids` columns
at the float32 minimum. It is what `optax.softmax_cross_entropy_with_integer_labels(model(ids), targets)` computes, with
the same roundings (the matmul emits logits in x's dtype, the softmax runs in float32), but no float32
[batch, seq, vocab] array is ever stored:

- chunks=1: the forward pass computes the logits gradient, softmax - onehot, right away in x's dtype and
  keeps it for the backward pass, which is two matmuls. Nothing is recomputed (the fast path).
- chunks=N > 1: the sequence is processed N chunks at a time under `lax.scan` and the backward pass
  recomputes each chunk's logits, so only [batch, seq / N, vocab] temporaries exist at any time, at the
  cost of one more head matmul (for large vocabularies on memory-bound slices).

The loss is a sum (a scalar), so its cotangent is one number and the kept gradient needs no rescaling.

`head_token_nll(x_BTD, w_DV, targets_BT)` gives the per-token cross-entropies [B, T] instead, for losses
that weigh tokens by a function of other tokens' losses (DPO's per-sequence log-probabilities). With chunks=1
it keeps the same bf16 softmax - onehot as the fast path, and its backward scales that by each token's
cotangent; with chunks=N > 1 it runs chunk by chunk as `head_loss` does, and the backward pass recomputes each
chunk's softmax - onehot and scales it by that chunk's cotangents in float32 (one rounding to x's dtype).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from phi3_jax import sharding as shd


def head_loss(x_BTD, w_DV, targets_BT, mask_BT, *, divisor: float = 1.0, dummy_ids: tuple[int, ...] = (),
              chunks: int = 1):
    """Sum of masked token cross-entropies (float32 scalar). `w_DV` may be any float dtype; the matmuls run
    in x's dtype, and the weight's gradient comes back in w's dtype from float32 accumulation."""
    B, T, _ = x_BTD.shape
    if chunks < 1 or T % chunks:
        raise ValueError(f"loss chunks={chunks} must be >= 1 and divide the sequence length {T}")
    return _head_loss(x_BTD, w_DV, targets_BT, mask_BT.astype(jnp.float32), float(divisor), tuple(dummy_ids),
                      int(chunks))


def head_token_nll(x_BTD, w_DV, targets_BT, *, divisor: float = 1.0, dummy_ids: tuple[int, ...] = (),
                   chunks: int = 1):
    """float32 [B, T]: logsumexp(logits) - logits[target] for every token, differentiable in x and w (the
    same roundings as `head_loss` with the same `chunks`)."""
    T = x_BTD.shape[1]
    if chunks < 1 or T % chunks:
        raise ValueError(f"loss chunks={chunks} must be >= 1 and divide the sequence length {T}")
    return _token_nll(x_BTD, w_DV, targets_BT, float(divisor), tuple(dummy_ids), int(chunks))


def head_logits(x_BTD, w_DV, divisor: float = 1.0, dummy_ids: tuple[int, ...] = ()):
    """float32 logits [B, T, V]: the head matmul in x's dtype (rounded there, as in the reference models),
    then the divisor and the padding columns at the float32 minimum."""
    return _float_logits(_matmul_logits(x_BTD, w_DV), divisor, dummy_ids)


def _matmul_logits(x_BTD, w_DV):
    return shd.constrain(jnp.dot(x_BTD, w_DV.astype(x_BTD.dtype)), shd.ACT_BTV)


def _float_logits(raw_BTV, divisor: float, dummy_ids: tuple[int, ...]):
    logits_BTV = raw_BTV.astype(jnp.float32)
    if divisor != 1.0:
        logits_BTV = logits_BTV / divisor
    if dummy_ids:
        dummy_V = jnp.zeros((raw_BTV.shape[-1],), bool).at[jnp.asarray(dummy_ids)].set(True)
        logits_BTV = jnp.where(dummy_V, jnp.finfo(jnp.float32).min, logits_BTV)
    return logits_BTV


# How the loss takes the logsumexp of its logits rows (bench/elementwise.py times the three):
# - "one_read": a running (max, sum of exp(x - max)) pair in one XLA reduce;
# - "two_reductions": jax.nn.logsumexp, which reads the logits twice (the max, then the sum);
# - "kernel": Pallas Triton kernels on the matmul's own bf16 output (GPUs; elsewhere Pallas' interpreter):
#   `ops.rowwise.row_xent_grad` where the logits gradient is made (the logsumexp and the gradient from one
#   program per row), `row_logsumexp` where only the loss is (the forward of `chunks` > 1). Taken where the
#   logits are exactly that output (no divisor, no padding columns) and their vocabulary is not split over
#   devices; "one_read" otherwise.
# None: "two_reductions" on a CPU (XLA:CPU runs the variadic reduce 2-7x slower than the two plain ones),
# "one_read" elsewhere.
LOGSUMEXP: str | None = None
LOGSUMEXP_FORMS = ("one_read", "two_reductions", "kernel")


def logsumexp_form() -> str:
    if LOGSUMEXP is None:
        return "two_reductions" if jax.default_backend() == "cpu" else "one_read"
    if LOGSUMEXP not in LOGSUMEXP_FORMS:
        raise ValueError(f"cross_entropy.LOGSUMEXP={LOGSUMEXP!r}: must be one of {LOGSUMEXP_FORMS} or None")
    return LOGSUMEXP


def _logsumexp(logits_BTV, form: str):
    """Row logsumexp [B, T] of finite float32 logits in the XLA form `form` ("one_read" or
    "two_reductions")."""
    if form == "two_reductions":
        return jax.nn.logsumexp(logits_BTV, axis=-1)
    low = jnp.finfo(jnp.float32).min  # a finite start: exp(low - low) * 0 stays 0, where -inf gives NaN

    def combine(a, b):
        m = jnp.maximum(a[0], b[0])
        return m, a[1] * jnp.exp(a[0] - m) + b[1] * jnp.exp(b[0] - m)

    m_BT, s_BT = jax.lax.reduce((logits_BTV, jnp.ones_like(logits_BTV)), (low, jnp.float32(0)), combine,
                                (logits_BTV.ndim - 1,))
    return m_BT + jnp.log(s_BT)


def _kernel_rows(plain: bool) -> bool:
    """Whether the loss's row pass runs in the Pallas kernels: the "kernel" form, logits that are the
    matmul's output as it is (`plain`), and a vocabulary not split over devices."""
    return logsumexp_form() == "kernel" and plain and not shd.context_axes("activation_vocab")


def _row_logsumexp(raw_BTV, logits_BTV, plain: bool):
    """logsumexp of `logits_BTV` (float32, made from the matmul output `raw_BTV`; `plain`: nothing but its
    cast) in the configured form."""
    if _kernel_rows(plain):
        from phi3_jax.ops.rowwise import row_logsumexp

        return shd.batch_parallel(row_logsumexp, raw_BTV)
    form = logsumexp_form()
    return _logsumexp(logits_BTV, "one_read" if form == "kernel" else form)


def _nll_from_raw(raw_BTV, targets_BT, divisor, dummy_ids):
    """(float32 logits, logsumexp [B, T], per-token cross-entropy logsumexp - target logit [B, T]) from the
    head matmul's output."""
    logits_BTV = _float_logits(raw_BTV, divisor, dummy_ids)
    lse_BT = _row_logsumexp(raw_BTV, logits_BTV, plain=divisor == 1.0 and not dummy_ids)
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return logits_BTV, lse_BT, lse_BT - target_BT


def _loss_and_lse(raw_BTV, targets_BT, mask_BT, divisor, dummy_ids):
    """(float32 logits, masked sum of logsumexp - target logit, the logsumexp [B, T]) from the head matmul's
    output."""
    logits_BTV, lse_BT, nll_BT = _nll_from_raw(raw_BTV, targets_BT, divisor, dummy_ids)
    return logits_BTV, jnp.sum(nll_BT * mask_BT), lse_BT


def _loss_and_dlogits(x_BTD, w_DV, targets_BT, mask_BT, divisor, dummy_ids):
    """(masked loss sum, d loss_sum / d (x @ w) in x's dtype) for one chunk."""
    raw_BTV = _matmul_logits(x_BTD, w_DV)
    if _kernel_rows(divisor == 1.0 and not dummy_ids):
        from phi3_jax.ops.rowwise import row_xent_grad

        lse_BT, dlogits_BTV = shd.batch_parallel(row_xent_grad, raw_BTV, targets_BT, mask_BT)
        target_BT = jnp.take_along_axis(raw_BTV, targets_BT[..., None], axis=-1)[..., 0].astype(jnp.float32)
        return jnp.sum((lse_BT - target_BT) * mask_BT), shd.constrain(dlogits_BTV, shd.ACT_BTV)
    logits_BTV, loss, lse_BT = _loss_and_lse(raw_BTV, targets_BT, mask_BT, divisor, dummy_ids)
    dlogits_BTV = dlogits(logits_BTV, lse_BT, targets_BT, mask_BT / divisor)
    return loss, shd.constrain(dlogits_BTV.astype(x_BTD.dtype), shd.ACT_BTV)


def dlogits(logits_BTV, lse_BT, targets_BT, scale_BT):
    """(softmax - onehot(targets)) * scale in float32: the gradient of scale-weighted cross-entropies in the
    float32 logits, from their logsumexp."""
    onehot_BTV = jax.nn.one_hot(targets_BT, logits_BTV.shape[-1], dtype=jnp.float32)
    return (jnp.exp(logits_BTV - lse_BT[..., None]) - onehot_BTV) * scale_BT[..., None]


def _by_chunk(a, chunks):
    """[B, T, ...] -> [chunks, B, T / chunks, ...]."""
    B, T = a.shape[:2]
    return jnp.swapaxes(a.reshape(B, chunks, T // chunks, *a.shape[2:]), 0, 1)


def _unchunk(a):
    n, B, t = a.shape[:3]
    return jnp.swapaxes(a, 0, 1).reshape(B, n * t, *a.shape[3:])


def _grads(x_BTD, w_DV, dlogits_BTV, accumulate: bool):
    """(dx, dw): float32 where more sums follow (`accumulate`: over chunks, or across the devices that hold
    the rows or the vocabulary), else in x's and w's dtypes: the matmuls then round their float32 sums
    once, where a float32 output would double the bytes the optimizer and the gradient norm read of the
    head's weight gradient."""
    dx_BTD = jnp.dot(dlogits_BTV, w_DV.astype(dlogits_BTV.dtype).T,
                     preferred_element_type=jnp.float32 if accumulate else x_BTD.dtype)
    # Over flattened rows: on [B, T, .] operands XLA:CPU first copies x transposed (GPU and TPU compile
    # either form the same).
    dw_DV = jnp.dot(x_BTD.reshape(-1, x_BTD.shape[-1]).T, dlogits_BTV.reshape(-1, dlogits_BTV.shape[-1]),
                    preferred_element_type=jnp.float32 if accumulate else w_DV.dtype)
    return dx_BTD, dw_DV


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _head_loss(x_BTD, w_DV, targets_BT, mask_BT, divisor, dummy_ids, chunks):
    return _fwd(x_BTD, w_DV, targets_BT, mask_BT, divisor, dummy_ids, chunks)[0]


def _fwd(x_BTD, w_DV, targets_BT, mask_BT, divisor, dummy_ids, chunks):
    if chunks == 1:
        loss, dlogits_BTV = _loss_and_dlogits(x_BTD, w_DV, targets_BT, mask_BT, divisor, dummy_ids)
        return loss, (x_BTD, w_DV, dlogits_BTV, targets_BT, mask_BT)

    def body(total, xs):
        x, t, m = xs
        return total + _loss_and_lse(_matmul_logits(x, w_DV), t, m, divisor, dummy_ids)[1], None

    xs = (_by_chunk(x_BTD, chunks), _by_chunk(targets_BT, chunks), _by_chunk(mask_BT, chunks))
    loss, _ = jax.lax.scan(body, jnp.float32(0), xs)
    return loss, (x_BTD, w_DV, None, targets_BT, mask_BT)


def _bwd(divisor, dummy_ids, chunks, res, g):
    x_BTD, w_DV, dlogits_BTV, targets_BT, mask_BT = res
    if chunks == 1:
        across_devices = any(shd.context_axes(axis) for axis in shd.ACT_BTV)  # an all-reduce adds partial sums
        dx_BTD, dw_DV = _grads(x_BTD, w_DV, dlogits_BTV, accumulate=across_devices)
    else:
        def body(dw, xs):
            x, t, m = xs
            dlogits = _loss_and_dlogits(x, w_DV, t, m, divisor, dummy_ids)[1]
            dx, dw_c = _grads(x, w_DV, dlogits, accumulate=True)
            return dw + dw_c, dx

        xs = (_by_chunk(x_BTD, chunks), _by_chunk(targets_BT, chunks), _by_chunk(mask_BT, chunks))
        dw_DV, dx_nBtD = jax.lax.scan(body, jnp.zeros(w_DV.shape, jnp.float32), xs)
        dx_BTD = _unchunk(dx_nBtD)
    # Scaled in float32: g is typically 1 / tokens, which bf16 would round by up to 0.4% (the train step
    # differentiates the loss sum: g = 1, and the gradients are the matmuls' own roundings).
    dx_BTD = (dx_BTD.astype(jnp.float32) * g).astype(x_BTD.dtype)
    dw_DV = (dw_DV.astype(jnp.float32) * g).astype(w_DV.dtype)
    return dx_BTD, dw_DV, None, None


_head_loss.defvjp(_fwd, _bwd)


def _nll_parts(x_BTD, w_DV, targets_BT, divisor, dummy_ids):
    """`_nll_from_raw` of one chunk's head matmul."""
    return _nll_from_raw(_matmul_logits(x_BTD, w_DV), targets_BT, divisor, dummy_ids)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _token_nll(x_BTD, w_DV, targets_BT, divisor, dummy_ids, chunks):
    return _token_nll_fwd(x_BTD, w_DV, targets_BT, divisor, dummy_ids, chunks)[0]


def _token_nll_fwd(x_BTD, w_DV, targets_BT, divisor, dummy_ids, chunks):
    if chunks == 1:
        logits_BTV, lse_BT, nll_BT = _nll_parts(x_BTD, w_DV, targets_BT, divisor, dummy_ids)
        ones_BT = jnp.ones(targets_BT.shape, jnp.float32)
        dlogits_BTV = shd.constrain(dlogits(logits_BTV, lse_BT, targets_BT, ones_BT / divisor).astype(x_BTD.dtype),
                                    shd.ACT_BTV)
        return nll_BT, (x_BTD, w_DV, dlogits_BTV, targets_BT)

    def body(_, xs):
        x, t = xs
        return None, _nll_parts(x, w_DV, t, divisor, dummy_ids)[2]

    _, nll_nBt = jax.lax.scan(body, None, (_by_chunk(x_BTD, chunks), _by_chunk(targets_BT, chunks)))
    return _unchunk(nll_nBt), (x_BTD, w_DV, None, targets_BT)


def _token_nll_bwd(divisor, dummy_ids, chunks, res, g_BT):
    x_BTD, w_DV, dlogits_BTV, targets_BT = res
    if chunks == 1:
        scaled_BTV = (dlogits_BTV.astype(jnp.float32) * g_BT[..., None]).astype(x_BTD.dtype)
        across_devices = any(shd.context_axes(axis) for axis in shd.ACT_BTV)
        dx_BTD, dw_DV = _grads(x_BTD, w_DV, scaled_BTV, accumulate=across_devices)
    else:
        def body(dw, xs):
            x, t, g = xs
            logits, lse, _ = _nll_parts(x, w_DV, t, divisor, dummy_ids)
            scaled = shd.constrain(dlogits(logits, lse, t, g / divisor).astype(x.dtype), shd.ACT_BTV)
            dx, dw_c = _grads(x, w_DV, scaled, accumulate=True)
            return dw + dw_c, dx

        xs = (_by_chunk(x_BTD, chunks), _by_chunk(targets_BT, chunks), _by_chunk(g_BT, chunks))
        dw_DV, dx_nBtD = jax.lax.scan(body, jnp.zeros(w_DV.shape, jnp.float32), xs)
        dx_BTD = _unchunk(dx_nBtD)
    return dx_BTD.astype(x_BTD.dtype), dw_DV.astype(w_DV.dtype), None


_token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)
