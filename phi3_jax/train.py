"""`python -m phi3_jax.train --config configs/FILE.py[:ARG] --workdir DIR [--config.a.b=value ...]`

Trains a Phi-3-family model from a config file (see phi3_jax/train_config.py for the sections) and
resumes from WORKDIR/checkpoints when the same command runs again. `--init_from PATH` starts from the
weights of a Hugging Face folder, a phi3_jax checkpoint or another workdir (fine-tuning; optimizer state
and step start fresh; ignored when the workdir already holds a checkpoint). `--branch_from PATH` starts a
new workdir from another run's training checkpoint as a resume would (weights, optimizer state, step and data
position; the config may differ): with `train.decay_steps` (warmup-stable-decay), a decay branched from a
checkpoint of the stable phase gives the run that would have been trained with that many steps.

Writes WORKDIR/metrics.jsonl, WORKDIR/tensorboard/ and WORKDIR/checkpoints/ (loadable with
`phi3_jax.load(WORKDIR)`), shows a progress bar, and prints a sample of the trained model at the end.
SIGTERM / SIGINT save a checkpoint at the current step and exit cleanly (a second SIGINT aborts).

Multi-host: pass --coordinator_address HOST:PORT --num_processes N --process_id I (or set
PHI3_COORDINATOR_ADDRESS / PHI3_NUM_PROCESSES / PHI3_PROCESS_ID, or PHI3_DISTRIBUTED=1 on managed
clusters); every process runs the same command.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np

from phi3_jax import sharding as shd
from phi3_jax import train_config as tcfg

_DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.py"
# A DPO step's metrics beside the loss, averaged over the steps of a log row (see train_state.dpo_sums).
DPO_STEP_METRICS = ("accuracy", "reward_chosen", "reward_rejected")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); the message says why."""


@dataclasses.dataclass
class Result:
    status: str  # "done" | "preempted" | "complete" (nothing left to do)
    step: int
    losses: dict[int, float]
    eval_loss: float | None
    unigram_entropy: float | None
    sample: str | None
    workdir: str
    eval_accuracy: float | None = None  # DPO: the share of held-out pairs the model ranks right


