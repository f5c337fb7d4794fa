"""Train state, its sharded creation, and the jitted train / eval steps.

The state is a plain dict pytree (what Orbax saves and what shardings are computed for):

    {"params": nested dict of master weights (precision.param_dtype, float32 by default; the model's
         nnx.Param state as a pure dict),
     "opt_state": the optax state,
     "compute_params": (GPU meshes, when the compute dtype differs from the master weights', e.g. bf16 on
         float32) every weight but the embedding table, already cast: the optimizer update writes it in the
         same pass that writes the master weights, so a step never reads the float32 weights just to cast
         them (see COMPUTE_COPY),
     "ref_params": (objective "dpo") the frozen reference model: the weights the run started from, as
         `compute_params` casts them,
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

Objective "dpo" (direct preference optimisation): rows hold preference pairs (phi3_jax.data's pair rows:
segment 2k-1 the chosen conversation of pair k, segment 2k the rejected one). With r = log p_policy -
log p_ref summed over each conversation's trained tokens, the loss is -log sigmoid(beta (r_chosen -
r_rejected)) averaged over the pairs of the global batch; `correct` counts pairs whose margin is positive.
`DPOLoss` also gives TRL's other losses on the same margin: "ipo" ((m - 1 / (2 beta))^2, with r averaged
over each conversation's trained tokens, as TRL does for IPO), "hinge" (relu(1 - beta m)), and conservative
DPO's label smoothing of the sigmoid loss; `rpo_alpha` adds RPO's negative log-likelihood of the chosen reply.
The per-token log-probabilities come from the head as one op too, `loss_chunks` slices at a time.
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
from phi3_jax.train_config import DPO_LOSSES

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
OBJECTIVES = ("lm", "dpo")
# The float32 sums each objective's step adds up over a batch (and its microbatches); the loss is loss / count.
SUM_KEYS = {"lm": ("loss", "count"), "dpo": ("loss", "count", "correct", "reward_chosen", "reward_rejected")}


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


def fresh_state(params: dict, tx: optax.GradientTransformation, copy_dtype=None, ref_dtype=None) -> dict:
    """Step 0 around `params`: zero moments, no skipped steps; with `copy_dtype` (the compute dtype), the
    compute copy where it differs from the master weights; with `ref_dtype` (DPO), the reference weights."""
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0),
             "nonfinite_run": jnp.int32(0), "skipped": jnp.int32(0)}
    copy = compute_copy(params, copy_dtype) if copy_dtype is not None else None
    if copy is not None:
        state["compute_params"] = copy
    if ref_dtype is not None:
        state["ref_params"] = compute_params(params, ref_dtype)
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


@dataclasses.dataclass(frozen=True)
class DPOLoss:
    """The per-pair loss on the margin m = (r_chosen - r_rejected), r = log p_policy - log p_ref:
    "sigmoid" -(1 - label_smoothing) log sigmoid(beta m) - label_smoothing log sigmoid(-beta m) (DPO; with
    label_smoothing > 0 conservative DPO, for preference labels flipped with that probability), "ipo"
    (m - 1 / (2 beta))^2 with each r averaged over its conversation's trained tokens, "hinge" relu(1 - beta m).
    `rpo_alpha` > 0 adds rpo_alpha x the chosen conversation's NLL per trained token (RPO, arXiv 2404.19733;
    TRL's rpo_alpha averages over all chosen tokens of the batch instead), which keeps the chosen
    reply likely where DPO alone lowers both replies' likelihoods."""
    beta: float = 0.1
    kind: str = "sigmoid"
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0

    def __post_init__(self):
        if self.kind not in DPO_LOSSES:
            raise ValueError(f"DPO loss {self.kind!r}: must be one of {DPO_LOSSES}")
        if not self.beta > 0:
            raise ValueError(f"DPO beta {self.beta}: must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5 or (self.label_smoothing and self.kind != "sigmoid"):
            raise ValueError(f"DPO label_smoothing {self.label_smoothing}: must be in [0, 0.5), and 0 unless the "
                             f"loss is 'sigmoid' (it is {self.kind!r})")
        if not self.rpo_alpha >= 0:
            raise ValueError(f"DPO rpo_alpha {self.rpo_alpha}: must be >= 0")

    @classmethod
    def from_config(cls, train) -> "DPOLoss":
        """From a config's train section (train.dpo_beta, dpo_loss, dpo_label_smoothing, dpo_rpo_alpha)."""
        return cls(train.dpo_beta, train.dpo_loss, train.dpo_label_smoothing, train.dpo_rpo_alpha)

    def per_pair(self, margin_BP):
        """float32 loss of each pair from its margin (in the loss's own r: summed, or averaged for "ipo")."""
        if self.kind == "ipo":
            return jnp.square(margin_BP - 1.0 / (2.0 * self.beta))
        z_BP = self.beta * margin_BP
        if self.kind == "hinge":
            return jax.nn.relu(1.0 - z_BP)
        eps = self.label_smoothing
        loss_BP = jax.nn.softplus(-z_BP)
        return (1.0 - eps) * loss_BP + eps * jax.nn.softplus(z_BP) if eps else loss_BP


def dpo_sums(graphdef, params, ref_params, batch: dict, compute_dtype, loss: DPOLoss, impl: str | None = None,
             dropout_keys_B=None, loss_chunks: int = 1) -> dict:
    """{"loss": sum over pairs of `loss.per_pair(margin)`, "count": pairs, "correct": pairs with a positive
    margin, "reward_chosen" / "reward_rejected": sums of beta r (TRL's implicit rewards)} for a batch of pair
    rows (see the module docstring); `ref_params` as `compute_params` gives them. A pair counts when both
    conversations have trained tokens. `loss_chunks` as in `loss_sums`, for the policy's and the reference's
    heads."""
    inputs_BT, targets_BT, seg_BT = batch["inputs"], batch["targets"], batch["segment_ids"]
    kw = dict(positions_BT=batch.get("positions"), segment_ids_BT=seg_BT, impl=impl, chunks=loss_chunks)
    nll_BT = nnx.merge(graphdef, compute_params(params, compute_dtype)).token_nll(
        inputs_BT, targets_BT, dropout_keys_B=dropout_keys_B, **kw)
    ref_nll_BT = jax.lax.stop_gradient(nnx.merge(graphdef, ref_params).token_nll(inputs_BT, targets_BT, **kw))
    mask_BT = batch["loss_mask"].astype(jnp.float32)
    chosen_BT = (seg_BT % 2 == 1).astype(jnp.float32)
    pair_BT = (seg_BT + 1) // 2  # 0 on padding
    num_pairs = seg_BT.shape[1] // 2 + 1  # a segment has at least one token

    def per_pair(v_BT):
        return jax.vmap(lambda v, p: jax.ops.segment_sum(v, p, num_segments=num_pairs))(v_BT, pair_BT)

    ratio_BT = (ref_nll_BT - nll_BT) * mask_BT
    n_chosen_BP, n_rejected_BP = per_pair(mask_BT * chosen_BT), per_pair(mask_BT * (1.0 - chosen_BT))
    r_chosen_BP, r_rejected_BP = per_pair(ratio_BT * chosen_BT), per_pair(ratio_BT * (1.0 - chosen_BT))
    if loss.kind == "ipo":
        r_chosen_BP = r_chosen_BP / jnp.maximum(n_chosen_BP, 1.0)
        r_rejected_BP = r_rejected_BP / jnp.maximum(n_rejected_BP, 1.0)
    margin_BP = r_chosen_BP - r_rejected_BP
    loss_BP = loss.per_pair(margin_BP)
    if loss.rpo_alpha:
        loss_BP += loss.rpo_alpha * per_pair(nll_BT * mask_BT * chosen_BT) / jnp.maximum(n_chosen_BP, 1.0)
    # Padding (pair 0) has no trained token, so it is never valid.
    valid_BP = ((n_chosen_BP > 0) & (n_rejected_BP > 0)).astype(jnp.float32)
    return {"loss": jnp.sum(loss_BP * valid_BP), "count": jnp.sum(valid_BP),
            "correct": jnp.sum((margin_BP > 0) * valid_BP),
            "reward_chosen": jax.lax.stop_gradient(loss.beta * jnp.sum(r_chosen_BP * valid_BP)),
            "reward_rejected": jax.lax.stop_gradient(loss.beta * jnp.sum(r_rejected_BP * valid_BP))}


def objective_sums(objective: str, graphdef, weights, ref_params, batch: dict, compute_dtype, *, impl=None,
                   loss_chunks: int = 1, dpo: DPOLoss = DPOLoss(), dropout_keys_B=None) -> dict:
    """The objective's sums for one (micro)batch (SUM_KEYS[objective]), float32 scalars; the loss is
    loss / count."""
    if objective == "dpo":
        return dpo_sums(graphdef, weights, ref_params, batch, compute_dtype, dpo, impl, dropout_keys_B, loss_chunks)
    s, n = loss_sums(graphdef, weights, batch, compute_dtype, impl, loss_chunks, dropout_keys_B)
    return {"loss": s, "count": n}


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
    eval_step: Callable  # (state, batch) -> the objective's sums (SUM_KEYS); jitted
    init: Callable  # (seed) -> state; jitted with out_shardings
    state_shardings: Any
    batch_sharding: Any
    abstract_state: Any


def make_train_step(graphdef, tx: optax.GradientTransformation, *, compute_dtype="float32", grad_accum: int = 1,
                    impl: str | None = None, mesh=None, loss_chunks: int = 1, dropout_seed: int | None = None,
                    rules=None, objective: str = "lm", dpo: DPOLoss = DPOLoss()):
    """The pure train step: (state, batch) -> (state, metrics). Not jitted here.

    With `mesh`, the step traces inside `shd.activation_sharding(mesh)`: the model's activations carry the
    sharding constraints of the logical-axis table (see `sharding.constrain`). With `dropout_seed`, the
    model's dropout is on, with keys from `dropout_keys(dropout_seed, state["step"], rows)`. `objective`
    "dpo" trains on pair rows against `state["ref_params"]` (see the module docstring)."""

    def grads_of(params, weights, ref, batch):
        """The objective's sums and the gradient of the loss sum in the master weights' dtypes,
        differentiated at `weights` (the master weights or the compute copy beside the embedding table)."""
        def f(w, mb):
            mb = dict(mb)
            keys = mb.pop("dropout_keys", None)
            sums = objective_sums(objective, graphdef, w, ref, mb, compute_dtype, impl=impl,
                                  loss_chunks=loss_chunks, dpo=dpo, dropout_keys_B=keys)
            return sums["loss"], sums

        def master(g):
            return jax.tree.map(lambda g, p: g.astype(p.dtype), g, params)

        if grad_accum == 1:
            (_, sums), g = jax.value_and_grad(f, has_aux=True)(weights, batch)
            return sums, master(g)
        mbs = _microbatches(batch, grad_accum)

        def body(carry, mb):
            sums_acc, g_acc = carry
            (_, sums), g = jax.value_and_grad(f, has_aux=True)(weights, mb)
            return (jax.tree.map(jnp.add, sums_acc, sums), jax.tree.map(jnp.add, g_acc, master(g))), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        zero_sums = {k: jnp.float32(0) for k in SUM_KEYS[objective]}
        (sums, g), _ = jax.lax.scan(body, (zero_sums, zeros), mbs)
        return sums, g

    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: must be one of {OBJECTIVES}")

    def train_step(state, batch):
        params = state["params"]
        copy = state.get("compute_params")
        weights = params if copy is None else {**params, **copy}
        if dropout_seed is not None:
            batch = {**batch, "dropout_keys": dropout_keys(dropout_seed, state["step"], batch["inputs"].shape[0])}
        sums, grads = grads_of(params, weights, state.get("ref_params"), batch)
        count = sums["count"]
        denom = jnp.maximum(count, 1.0)
        loss = sums["loss"] / denom
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
        if "ref_params" in state:
            new_state["ref_params"] = state["ref_params"]
        if copy is not None:  # XLA writes it from the optimizer's fused update, no separate pass
            new_state["compute_params"] = compute_copy(new_state["params"], compute_dtype)
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count, "finite": ok,
                   "nonfinite_run": new_state["nonfinite_run"], "skipped": new_state["skipped"]}
        if "correct" in sums:  # DPO: the share of pairs the policy already ranks right (before this update)
            metrics["accuracy"] = sums["correct"] / denom
            for k in ("reward_chosen", "reward_rejected"):  # means over the pairs, before this update
                metrics[k] = sums[k] / denom
        return new_state, metrics

    return shd.with_activation_sharding(train_step, mesh, rules)


