"""Train state, its sharded creation, and the jitted train / eval steps.

The state is a plain dict pytree (what Orbax saves and what shardings are computed for):

    {"params": nested dict of master weights (precision.param_dtype, float32 by default; the model's
         nnx.Param state as a pure dict),
     "opt_state": the optax state,
     "compute_params": (GPU meshes, when the compute dtype differs from the master weights', e.g. bf16 on
         float32) every weight but the embedding table, already cast: the optimizer update writes it in the
         same pass that writes the master weights, so a step never reads the float32 weights just to cast
         them (see COMPUTE_COPY),
     "step": int32 steps taken (applied or skipped),
     "nonfinite_run": int32 consecutive steps skipped for a non-finite loss or gradient,
     "skipped": int32 steps skipped in all}

The model's graph definition is static (`nnx.split` once); the hot loop is a plain `jax.jit` of
`train_step(state, batch)` with the state donated. The step computes with the weights in the compute dtype
(float32 master weights and optimizer state, bf16 matmuls; the embedding table is cast per row, so its
gradient sums in float32) and converts their gradients back to float32 before the optimizer, and gradient
accumulation is a `lax.scan` over microbatches inside the same jit, summing in float32. Checkpoints leave
"compute_params" out; a restore casts it again from the master weights.
With dropout in the model config, the train step draws masks from (train.seed, step, row).

Loss: masked next-token cross-entropy on packed batches (the head and the loss as one op, `loss_chunks`
slices of the sequence at a time), averaged over the loss-mask tokens of the whole global batch (every
microbatch included), so grad_accum and the mesh shape do not change the loss.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from phi3_jax import sharding as shd
from phi3_jax.model.config import ModelConfig
from phi3_jax.model.decoder import Decoder

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def split_model(model: Decoder):
    """(graphdef, params as a pure dict). The model must hold nothing but parameters."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree_util.tree_leaves(rest):
        raise ValueError(f"model holds non-parameter state {rest}; the trainer expects parameters only")
    return graphdef, params.to_pure_dict()


def graphdef_of(cfg: ModelConfig):
    from phi3_jax.model.decoder import abstract_model

    return split_model(abstract_model(cfg))[0]


def cast_floats(tree, dtype):
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def compute_params(params: dict, dtype) -> dict:
    """The master weights as the step computes with them: cast to `dtype` once (so FSDP gathers them in
    it), except the embedding table, which the model casts per row so its gradient sums in float32."""
    return {k: v if k == "embed_tokens" else cast_floats(v, dtype) for k, v in params.items()}


def compute_copy(params: dict, dtype) -> dict | None:
    """The state's "compute_params": the leaves `compute_params` casts, cast; None where the cast would
    change no dtype (float32 compute)."""
    cast = compute_params(params, dtype)
    if all(a.dtype == b.dtype for a, b in zip(jax.tree.leaves(cast), jax.tree.leaves(params))):
        return None
    return {k: v for k, v in cast.items() if k != "embed_tokens"}


# Keep "compute_params" in the state? On an H100 compile of bench/train_step.py it saves 2.0 GB of the step's
# memory traffic and 9 kernels (bench/hlo_traffic.py); on TPU the same state raised XLA's temporaries under
# full rematerialisation (phi-3-mini on v5p-64: 27.12 -> 31.24 GiB per chip, phi3_jax.aot). None: on GPU
# meshes only; tests force True / False.
COMPUTE_COPY: bool | None = None


def keeps_compute_copy(mesh) -> bool:
    return mesh.devices.flat[0].platform == "gpu" if COMPUTE_COPY is None else COMPUTE_COPY


def fresh_state(params: dict, tx: optax.GradientTransformation, copy_dtype=None) -> dict:
    """Step 0 around `params`: zero moments, no skipped steps; with `copy_dtype` (the compute dtype), the
    compute copy where it differs from the master weights."""
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0),
             "nonfinite_run": jnp.int32(0), "skipped": jnp.int32(0)}
    copy = compute_copy(params, copy_dtype) if copy_dtype is not None else None
    if copy is not None:
        state["compute_params"] = copy
    return state


# ----------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------

