"""The training config: sections, defaults, validation, and the ModelConfig it resolves to.

A config file (`configs/*.py`) defines `get_config(arg)` returning `default_config()` with its changes.
Sections:

  model      preset (a name in phi3_jax.model.PRESETS; it also fills the fields the section lacks) plus every
             ModelConfig field, filled from the preset by `model_section(preset, **overrides)` so that each
             one can be set on the command line (--config.model.num_layers=4). vocab_size=-1 takes the
             tokenizer's.
             param_dtype / dtype are not here: they come from `precision`.
  data       phi3_jax.data's ConfigDict (`default_data_config()`), validated by phi3_jax.data.
  train      steps, batch_size (global, in sequences), seq_len, lr, min_lr_ratio, warmup_steps,
             schedule (cosine | linear | sqrt | constant: the decay after the warmup, sqrt = 1 - sqrt of its
             progress), decay_steps (0: the decay spans every step after the warmup; N > 0: the last N
             steps only, the learning rate held at lr before them: warmup-stable-decay, which lets a run
             be resumed with a larger train.steps before its decay began as if set so from the start),
             weight_decay, b1, b2, eps, clip_norm (<= 0: off),
             lr_mults / wd_mults (per-parameter multipliers of the learning rate / the weight decay:
             (regex, value) pairs tried in order on paths like "layers/mlp/down_proj/kernel", the first
             match wins, 1 where none matches; wd_mults defaults to optim.DEFAULT_WD_RULES, no decay of
             norms, biases and the embedding; () decays everything. A pair that applies to no parameter
             is refused. On the command line: --config.train.lr_mults="(('embed_tokens/', 0.1),)"),
             grad_accum (microbatches per step), loss_chunks (1: the head's logits gradient is kept
             from the forward pass, the fastest; N > 1: the head and loss run over N slices of the
             sequence and recompute the logits in the backward pass, so no [batch, seq, vocab] array
             is kept: for large vocabularies on memory-bound slices; DPO's per-token head alike),
             log_every, eval_every (0: never), eval_steps (held-out batches of each source a phase weights,
             each source packed alone: eval_loss pools them, and with several sources each one's is logged
             too, eval_loss/NAME), eval_on_start (also evaluate the weights a fresh or branched run
             starts from, logged at its first step: the baseline of a fine-tuning run),
             profile_steps ((first, last): a jax.profiler trace of those steps, 1-based as logged, into
             WORKDIR/tensorboard for TensorBoard's profile tab or xprof; (): none),
             checkpoint_every (0: only at the end / on a signal), keep_last, keep_every (0: none kept
             beyond the last ones), max_nonfinite_in_a_row, seed, data_shards (slices of the global batch
             the data pipeline is split into; 0: one per process; fix it to compare runs across process
             counts), async_checkpoint, tensorboard, progress,
             objective: "lm" (next-token loss on the trained tokens: pretraining and SFT) or "dpo" (direct
             preference optimisation on preference pairs, against the weights the run starts from; the data
             sources then give pairs, see phi3_jax.data), dpo_beta (DPO's beta > 0), dpo_loss ("sigmoid":
             DPO; "ipo"; "hinge": train_state.DPOLoss), dpo_label_smoothing (in [0, 0.5), sigmoid only:
             conservative DPO), dpo_rpo_alpha (>= 0: weight of the chosen reply's NLL per token, RPO).
  mesh       data, fsdp, tensor, expert: sizes of the device mesh axes (-1: the remaining devices);
             sequence_parallel (bool): with tensor > 1, the residual stream between the tensor-parallel
             matmuls split over `tensor` by sequence (Megatron sequence parallelism; sharding.SEQUENCE_PARALLEL).
  precision  param_dtype (master weights and optimizer state; float32), compute_dtype (bfloat16 | float32).
  sample     prompt, chat (the prompt is a user message, wrapped in the tokenizer's chat template as
             `phi3_jax.generate --chat` does), max_new_tokens (0: no sample at the end), temperature
             (0: greedy), seed.

`validate(config)` checks every section before anything is written: an unknown field or a value of the
wrong type raises `ConfigError` naming the field (`config.train.stpes: unknown field ...`).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
import types
import typing
from typing import Any

import ml_collections
from ml_collections import config_dict

from phi3_jax.model.config import ConfigError, ModelConfig
from phi3_jax.optim import DEFAULT_WD_RULES, SCHEDULES

SECTIONS = ("model", "data", "train", "mesh", "precision", "sample")
_MODEL_DTYPE_FIELDS = ("param_dtype", "dtype")


def train_defaults() -> dict[str, Any]:
    return dict(
        steps=1000, batch_size=8, seq_len=256, lr=1e-3, min_lr_ratio=0.1, warmup_steps=100, schedule="cosine",
        decay_steps=0, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0, grad_accum=1, loss_chunks=1,
        log_every=10, eval_every=100, eval_steps=4, eval_on_start=False, checkpoint_every=500, keep_last=2,
        keep_every=0, max_nonfinite_in_a_row=10, seed=0, data_shards=0, async_checkpoint=True, tensorboard=True,
        progress=True, objective="lm", dpo_beta=0.1, dpo_loss="sigmoid", dpo_label_smoothing=0.0, dpo_rpo_alpha=0.0,
        lr_mults=(), wd_mults=tuple(DEFAULT_WD_RULES), profile_steps=(),
    )


DPO_LOSSES = ("sigmoid", "ipo", "hinge")


def mesh_defaults() -> dict[str, Any]:
    return dict(data=1, fsdp=-1, tensor=1, expert=1, sequence_parallel=False)


def precision_defaults() -> dict[str, str]:
    return dict(param_dtype="float32", compute_dtype="bfloat16")


def sample_defaults() -> dict[str, Any]:
    return dict(prompt="Title: Arithmetic practice for children\n\n", chat=False, max_new_tokens=200, temperature=0.0,
                seed=0)


def _field_type(name: str):
    """The ConfigDict type of a ModelConfig field (for None defaults: the non-None annotation)."""
    hints = typing.get_type_hints(ModelConfig)
    t = hints[name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        if len(args) == 1:
            return typing.get_origin(args[0]) or args[0]
        return object
    return typing.get_origin(t) or t


def model_section(preset: str, **overrides) -> ml_collections.ConfigDict:
    """The model section for a preset with overrides: every ModelConfig field present and typed."""
    from phi3_jax.model import PRESETS  # registers every family's presets

    if preset not in PRESETS:
        raise ConfigError(f"config.model.preset={preset!r}: unknown preset; known: {sorted(PRESETS)}")
    names = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in _MODEL_DTYPE_FIELDS]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ConfigError(f"config.model.{unknown[0]}: unknown ModelConfig field")
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    values = {**defaults, **PRESETS[preset], **overrides}
    c = ml_collections.ConfigDict()
    c.preset = preset
    for name in names:
        v, t = values[name], _field_type(name)
        if isinstance(v, list):
            v = tuple(v)
        if v is None or t is object:
            c[name] = config_dict.FieldReference(v, field_type=t)
        else:
            c[name] = v
    return c


def textbook_cpu_run(c: ml_collections.ConfigDict, *, steps: int = 200, batch_size: int = 16,
                     lr: float = 3e-3) -> ml_collections.ConfigDict:
    """The CPU variant every config file offers: generated textbook lessons, byte tokenizer, 256-token
    rows, float32 compute (bf16 matmuls are slow on most CPUs), a sample prompt in the lessons' format."""
    d = c.data
    d.sources = [dict(d.sources[0], name="textbook", kind="textbook", weight=1.0)]
    d.phases = [dict(name="pretrain", tokens=0, weights={})]
    d.eval_fraction, d.eval_max_docs = 0.001, 64
    t = c.train
    t.steps, t.batch_size, t.seq_len, t.lr, t.warmup_steps = steps, batch_size, 256, lr, max(1, steps // 10)
    t.log_every, t.eval_every, t.eval_steps, t.checkpoint_every = 10, 100, 4, 100
    c.precision.compute_dtype = "float32"
    c.sample.prompt = "Exercise 1: What is 12 + 7?\nSolution:"
    return c


def pretrain_run(c: ml_collections.ConfigDict, *, batch_size: int, seq_len: int, lr: float,
                 checkpoint_every: int = 1000) -> ml_collections.ConfigDict:
    """Full-size pretraining shared by the released-variant configs: AdamW (0.9, 0.95), cosine decay to
    10%, FSDP over every device, bf16 compute over float32 master weights, a chat-format sample."""
    t = c.train
    t.steps, t.batch_size, t.seq_len = 100_000, batch_size, seq_len
    t.lr, t.warmup_steps, t.min_lr_ratio, t.schedule = lr, 2000, 0.1, "cosine"
    t.weight_decay, t.b1, t.b2, t.clip_norm = 0.1, 0.9, 0.95, 1.0
    t.log_every, t.eval_every, t.eval_steps = 10, 1000, 20
    t.checkpoint_every, t.keep_last, t.keep_every = checkpoint_every, 2, 10_000
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.precision.param_dtype, c.precision.compute_dtype = "float32", "bfloat16"
    c.sample.prompt, c.sample.chat = "What is 12 + 7?", True
    return c


def default_config() -> ml_collections.ConfigDict:
    from phi3_jax.data.config import default_data_config

    c = ml_collections.ConfigDict()
    c.model = model_section("phi-3-tiny")
    c.data = default_data_config()
    c.train = train_defaults()
    c.mesh = mesh_defaults()
    c.precision = precision_defaults()
    c.sample = sample_defaults()
    return c


# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------

def _plain(x):
    if isinstance(x, ml_collections.ConfigDict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, config_dict.FieldReference):
        return _plain(x.get())
    return x


def _check_type(where: str, value, default):
    kind = type(default)
    if kind is tuple and isinstance(value, list):  # a config file's list, or the checkpoint's JSON
        value = tuple(value)
    if kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        return float(value)
    if kind is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {kind.__name__}, got {type(value).__name__} ({value!r})")


def _check_section(name: str, given: dict, defaults: dict) -> dict:
    if not isinstance(given, dict):
        raise ConfigError(f"config.{name}: expected a section (dict of fields), got {type(given).__name__}")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"config.{name}.{unknown[0]}: unknown field; known fields: {', '.join(sorted(defaults))}")
    return {k: _check_type(f"config.{name}.{k}", given[k], d) if k in given else d for k, d in defaults.items()}