def make_eval_step(graphdef, *, compute_dtype="float32", impl: str | None = None, mesh=None, loss_chunks: int = 1,
                   rules=None, objective: str = "lm", dpo: DPOLoss = DPOLoss()):
    """(state, batch) -> the objective's sums (SUM_KEYS[objective]); with `mesh`,
    activation constraints as in `make_train_step`."""
    def eval_step(state, batch):
        return objective_sums(objective, graphdef, state["params"], state.get("ref_params"), batch, compute_dtype,
                              impl=impl, loss_chunks=loss_chunks, dpo=dpo)

    return shd.with_activation_sharding(eval_step, mesh, rules)


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, params=None, copy_dtype=None,
               ref_dtype=None):
    """Fresh state (see fresh_state); `params` (a pure dict) replaces the random init when given."""
    from phi3_jax.model.decoder import init_model

    if params is None:
        _, params = split_model(init_model(cfg, seed))
    return fresh_state(params, tx, copy_dtype, ref_dtype)


def build(cfg: ModelConfig, tx: optax.GradientTransformation, mesh, *, compute_dtype="float32", grad_accum: int = 1,
          impl: str | None = None, loss_chunks: int = 1, seed: int = 0, sequence_parallel: bool = False,
          objective: str = "lm", dpo: DPOLoss = DPOLoss()) -> StepFns:
    """Jitted init / train / eval functions with the state's shardings on `mesh`.

    The state is never materialised unsharded: `init(seed)` runs under jit with out_shardings from the
    abstract state (`jax.eval_shape`), so each device creates only its shard. The train and eval steps trace
    inside `shd.activation_sharding(mesh)`, so `fns.train_step.lower(...)` (ahead-of-time compilation)
    carries the activation constraints too. When the config has dropout, the train step draws its masks
    from `seed` (train.seed) and the step number; the eval step never drops. `sequence_parallel`: the
    residual stream split over `tensor` by sequence (`sharding.SEQUENCE_PARALLEL`). `objective` "dpo" keeps
    the reference weights in the state and trains on pair rows.
    """
    graphdef = graphdef_of(cfg)
    rules = shd.SEQUENCE_PARALLEL if sequence_parallel else None
    copy_dtype = compute_dtype if keeps_compute_copy(mesh) else None
    ref_dtype = compute_dtype if objective == "dpo" else None
    abstract = jax.eval_shape(functools.partial(init_state, cfg, tx, 0, copy_dtype=copy_dtype, ref_dtype=ref_dtype))
    state_sh = shd.tree_shardings(mesh, abstract)
    batch_sh = shd.batch_sharding(mesh, 2)

    def init(seed: int):
        return jax.jit(functools.partial(init_state, cfg, tx, int(seed), copy_dtype=copy_dtype, ref_dtype=ref_dtype),
                       out_shardings=state_sh)()

    train_step = jax.jit(make_train_step(graphdef, tx, compute_dtype=compute_dtype, grad_accum=grad_accum, impl=impl,
                                         mesh=mesh, loss_chunks=loss_chunks,
                                         dropout_seed=seed if cfg.has_dropout else None, rules=rules,
                                         objective=objective, dpo=dpo),
                         in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, shd.replicated(mesh)),
                         donate_argnums=(0,))
    eval_step = jax.jit(make_eval_step(graphdef, compute_dtype=compute_dtype, impl=impl, mesh=mesh,
                                       loss_chunks=loss_chunks, rules=rules, objective=objective, dpo=dpo),
                        in_shardings=(state_sh, batch_sh), out_shardings=shd.replicated(mesh))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    return StepFns(train_step, eval_step, init, state_sh, batch_sh, abstract)


def state_from_params(fns: StepFns, tx: optax.GradientTransformation, params) -> dict:
    """A fresh state (zero moments, step 0) around given parameters, placed with the state shardings; a DPO
    state's reference weights are these parameters."""
    params = jax.device_put(params, fns.state_shardings["params"])
    dtype_of = lambda key: (None if key not in fns.abstract_state  # noqa: E731
                            else jax.tree.leaves(fns.abstract_state[key]["layers"])[0].dtype)
    make = jax.jit(lambda p: fresh_state(p, tx, dtype_of("compute_params"), dtype_of("ref_params")),
                   out_shardings=fns.state_shardings, donate_argnums=(0,))
    return make(params)