def loss_sums(graphdef, params, batch: dict, compute_dtype, impl: str | None = None, loss_chunks: int = 1,
              dropout_keys_B=None):
    """(sum of masked token losses, number of loss tokens) for one (micro)batch; `dropout_keys_B` (one key
    per row) turns on the model's dropout."""
    model = nnx.merge(graphdef, compute_params(params, compute_dtype))
    inputs_BT = batch["inputs"]
    mask_BT = batch["loss_mask"] if "loss_mask" in batch else jnp.ones(inputs_BT.shape, jnp.float32)
    return model.loss_sums(inputs_BT, batch["targets"], mask_BT, positions_BT=batch.get("positions"),
                           segment_ids_BT=batch.get("segment_ids"), impl=impl, chunks=loss_chunks,
                           dropout_keys_B=dropout_keys_B)


def dropout_keys(seed: int, step, batch_size: int):
    """One PRNG key per row of the global batch for the step: a function of (seed, step, row) only, so a
    resumed run, another mesh or another grad_accum drops the same activations."""
    step_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _DROPOUT_STREAM), step)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, jnp.arange(batch_size, dtype=jnp.uint32))


_DROPOUT_STREAM = 0x64726F70  # "drop": keeps these keys apart from any other use of the seed


def _microbatches(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B/n, ...] with microbatch a = rows a, a + n, a + 2n, ... so that every device's
    shard of the batch contributes equally to every microbatch (no resharding)."""
    def split(x):
        B = x.shape[0]
        if B % n:
            raise ValueError(f"batch of {B} rows is not divisible by grad_accum={n}")
        return jnp.swapaxes(x.reshape(B // n, n, *x.shape[1:]), 0, 1)

    return {k: split(v) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StepFns:
    train_step: Callable  # (state, batch) -> (state, metrics); jitted, state donated
    eval_step: Callable  # (params, batch) -> (loss_sum, count); jitted
    init: Callable  # (seed) -> state; jitted with out_shardings
    state_shardings: Any
    batch_sharding: Any
    abstract_state: Any


def make_train_step(graphdef, tx: optax.GradientTransformation, *, compute_dtype="float32", grad_accum: int = 1,
                    impl: str | None = None, mesh=None, loss_chunks: int = 1, dropout_seed: int | None = None,
                    rules=None):
    """The pure train step: (state, batch) -> (state, metrics). Not jitted here.

    With `mesh`, the step traces inside `shd.activation_sharding(mesh)`: the model's activations carry the
    sharding constraints of the logical-axis table (see `sharding.constrain`). With `dropout_seed`, the
    model's dropout is on, with keys from `dropout_keys(dropout_seed, state["step"], rows)`."""

    def grads_of(params, weights, batch):
        """Loss sum, token count and the gradient in the master weights' dtypes, differentiated at
        `weights` (the master weights or the compute copy beside the embedding table)."""
        def f(w, mb):
            mb = dict(mb)
            keys = mb.pop("dropout_keys", None)
            s, n = loss_sums(graphdef, w, mb, compute_dtype, impl, loss_chunks, keys)
            return s, n

        def master(g):
            return jax.tree.map(lambda g, p: g.astype(p.dtype), g, params)

        if grad_accum == 1:
            (s, n), g = jax.value_and_grad(f, has_aux=True)(weights, batch)
            return s, n, master(g)
        mbs = _microbatches(batch, grad_accum)

        def body(carry, mb):
            s_acc, n_acc, g_acc = carry
            (s, n), g = jax.value_and_grad(f, has_aux=True)(weights, mb)
            return (s_acc + s, n_acc + n, jax.tree.map(jnp.add, g_acc, master(g))), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (s, n, g), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0), zeros), mbs)
        return s, n, g

    def train_step(state, batch):
        params = state["params"]
        copy = state.get("compute_params")
        weights = params if copy is None else {**params, **copy}
        if dropout_seed is not None:
            batch = {**batch, "dropout_keys": dropout_keys(dropout_seed, state["step"], batch["inputs"].shape[0])}
        loss_sum, count, grads = grads_of(params, weights, batch)
        denom = jnp.maximum(count, 1.0)
        loss = loss_sum / denom
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step computes NaN updates and moments, and `keep` below discards them all (the old
        # params and optimizer state stay). Zeroing the gradients first would cost a full read and write
        # of them, and hide them from XLA's CSE of clip_by_global_norm's norm with `grad_norm` above.
        updates, new_opt = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        new_state = {
            "params": keep(new_params, params),
            "opt_state": keep(new_opt, state["opt_state"]),
            "step": state["step"] + 1,
            "nonfinite_run": jnp.where(ok, 0, state["nonfinite_run"] + 1).astype(jnp.int32),
            "skipped": state["skipped"] + (~ok).astype(jnp.int32),
        }
        if copy is not None:  # XLA writes it from the optimizer's fused update, no separate pass
            new_state["compute_params"] = compute_copy(new_state["params"], compute_dtype)
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count, "finite": ok,
                   "nonfinite_run": new_state["nonfinite_run"], "skipped": new_state["skipped"]}
        return new_state, metrics

    return shd.with_activation_sharding(train_step, mesh, rules)