def _positive(section: str, d: dict, *names, allow_zero=False):
    for n in names:
        if d[n] < 0 or (d[n] == 0 and not allow_zero):
            raise ConfigError(f"config.{section}.{n}={d[n]!r}: must be {'>= 0' if allow_zero else '> 0'}")


def _check_rules(where: str, rules: tuple) -> tuple[tuple[str, float], ...]:
    """Per-parameter multiplier rules: (regex, value >= 0) pairs."""
    out = []
    for i, rule in enumerate(rules):
        if (not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str)
                or not isinstance(rule[1], numbers.Real) or isinstance(rule[1], bool)):
            raise ConfigError(f"{where}[{i}]={rule!r}: expected a (regex, multiplier) pair, "
                              "e.g. ('layers/mlp/', 0.5)")
        pattern, value = rule
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{where}[{i}]: {pattern!r} is not a regular expression ({e})") from None
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{where}[{i}]=({pattern!r}, {value!r}): the multiplier must be a finite number >= 0")
        out.append((pattern, float(value)))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Resolved:
    """The checked config: plain dicts per section and the ModelConfig (vocab_size may still be -1)."""
    model: ModelConfig | None
    model_fields: dict
    data: Any  # phi3_jax.data DataSpec
    train: types.SimpleNamespace
    mesh: dict  # axis sizes (data, fsdp, tensor, expert)
    precision: dict
    sample: types.SimpleNamespace
    raw: dict  # the whole config as plain Python (JSON-able), saved with checkpoints
    sequence_parallel: bool = False  # config.mesh.sequence_parallel