class _Signals:
    """SIGTERM / SIGINT -> a flag the loop checks after each step; a second SIGINT raises at once."""

    def __init__(self):
        self.received: str | None = None
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def stop_requested(self) -> bool:
        flag = self.received is not None
        if jax.process_count() > 1:  # every process must stop (and save) at the same step
            from jax.experimental import multihost_utils

            flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
        return flag


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def _global_sum(x: float) -> float:
    """`x` summed over processes (every process must call it)."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return float(np.sum(multihost_utils.process_allgather(np.float32(x))))


def _eval_metrics(total: dict[str, float], suffix: str = "") -> dict[str, float]:
    """Means of summed eval metrics: "eval_loss" (per trained token, or per pair for DPO) and DPO's
    "eval_accuracy", "eval_reward_chosen", "eval_reward_rejected"; each name + suffix."""
    n = max(total["count"], 1.0)
    out = {"eval_loss": total["loss"] / n}
    if "correct" in total:
        out["eval_accuracy"] = total["correct"] / n
        out.update({f"eval_{k}": total[k] / n for k in ("reward_chosen", "reward_rejected")})
    return {k + suffix: v for k, v in out.items()}


def _metrics_text(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in values.items())


def _log_config_changes(changes: list[str]) -> None:
    if changes:  # e.g. a longer run or a new learning rate: allowed, but never silent
        _log(f"config changed since that checkpoint ({len(changes)}): " + "; ".join(changes[:8])
             + (f"; and {len(changes) - 8} more" if len(changes) > 8 else ""))


def run(config, workdir: str, init_from: str | None = None, *, branch_from: str | None = None, lr_multipliers=None,
        wd_multipliers=None) -> Result:
    """Trains as configured; returns what happened. Raises ConfigError / DataError / CheckpointError /
    ShardingError / TrainingError with one message each; user errors are raised before anything is written.

    lr_multipliers / wd_multipliers (a callable path -> float, or (regex, value) pairs; see phi3_jax.optim)
    take the place of the config's train.lr_mults / train.wd_mults: the hook for rules a config cannot hold."""
    from phi3_jax import checkpoint as ckpt_lib
    from phi3_jax import optim
    from phi3_jax import train_data
    from phi3_jax import train_state as ts
    from phi3_jax.data import DataError, make_tokenizer_from_config, unigram_entropy
    from phi3_jax.metrics import MetricsWriter, StepProfiler, mfu, peak_flops

    # ---- everything a user can get wrong is checked before the workdir is touched ----
    r = tcfg.validate(config)
    t = r.train
    tokenizer = make_tokenizer_from_config(r.raw["data"])
    model_cfg = tcfg.resolve_model(r, tokenizer)
    mesh = shd.make_mesh(r.mesh)
    n_batch = shd.batch_axis_size(mesh)
    if (t.batch_size // t.grad_accum) % n_batch:
        raise shd.ShardingError(f"config.train.batch_size={t.batch_size} (grad_accum={t.grad_accum}): each microbatch "
                                f"must split evenly over the {n_batch} batch shards of mesh {dict(mesh.shape)}")
    num_shards = t.data_shards or jax.process_count()
    shards = train_data.shard_ids(mesh, t.batch_size, t.seq_len, num_shards)
    align = train_data.packing_alignment(model_cfg, t.seq_len)
    pairs = t.objective == "dpo"
    feed = train_data.DataFeed(r.raw["data"], tokenizer, t.seq_len, t.batch_size, t.seed, shards, num_shards,
                               align=align, pairs=pairs)
    initial_data_state = feed.get_state()
    next(feed)  # reads from every source now: a missing or bad file fails here, not mid-run
    feed.set_state(initial_data_state)
    workdir_p = Path(workdir)
    existing = next(p for p in (workdir_p, *workdir_p.parents) if p.exists())
    if not existing.is_dir():
        raise tcfg.ConfigError(f"--workdir {workdir}: {existing} is a file, not a directory")
    if model_cfg.attention_impl == "cudnn" and jax.default_backend() != "gpu":
        raise tcfg.ConfigError(f"config.model.attention_impl='cudnn' needs a GPU; this run's devices are "
                               f"{jax.default_backend()} (use 'auto' or 'xla')")
    resuming = (workdir_p / ckpt_lib.WORKDIR_CHECKPOINTS).is_dir() and ckpt_lib._steps(
        workdir_p / ckpt_lib.WORKDIR_CHECKPOINTS)
    if init_from and branch_from:
        raise tcfg.ConfigError("--init_from and --branch_from: give one (weights only, or a whole training state)")
    if init_from and not resuming:  # a resumed run restores its own weights; init_from may be gone by then
        ckpt_lib.resolve(init_from)  # a missing or unrecognised path fails before anything is written
    branch = None
    if branch_from and not resuming:
        branch = ckpt_lib.resolve(branch_from)
        if branch.kind == "hf" or not (branch.step_dir / ckpt_lib.TRAIN_STATE_ITEM).is_dir():
            raise ckpt_lib.CheckpointError(f"--branch_from {branch_from}: holds weights only, no training state "
                                           "(optimizer, step, data position); --init_from starts from weights")
    first = []
    if not resuming:
        first = list(itertools.islice(feed, 8))
        feed.set_state(initial_data_state)
        if _global_sum(sum(float(b["loss_mask"].sum()) for b in first)) == 0:
            raise DataError("the first 8 batches hold no token to train on (every loss_mask is 0): are these "
                            "conversations without assistant replies? check config.data.sources")

    abstract_params = ckpt_lib.abstract_params(model_cfg, r.precision["param_dtype"])
    tx, schedule = optim.make_optimizer_from_config(abstract_params, t, lr_multipliers=lr_multipliers,
                                                    wd_multipliers=wd_multipliers)
    fns = ts.build(model_cfg, tx, mesh, compute_dtype=r.precision["compute_dtype"], grad_accum=t.grad_accum,
                   loss_chunks=t.loss_chunks, seed=t.seed, sequence_parallel=r.sequence_parallel,
                   objective=t.objective, dpo=ts.DPOLoss.from_config(t))
    lr_at = jax.jit(schedule)

    # ---- state: resume, branch_from, init_from, or fresh ----
    if resuming:
        ckpt = ckpt_lib.TrainCheckpointer(workdir_p, keep_last=t.keep_last, keep_every=t.keep_every,
                                          async_save=t.async_checkpoint)
        start = ckpt.latest_step()
        state = ckpt.restore(start, fns.abstract_state, model_cfg, feed, r.raw)
        _log(f"resumed from {ckpt.directory / str(start)}"
             + "".join(f" (--{flag} {path} applies to a fresh workdir only)"
                       for flag, path in (("init_from", init_from), ("branch_from", branch_from)) if path))
        _log_config_changes(ckpt_lib.config_changes(ckpt.directory / str(start), r.raw))
    elif branch:
        source = ckpt_lib.TrainCheckpointer(branch.path, read_only=True)
        try:
            state = source.restore(branch.step, fns.abstract_state, model_cfg, feed, r.raw)
        finally:
            source.close()
        start = branch.step
        _log(f"branched from {branch.step_dir}")
        _log_config_changes(ckpt_lib.config_changes(branch.step_dir, r.raw))
        workdir_p.mkdir(parents=True, exist_ok=True)
        ckpt = ckpt_lib.TrainCheckpointer(workdir_p, keep_last=t.keep_last, keep_every=t.keep_every,
                                          async_save=t.async_checkpoint)
    else:
        if init_from:
            src_cfg = ckpt_lib.read_config(init_from).to_dict()
            differ = sorted(k for k, v in model_cfg.to_dict().items()
                            if k not in ("param_dtype", "dtype", "attention_impl", "remat", "scan_layers")
                            and src_cfg.get(k) != v)
            if differ:
                _log(f"warning: the model config differs from {init_from}'s in {differ}; only parameter shapes "
                     "must match, check that the rest is intended")
            params = ckpt_lib.restore_params(init_from, model_cfg, r.precision["param_dtype"],
                                             fns.state_shardings["params"])
            state = ts.state_from_params(fns, tx, params)
            _log(f"initialised weights from {init_from}")
        else:
            state = fns.init(t.seed)
        workdir_p.mkdir(parents=True, exist_ok=True)
        ckpt = ckpt_lib.TrainCheckpointer(workdir_p, keep_last=t.keep_last, keep_every=t.keep_every,
                                          async_save=t.async_checkpoint)
        start = 0

    writer = MetricsWriter(workdir_p, start_step=start, total_steps=t.steps, tensorboard=t.tensorboard,
                           progress=t.progress)
    n_params = model_cfg.param_count()
    # Forward + backward is 3 forward passes; DPO's reference model adds a fourth.
    flops_tok = model_cfg.flops_per_token(t.seq_len) * (4 / 3 if pairs else 1)
    peak = peak_flops()
    name = tcfg.model_name(r.raw["model"]["preset"], model_cfg)
    sp = " (sequence parallel)" if r.sequence_parallel else ""
    writer.message(f"model {name}: {n_params / 1e6:.2f}M parameters, {flops_tok / 1e6:.1f} MFLOP/token; mesh "
                   f"{dict(mesh.shape)}{sp}; {jax.process_count()} process(es), {jax.device_count()} device(s) "
                   f"({jax.devices()[0].device_kind})")
    for what, given, rules in (("learning rate", lr_multipliers, t.lr_mults),
                               ("weight decay", wd_multipliers, t.wd_mults)):
        if given is not None:
            writer.message(f"{what} multipliers: from run()'s argument, not the config")
        elif rules:
            cover = optim.rule_coverage(abstract_params, rules)
            writer.message(f"{what} multipliers (the first match wins, others x1): "
                           + optim.describe_rules(rules, cover))
    h = None
    # The unigram entropy is the bar for the next-token loss; DPO's loss is not one.
    if start == 0 and not pairs and any(b["loss_mask"].any() for b in first):  # a process's rows may have none
        h = unigram_entropy(first)
        padding = float(np.mean([np.mean(b["segment_ids"] == 0) for b in first]))
        writer.write(0, {"unigram_entropy": h, "padding_fraction": padding})
        writer.message(f"unigram entropy of the training tokens: {h:.4f} nats/token; padding: {100 * padding:.1f}% "
                       "of the packed tokens (first 8 batches)")
    if align is not None:
        writer.message(f"block-sparse layers: packed documents longer than {align.max_unaligned} tokens start at "
                       f"row offsets that are multiples of {align.period} (the gaps hold shorter documents or padding)")

    evals: dict[str, list] = {}  # source name -> its held-out global batches
    if t.eval_every > 0:
        held_out = {name: batches for name, batches in train_data.eval_batches(
            r.raw["data"], tokenizer, t.seq_len, t.batch_size, shards, num_shards, t.eval_steps, align,
            pairs=pairs).items() if batches}
        if not held_out:
            writer.message(f"no evaluation: the data has no held-out rows (data.eval_fraction="
                           f"{r.raw['data']['eval_fraction']}) for train.eval_every={t.eval_every}")
        elif _global_sum(sum(float(b["loss_mask"].sum()) for bs in held_out.values() for b in bs)) == 0:
            writer.message("no evaluation: the held-out rows hold no token to train on (conversations without "
                           "assistant replies?)")
        else:
            evals = {name: [shd.make_global_batch(mesh, b, t.batch_size) for b in bs] for name, bs in held_out.items()}

    def evaluate() -> dict[str, float]:
        """{"eval_loss"} (+ for DPO "eval_accuracy", the share of held-out pairs ranked right, and
        "eval_reward_chosen" / "eval_reward_rejected", the mean implicit rewards) over every source's held-out
        batches; with several sources, each one's as well ("eval_loss/NAME", ...)."""
        sums = jax.device_get({name: [fns.eval_step(state, b) for b in bs] for name, bs in evals.items()})
        per_source = {name: {k: sum(float(s[k]) for s in ss) for k in ss[0]} for name, ss in sums.items()}
        out = _eval_metrics({k: sum(p[k] for p in per_source.values()) for k in next(iter(per_source.values()))})
        if len(per_source) > 1:
            for name, total in per_source.items():
                if total["count"]:
                    out.update(_eval_metrics(total, f"/{name}"))
        return out

    losses: dict[int, float] = {}
    window = {"loss": 0.0, "n": 0, "gn": 0.0, "t0": None, "tokens": 0, **{k: 0.0 for k in DPO_STEP_METRICS}}
    tokens_per_step = t.batch_size * t.seq_len
    # The tokens (row positions, padding included) and model FLOPs trained on so far, the x axes of
    # loss-against-data and -compute plots: counted on the host and kept with each checkpoint, so they stay
    # right when a resumed run changes train.batch_size or seq_len.
    saved_progress = (ckpt.directory / str(start) if resuming else branch.step_dir if branch else None)
    trained = (ckpt_lib.read_progress(saved_progress) if saved_progress else None) or {
        "tokens": start * tokens_per_step, "flops": float(start * tokens_per_step * flops_tok)}  # older checkpoints
    status, last_saved, evaluated = "done", start, {}
    data_state = feed.get_state()
    if t.eval_on_start and evals and not resuming and start < t.steps:
        evaluated = evaluate()  # the starting weights' held-out figures: the baseline of a fine-tuning run
        writer.write(start, {**evaluated, **trained})
        writer.message(f"step {start}: " + _metrics_text(evaluated))

    def handle(step: int, m: dict, progress: dict, phase_start: tuple[int, str] | None,
               force_log: bool = False) -> None:
        if phase_start is not None:  # the first step of a data phase (configs with several)
            writer.write(step, {"phase_index": phase_start[0], "phase": phase_start[1]})
            writer.message(f"step {step}: data phase {phase_start[1]!r} begins")
        m = jax.device_get(m)
        loss, finite = float(m["loss"]), bool(m["finite"])
        losses[step] = loss
        if finite:
            window["loss"] += loss
            window["gn"] += float(m["grad_norm"])
            for k in DPO_STEP_METRICS:
                window[k] += float(m.get(k, 0.0))
            window["n"] += 1
        window["tokens"] += tokens_per_step
        if int(m["nonfinite_run"]) >= t.max_nonfinite_in_a_row:
            raise TrainingError(
                f"stopping at step {step}: {int(m['nonfinite_run'])} steps in a row had a non-finite loss or "
                f"gradient (train.max_nonfinite_in_a_row={t.max_nonfinite_in_a_row}); their updates were skipped. "
                + (f"The last checkpoint (step {last_saved}) is intact. " if last_saved else
                   "No checkpoint was saved before it. ") + "Lower train.lr or check the data.")
        first = window["t0"] is None  # the first step includes compilation: time from its end
        if step % t.log_every == 0 or step == t.steps or force_log:
            now = time.perf_counter()
            tps = window["tokens"] / max(now - window["t0"], 1e-9) if window["tokens"] and not first else None
            applied = step - int(m["skipped"])
            row = {"loss": window["loss"] / window["n"] if window["n"] else loss,
                   "lr": float(lr_at(np.int32(max(applied - 1, 0)))),
                   "grad_norm": window["gn"] / window["n"] if window["n"] else float(m["grad_norm"]),
                   "tokens_per_sec": tps, "mfu": mfu(tps, flops_tok, jax.device_count(), peak) if tps else None,
                   "skipped": int(m["skipped"]), **progress}
            for k in DPO_STEP_METRICS:  # DPO, before each update: pairs ranked right, the mean implicit rewards
                if k in m:
                    row[k] = window[k] / window["n"] if window["n"] else float(m[k])
            writer.write(step, row)
            logged["loss"], logged["n"] = row["loss"], window["n"]
            writer.progress(step, loss=row["loss"], **({"tok/s": f"{tps:,.0f}"} if tps else {}))
            window.update(loss=0.0, n=0, gn=0.0, t0=now, tokens=0, **{k: 0.0 for k in DPO_STEP_METRICS})
        if first:
            # The next step is already in flight (dispatched before this one was read) and may have finished
            # during this call: its tokens do not count against the time from here.
            window["t0"], window["tokens"] = time.perf_counter(), -tokens_per_step

    logged: dict[str, float] = {}
    pending = None
    profiler = StepProfiler(workdir_p / "tensorboard", *t.profile_steps) if t.profile_steps else None
    # The phase of the batch last read: a fresh run announces its first phase too, a resumed one a change.
    phase = None if start == 0 else feed.phase_index
    try:
        with _Signals() as sig:
            for step in range(start, t.steps):
                try:
                    batch_np = next(feed)
                except StopIteration:
                    writer.message(f"the data ran out after step {step} (the last phase has a token budget)")
                    break
                data_state = feed.get_state()
                phase_start = None
                if len(r.data.phases) > 1 and feed.phase_index != phase:
                    phase = feed.phase_index
                    phase_start = (phase, feed.phase_name)
                batch = shd.make_global_batch(mesh, batch_np, t.batch_size)
                if profiler:
                    profiler.before(step + 1)
                state, metrics = fns.train_step(state, batch)
                if profiler and profiler.after(step + 1, metrics):
                    writer.message(f"profile of steps {profiler.first}-{step + 1} written under "
                                   f"{profiler.directory / 'plugins' / 'profile'}")
                if pending is not None:
                    handle(*pending)
                trained = {"tokens": trained["tokens"] + tokens_per_step,
                           "flops": trained["flops"] + tokens_per_step * flops_tok}
                pending = (step + 1, metrics, trained, phase_start)
                s = step + 1
                if evals and s % t.eval_every == 0 and s != t.steps:
                    handle(*pending)
                    pending = None
                    t_eval = time.perf_counter()
                    evaluated = evaluate()
                    if window["t0"] is not None:  # tokens/s counts training time only
                        window["t0"] += time.perf_counter() - t_eval
                    writer.write(s, {**evaluated, **trained})
                    writer.message(f"step {s}: " + _metrics_text(evaluated))
                stop = sig.stop_requested()
                if stop or (t.checkpoint_every and s % t.checkpoint_every == 0):
                    ckpt.save(s, state, data_state, model_cfg, r.raw, progress=trained)
                    last_saved = s
                if stop:
                    if pending is not None:
                        handle(*pending, force_log=True)  # the steps since the last log row are not lost
                        pending = None
                    ckpt.wait()
                    status = "preempted"
                    writer.message(f"received {sig.received} at step {s}: checkpoint saved to "
                                   f"{ckpt.directory / str(s)}; run the same command to resume")
                    break
            if pending is not None:
                handle(*pending, force_log=True)
                pending = None
            final_step = int(jax.device_get(state["step"]))
            if status == "done":  # still under the handlers: a signal now waits for this save
                if final_step != last_saved:
                    ckpt.save(final_step, state, data_state, model_cfg, r.raw, progress=trained)
                ckpt.wait()
                if sig.received:  # the run is complete and saved; skip the final eval and sample
                    writer.message(f"received {sig.received} after the last step: checkpoint saved to "
                                   f"{ckpt.directory / str(final_step)}")
                elif evals and start < t.steps:  # a finished run restarted has its final eval already
                    evaluated = evaluate()
                    writer.write(final_step, {**evaluated, **trained})
    except BaseException:
        writer.close()
        ckpt.close()
        raise
    finally:
        if profiler:
            profiler.close()
    if start >= t.steps:
        status = "complete"
    writer.close()
    ckpt.close()

    sample = None
    if status != "preempted" and not sig.received and r.sample.max_new_tokens > 0:
        from phi3_jax.generate import sample_text

        sample = sample_text((ts.graphdef_of(model_cfg), state["params"]), tokenizer, r.sample.prompt,
                             r.sample.max_new_tokens, temperature=r.sample.temperature, seed=r.sample.seed,
                             chat=r.sample.chat)
    summary = f"step {final_step}/{t.steps}"
    if "loss" in logged:
        n = logged["n"]  # finite steps since the previous log: fewer than log_every after a resume or at the end
        summary += f", loss {logged['loss']:.4f} " + (f"(mean of the last {n} steps)" if n > 1 else "(the last step)")
    if evaluated:
        summary += ", " + _metrics_text(evaluated)
    if h is not None:
        summary += f" (unigram entropy {h:.4f})"
    _log(f"{status}: {summary}; checkpoints in {ckpt.directory}")
    if sample is not None:
        _log(f"sample (user message {r.sample.prompt!r}, chat template {tokenizer.chat_template!r}):\n{sample}"
             if r.sample.chat else f"sample (prompt {r.sample.prompt!r}):\n{r.sample.prompt}{sample}")
    return Result(status=status, step=final_step, losses=losses, eval_loss=evaluated.get("eval_loss"),
                  unigram_entropy=h, sample=sample, workdir=str(workdir_p),
                  eval_accuracy=evaluated.get("eval_accuracy"))


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

@functools.cache  # absl flags may be defined only once per process
def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", str(_DEFAULT_CONFIG) if _DEFAULT_CONFIG.exists() else None,
        "Config file with get_config(arg): configs/FILE.py[:ARG]. Override fields with --config.SECTION.FIELD=value.",
        lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs (resumes if it "
                        "holds checkpoints).")
    flags.DEFINE_string("init_from", None, "Initial weights: a Hugging Face folder, phi3_jax checkpoint or workdir.")
    flags.DEFINE_string("branch_from", None, "Start a new workdir from another run's training checkpoint (a workdir: "
                        "its latest; or WORKDIR/checkpoints/STEP) as a resume would: weights, optimizer state, step "
                        "and data position.")
    flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0.")
    flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
    flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
    return flags.FLAGS


def parse_flags(argv):
    """absl parsing with one clear line for unknown config fields or bad values (no traceback)."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        # A config file that raises puts its whole traceback in the message; its last line says what failed.
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        head = lines[0].split(":")[0] if lines else "flags"
        sys.stderr.write(f"error: {head}: {lines[-1].strip()}\n" if len(lines) > 1 else f"error: {e}\n")
        sys.exit(2)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        bad = next((a for a in argv[1:] if a.startswith("--config.")), "")
        # ml_collections puts the field and a suggestion in args[0], quoted; show them as plain text.
        why = " ".join(str(e.args[0] if e.args else e).replace("\\n", "\n").split("\n")).replace("\\'", "'")
        why = why.strip()
        if len(why) > 1 and why[0] == why[-1] == "'":
            why = why[1:-1]
        sys.stderr.write(f"error: {bad.split('=')[0] or 'the command line'}: unknown config field or bad value: "
                         f"{why}\n")
        sys.exit(2)


def main(argv) -> None:
    from phi3_jax.checkpoint import CheckpointError
    from phi3_jax.data import DataError
    from phi3_jax.model.config import ConfigError

    FLAGS = _define_flags()
    if len(argv) > 1:
        sys.stderr.write(f"error: unexpected arguments {argv[1:]}\n")
        sys.exit(2)
    if not FLAGS.workdir:
        sys.stderr.write("error: --workdir is required\n")
        sys.exit(2)
    if FLAGS.config is None:
        sys.stderr.write("error: --config is required (e.g. --config configs/tiny.py)\n")
        sys.exit(2)
    shd.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    try:
        result = run(FLAGS.config, FLAGS.workdir, FLAGS.init_from, branch_from=FLAGS.branch_from)
    except (ConfigError, DataError, CheckpointError, shd.ShardingError, TrainingError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    sys.exit(0 if result.status in ("done", "preempted", "complete") else 1)


def cli() -> None:
    from absl import app, logging

    _define_flags()
    if not any(a.startswith(("--verbosity", "-v", "--v=")) for a in sys.argv[1:]):
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()


__all__ = ["run", "Result", "TrainingError", "cli"]