def make_eval_step(graphdef, *, compute_dtype="float32", impl: str | None = None, mesh=None, loss_chunks: int = 1,
                   rules=None):
    """(params, batch) -> (loss_sum, count); with `mesh`, activation constraints as in `make_train_step`."""
    def eval_step(params, batch):
        return loss_sums(graphdef, params, batch, compute_dtype, impl, loss_chunks)

    return shd.with_activation_sharding(eval_step, mesh, rules)


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, params=None, copy_dtype=None):
    """Fresh state (see fresh_state); `params` (a pure dict) replaces the random init when given."""
    from phi3_jax.model.decoder import init_model

    if params is None:
        _, params = split_model(init_model(cfg, seed))
    return fresh_state(params, tx, copy_dtype)


def build(cfg: ModelConfig, tx: optax.GradientTransformation, mesh, *, compute_dtype="float32", grad_accum: int = 1,
          impl: str | None = None, loss_chunks: int = 1, seed: int = 0, sequence_parallel: bool = False) -> StepFns:
    """Jitted init / train / eval functions with the state's shardings on `mesh`.

    The state is never materialised unsharded: `init(seed)` runs under jit with out_shardings from the
    abstract state (`jax.eval_shape`), so each device creates only its shard. The train and eval steps trace
    inside `shd.activation_sharding(mesh)`, so `fns.train_step.lower(...)` (ahead-of-time compilation)
    carries the activation constraints too. When the config has dropout, the train step draws its masks
    from `seed` (train.seed) and the step number; the eval step never drops. `sequence_parallel`: the
    residual stream split over `tensor` by sequence (`sharding.SEQUENCE_PARALLEL`).
    """
    graphdef = graphdef_of(cfg)
    rules = shd.SEQUENCE_PARALLEL if sequence_parallel else None
    copy_dtype = compute_dtype if keeps_compute_copy(mesh) else None
    abstract = jax.eval_shape(functools.partial(init_state, cfg, tx, 0, copy_dtype=copy_dtype))
    state_sh = shd.tree_shardings(mesh, abstract)
    batch_sh = shd.batch_sharding(mesh, 2)

    def init(seed: int):
        return jax.jit(functools.partial(init_state, cfg, tx, int(seed), copy_dtype=copy_dtype),
                       out_shardings=state_sh)()

    train_step = jax.jit(make_train_step(graphdef, tx, compute_dtype=compute_dtype, grad_accum=grad_accum, impl=impl,
                                         mesh=mesh, loss_chunks=loss_chunks,
                                         dropout_seed=seed if cfg.has_dropout else None, rules=rules),
                         in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, shd.replicated(mesh)),
                         donate_argnums=(0,))
    eval_step = jax.jit(make_eval_step(graphdef, compute_dtype=compute_dtype, impl=impl, mesh=mesh,
                                       loss_chunks=loss_chunks, rules=rules),
                        in_shardings=(state_sh["params"], batch_sh), out_shardings=shd.replicated(mesh))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    return StepFns(train_step, eval_step, init, state_sh, batch_sh, abstract)


def state_from_params(fns: StepFns, tx: optax.GradientTransformation, params) -> dict:
    """A fresh state (zero moments, step 0) around given parameters, placed with the state shardings."""
    params = jax.device_put(params, fns.state_shardings["params"])
    copy = fns.abstract_state.get("compute_params")
    dtype = None if copy is None else jax.tree.leaves(copy)[0].dtype
    make = jax.jit(lambda p: fresh_state(p, tx, dtype), out_shardings=fns.state_shardings, donate_argnums=(0,))
    return make(params)