def validate(config) -> Resolved:
    """Checks every section; raises ConfigError / DataError naming the field. Writes nothing."""
    if type(config).__name__ == "_ErrorConfig":  # ml_collections' stand-in for a config file that failed to load
        error = object.__getattribute__(config, "_error")
        raise ConfigError(f"--config: cannot load the config file: {str(error).strip().splitlines()[-1]}")
    raw = _plain(config)
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a ConfigDict, got {type(config).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"config.{unknown[0]}: unknown section; known sections: {', '.join(SECTIONS)}")
    missing = [s for s in ("model", "data", "train") if s not in raw]
    if missing:
        raise ConfigError(f"config.{missing[0]}: section missing")

    train = _check_section("train", raw["train"], train_defaults())
    # eps > 0: Adam divides a zero gradient's zero moment by sqrt(0) + eps.
    _positive("train", train, "steps", "batch_size", "seq_len", "grad_accum", "loss_chunks", "log_every", "eval_steps",
              "keep_last", "max_nonfinite_in_a_row", "eps")
    _positive("train", train, "lr", "warmup_steps", "decay_steps", "weight_decay", "eval_every", "checkpoint_every",
              "keep_every", "data_shards", allow_zero=True)
    if train["objective"] not in ("lm", "dpo"):
        raise ConfigError(f"config.train.objective={train['objective']!r}: must be 'lm' or 'dpo'")
    if not train["dpo_beta"] > 0:
        raise ConfigError(f"config.train.dpo_beta={train['dpo_beta']}: must be > 0")
    if train["dpo_loss"] not in DPO_LOSSES:
        raise ConfigError(f"config.train.dpo_loss={train['dpo_loss']!r}: must be one of {', '.join(DPO_LOSSES)}")
    smoothing = train["dpo_label_smoothing"]
    if not 0.0 <= smoothing < 0.5:
        raise ConfigError(f"config.train.dpo_label_smoothing={smoothing}: must be in [0, 0.5)")
    if not train["dpo_rpo_alpha"] >= 0:
        raise ConfigError(f"config.train.dpo_rpo_alpha={train['dpo_rpo_alpha']}: must be >= 0")
    if smoothing and train["dpo_loss"] != "sigmoid":
        raise ConfigError(f"config.train.dpo_label_smoothing={smoothing}: applies to dpo_loss='sigmoid' only "
                          f"(it is {train['dpo_loss']!r})")
    profile = train["profile_steps"]
    if profile and not (len(profile) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in profile)
                        and 1 <= profile[0] <= profile[1]):
        raise ConfigError(f"config.train.profile_steps={profile!r}: expected (first, last) steps to trace, "
                          "1 <= first <= last, or () for none")
    if profile and profile[1] > train["steps"]:
        raise ConfigError(f"config.train.profile_steps={profile!r}: the run ends at train.steps={train['steps']}")
    for name in ("lr_mults", "wd_mults"):
        train[name] = _check_rules(f"config.train.{name}", train[name])
    if train["schedule"] not in SCHEDULES:
        raise ConfigError(f"config.train.schedule={train['schedule']!r}: must be one of {', '.join(SCHEDULES)}")
    if train["decay_steps"]:
        after_warmup = train["steps"] - min(train["warmup_steps"], train["steps"])
        if train["schedule"] == "constant":
            raise ConfigError(f"config.train.decay_steps={train['decay_steps']}: schedule 'constant' has no decay "
                              "(set train.schedule to cosine, linear or sqrt, or decay_steps to 0)")
        if train["decay_steps"] > after_warmup:
            raise ConfigError(f"config.train.decay_steps={train['decay_steps']}: longer than the steps after the "
                              f"warmup (train.steps={train['steps']} - train.warmup_steps={train['warmup_steps']})")
    if not 0.0 <= train["min_lr_ratio"] <= 1.0:
        raise ConfigError(f"config.train.min_lr_ratio={train['min_lr_ratio']}: must be in [0, 1]")
    for b in ("b1", "b2"):
        if not 0.0 <= train[b] < 1.0:
            raise ConfigError(f"config.train.{b}={train[b]}: must be in [0, 1)")
    if train["seq_len"] % train["loss_chunks"]:
        raise ConfigError(f"config.train.loss_chunks={train['loss_chunks']}: must divide "
                          f"train.seq_len={train['seq_len']}")
    if train["batch_size"] % train["grad_accum"]:
        raise ConfigError(f"config.train.grad_accum={train['grad_accum']}: must divide "
                          f"train.batch_size={train['batch_size']}")
    if train["data_shards"] and train["batch_size"] % train["data_shards"]:
        raise ConfigError(f"config.train.data_shards={train['data_shards']}: must divide "
                          f"train.batch_size={train['batch_size']}")

    mesh = _check_section("mesh", raw.get("mesh", {}), mesh_defaults())
    sequence_parallel = bool(mesh.pop("sequence_parallel"))
    for k, v in mesh.items():
        if v == 0 or v < -1:
            raise ConfigError(f"config.mesh.{k}={v}: must be a positive integer or -1 (fill)")
    if sum(v == -1 for v in mesh.values()) > 1:
        raise ConfigError("config.mesh: at most one axis may be -1")
    if sequence_parallel and mesh["tensor"] == 1:
        raise ConfigError("config.mesh.sequence_parallel=True splits over the tensor axis: it needs "
                          "config.mesh.tensor > 1")

    precision = _check_section("precision", raw.get("precision", {}), precision_defaults())
    # No float16: its range needs loss scaling, which the train step does not do.
    for k, allowed in (("param_dtype", ("float32", "bfloat16")), ("compute_dtype", ("float32", "bfloat16"))):
        if precision[k] not in allowed:
            raise ConfigError(f"config.precision.{k}={precision[k]!r}: must be one of {allowed}")

    sample = _check_section("sample", raw.get("sample", {}), sample_defaults())
    _positive("sample", sample, "max_new_tokens", "temperature", allow_zero=True)

    model_fields, model = _check_model(raw["model"], precision)

    from phi3_jax.data.config import validate_data_config

    data = validate_data_config(raw["data"])
    return Resolved(model=model, model_fields=model_fields, data=data, train=types.SimpleNamespace(**train),
                    mesh=mesh, precision=precision, sample=types.SimpleNamespace(**sample), raw=raw,
                    sequence_parallel=sequence_parallel)


SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "vocab_size")


def model_name(preset: str, model: ModelConfig) -> str:
    """The preset's name, with the shape fields in which `model` differs from it (a config's :tiny variant
    keeps the preset's name but not its size)."""
    from phi3_jax.model import get_preset

    base = get_preset(preset)
    changed = [f"{k} {getattr(model, k)}" for k in SHAPE_FIELDS if getattr(model, k) != getattr(base, k)]
    return f"{preset} ({', '.join(changed)})" if changed else preset


def _check_model(given, precision) -> tuple[dict, ModelConfig | None]:
    if not isinstance(given, dict):
        raise ConfigError(f"config.model: expected a section, got {type(given).__name__}")
    if "preset" not in given:
        raise ConfigError("config.model.preset: missing (build the section with train_config.model_section)")
    names = {f.name for f in dataclasses.fields(ModelConfig)} - set(_MODEL_DTYPE_FIELDS)
    for k in given:
        if k in _MODEL_DTYPE_FIELDS:
            raise ConfigError(f"config.model.{k}: set precision.param_dtype / precision.compute_dtype instead")
        if k != "preset" and k not in names:
            raise ConfigError(f"config.model.{k}: unknown ModelConfig field")
    fields = model_section(given["preset"]).to_dict()  # the preset's values fill what the section lacks
    for k, v in given.items():
        if k == "preset":
            continue
        default = _plain(fields.get(k))
        if default is not None and v is not None and _field_type(k) is not object:
            v = _check_type(f"config.model.{k}", v, default)
        fields[k] = tuple(v) if isinstance(v, list) else v
    fields = {k: _plain(v) for k, v in fields.items() if k != "preset"}
    fields["param_dtype"] = precision["param_dtype"]
    fields["dtype"] = precision["compute_dtype"]
    if fields["vocab_size"] == -1:
        return fields, None  # completed from the tokenizer by resolve_model
    return fields, _model_config(fields)


def _model_config(fields: dict) -> ModelConfig:
    try:
        return ModelConfig.from_dict(fields)
    except ConfigError as e:
        raise ConfigError(f"config.model: {e}") from None
    except TypeError as e:
        raise ConfigError(f"config.model: {e}") from None


def resolve_model(resolved: Resolved, tokenizer) -> ModelConfig:
    """The ModelConfig, vocab_size completed from the tokenizer (-1), checked against the tokenizer."""
    fields = dict(resolved.model_fields)
    if fields["vocab_size"] == -1:
        fields["vocab_size"] = int(tokenizer.vocab_size)
    cfg = _model_config(fields)
    if resolved.train.seq_len > cfg.max_position_embeddings:
        raise ConfigError(f"config.train.seq_len={resolved.train.seq_len} is longer than the model's "
                          f"max_position_embeddings={cfg.max_position_embeddings}; shorten it or raise "
                          "config.model.max_position_embeddings")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"config.model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size} ids, data.tokenizer.kind={resolved.data.tokenizer['kind']!r}); "
                          "set config.model.vocab_size >= it (or -1 to take the tokenizer's)")
    return cfg
