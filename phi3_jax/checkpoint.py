"""Checkpoints: phi3_jax model checkpoints (this part) and, beside them, training state.

Format. A phi3_jax checkpoint is an Orbax `CheckpointManager` directory; each step folder holds the item
"params" (the parameter pytree as nested dicts, StandardSave) and the item "config"
(`ModelConfig.to_dict()`, JsonSave). A training workdir keeps the same layout under `WORKDIR/checkpoints/`
with more items per step (train state, data iterator), so everything that reads a model reads both.

Paths a reader accepts (`resolve`): a Hugging Face folder (config.json + safetensors), a checkpoint
directory (latest step), one step folder of it, or a training workdir (latest step of its checkpoints/).

Writes never leave a complete-looking result behind on failure: Orbax finalises a step by renaming its
temporary folder, and `save_model` builds the whole directory under a temporary sibling name first.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from phi3_jax.convert.hf_weights import CheckpointError
from phi3_jax.model.config import ConfigError, ModelConfig
from phi3_jax.model.params import flatten, unflatten  # noqa: F401  (re-exported)

PARAMS_ITEM = "params"
CONFIG_ITEM = "config"
TRAIN_STATE_ITEM = "train_state"
DATA_ITEM = "data"
TRAIN_CONFIG_ITEM = "train_config"
PROGRESS_ITEM = "progress"  # {"tokens", "flops"} trained on by the step (JSON: exact beyond float32 / int32)
WORKDIR_CHECKPOINTS = "checkpoints"
COMPUTE_COPY = "compute_params"  # the train state's cast weights: not saved, cast again on restore

__all__ = ["CheckpointError", "Source", "resolve", "save_model", "read_config", "restore_params", "load_model",
           "abstract_params", "model_from_params", "model_params", "check_tree", "flatten", "unflatten"]


# ----------------------------------------------------------------------------------------------------
# Parameter pytrees
# ----------------------------------------------------------------------------------------------------

def abstract_params(cfg: ModelConfig, dtype: str | None = None, shardings=None) -> dict:
    """The parameter pytree of `cfg` as ShapeDtypeStructs, nothing allocated.

    `shardings` (a matching pytree of `jax.sharding.Sharding`, or one for all) says where restored arrays
    go; default: the first local device.
    """
    from flax import nnx

    from phi3_jax.model.decoder import abstract_model

    tree = nnx.state(abstract_model(cfg), nnx.Param).to_pure_dict()
    dt = jax.numpy.dtype(dtype or cfg.param_dtype)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dt, sharding=s), tree, shardings)


def model_params(model) -> dict:
    """The parameter pytree (nested dicts of arrays) of a Decoder."""
    from flax import nnx

    return nnx.state(model, nnx.Param).to_pure_dict()


def model_from_params(cfg: ModelConfig, params: dict):
    """A Decoder of `cfg` holding `params` (nested dicts of arrays), without initialising weights first."""
    from flax import nnx

    from phi3_jax.model.decoder import abstract_model

    abstract = abstract_model(cfg)
    check_tree(params, nnx.state(abstract, nnx.Param).to_pure_dict(), where="params")
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def check_tree(have: dict, want: dict, where: str) -> None:
    """Same parameter paths and shapes, else one error naming the first difference."""
    have_f, want_f = flatten(have), flatten(want)
    missing = sorted(set(want_f) - set(have_f))
    extra = sorted(set(have_f) - set(want_f))
    hint = " (is it a checkpoint of another model?)"
    if missing:
        raise CheckpointError(f"{where}: parameter {'/'.join(missing[0])} is missing "
                              f"({len(missing)} missing in all){hint}")
    if extra:
        raise CheckpointError(f"{where}: parameter {'/'.join(extra[0])} is not part of the model "
                              f"({len(extra)} unexpected in all){hint}")
    for path, w in want_f.items():
        if tuple(have_f[path].shape) != tuple(w.shape):
            raise CheckpointError(f"{where}: parameter {'/'.join(path)} has shape {tuple(have_f[path].shape)}, "
                                  f"the config needs {tuple(w.shape)}{hint}")


# ----------------------------------------------------------------------------------------------------
# Finding what a path holds
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Source:
    kind: str  # "hf" | "checkpoint" | "workdir"
    path: Path  # the HF folder, or the CheckpointManager directory
    step: int | None = None  # the step read (None for "hf")

    @property
    def step_dir(self) -> Path:
        return self.path / str(self.step)


def _steps(directory: Path) -> list[int]:
    # Orbax writes a step under a temporary name and renames it when complete: only integer names (its
    # default step naming) count.
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def resolve(path: str | os.PathLike) -> Source:
    """Says what `path` is: an HF folder, a phi3_jax checkpoint (latest step) or a training workdir."""
    from phi3_jax.convert.hf import is_hf_dir

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise CheckpointError(f"{p} is a file; expected a directory (a Hugging Face folder, a phi3_jax "
                              "checkpoint or a training workdir)")
    if is_hf_dir(p):
        return Source("hf", p)
    if p.name.isdigit() and (p / PARAMS_ITEM).is_dir():
        return Source("checkpoint", p.parent, int(p.name))
    for kind, d in (("checkpoint", p), ("workdir", p / WORKDIR_CHECKPOINTS)):
        steps = _steps(d)
        if steps:
            return Source(kind, d, steps[-1])
    if not any(p.iterdir()):
        raise CheckpointError(f"{p} is empty: no Hugging Face config.json, no checkpoint steps")
    if any(".orbax-checkpoint-tmp" in q.name for d in (p, p / WORKDIR_CHECKPOINTS) if d.is_dir()
           for q in d.iterdir()):
        raise CheckpointError(f"{p} holds only unfinished checkpoint writes (an interrupted save); "
                              "no complete step to read")
    if (p / WORKDIR_CHECKPOINTS).is_dir() or (p / "metrics.jsonl").exists():
        raise CheckpointError(f"{p} is a training workdir with no checkpoint yet (the first is written every "
                              "train.checkpoint_every steps, on SIGTERM / SIGINT, and at the end)")
    raise CheckpointError(f"{p} is neither a Hugging Face folder (config.json + safetensors), a phi3_jax "
                          f"checkpoint (numbered step folders) nor a training workdir ({WORKDIR_CHECKPOINTS}/)")


def _item_handlers() -> dict:
    """Handlers of every item a step may hold (weights-only or training), so any reader knows them all."""
    import orbax.checkpoint as ocp
    from grain.checkpoint import CheckpointHandler as GrainHandler

    return {PARAMS_ITEM: ocp.StandardCheckpointHandler(), CONFIG_ITEM: ocp.JsonCheckpointHandler(),
            TRAIN_STATE_ITEM: ocp.StandardCheckpointHandler(), DATA_ITEM: GrainHandler(),
            TRAIN_CONFIG_ITEM: ocp.JsonCheckpointHandler(), PROGRESS_ITEM: ocp.JsonCheckpointHandler()}


def _manager(directory: Path, create: bool = False):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=create),
                                 item_handlers=_item_handlers())


def _require_item(src: Source, item: str) -> None:
    if not (src.step_dir / item).is_dir():
        raise CheckpointError(f"{src.step_dir}: checkpoint step has no {item!r} item (corrupt or not a "
                              "phi3_jax checkpoint)")


# ----------------------------------------------------------------------------------------------------
# Model checkpoints
# ----------------------------------------------------------------------------------------------------

def save_model(directory: str | os.PathLike, cfg: ModelConfig, params: dict, step: int = 0, *,
               force: bool = False, files: dict[str, bytes] | None = None) -> Path:
    """Writes a phi3_jax checkpoint (one step) holding `params` and `cfg`, and `files` ({name: content}, such
    as the tokenizer.json of an imported model) beside the step folder.

    The directory is built under a temporary sibling name and renamed when complete; an existing
    non-empty directory is replaced only with force=True.
    """
    import orbax.checkpoint as ocp

    from phi3_jax.convert.hf import atomic_dir, prepare_out_dir

    check_tree(params, abstract_params(cfg), where="params to save")
    out = prepare_out_dir(directory, force)
    # The stored config describes the stored arrays, dtype included.
    params = jax.tree.map(lambda a: jax.numpy.asarray(a, dtype=cfg.param_dtype), params)
    with atomic_dir(out) as tmp:
        with _manager(tmp, create=True) as mngr:
            mngr.save(step, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardSave(params),
                                                       CONFIG_ITEM: ocp.args.JsonSave(cfg.to_dict())}))
            mngr.wait_until_finished()
        for name, content in (files or {}).items():
            (tmp / name).write_bytes(content)
    return out


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig a Hugging Face folder, checkpoint or training workdir was saved with."""
    src = resolve(path)
    if src.kind == "hf":
        from phi3_jax.convert.hf import read_hf_config

        return read_hf_config(src.path)
    _require_item(src, CONFIG_ITEM)
    d = _read_json_item(src, CONFIG_ITEM)
    try:
        return ModelConfig.from_dict(d)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{src.step_dir}/{CONFIG_ITEM}: {e}") from None


def read_train_config(path: str | os.PathLike) -> dict | None:
    """The resolved training config a training checkpoint was saved with (None for an HF folder or a
    checkpoint written by `save_model`, which carry none)."""
    src = resolve(path)
    if src.kind == "hf" or not (src.step_dir / TRAIN_CONFIG_ITEM).is_dir():
        return None
    return _read_json_item(src, TRAIN_CONFIG_ITEM)


def _read_json_item(src: Source, item: str) -> dict:
    import orbax.checkpoint as ocp

    try:
        with _manager(src.path) as mngr:
            d = mngr.restore(src.step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
    except Exception as e:
        raise CheckpointError(f"{src.step_dir}/{item}: unreadable ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{src.step_dir}/{item}: expected a JSON object")
    return d


def restore_params(path: str | os.PathLike, cfg: ModelConfig, dtype: str | None = None, shardings=None) -> dict:
    """The parameter pytree stored at `path`, checked against `cfg`'s shapes and cast to `dtype`.

    Arrays are restored straight into `shardings` (see abstract_params), so a sharded model never passes
    through one host whole. A Hugging Face folder is read through its safetensors.
    """
    import orbax.checkpoint as ocp

    src = resolve(path)
    target = abstract_params(cfg, dtype, shardings)
    if src.kind == "hf":
        from phi3_jax.convert.hf import read_hf

        _, flat = read_hf(src.path)
        check_tree(unflatten(flat), target, where=str(src.path))
        return jax.tree.map(lambda a, t: jax.device_put(np.asarray(a).astype(t.dtype), t.sharding),
                            unflatten(flat), target)
    _require_item(src, PARAMS_ITEM)
    where = f"{src.step_dir}/{PARAMS_ITEM}"
    try:
        with _manager(src.path) as mngr:
            stored = mngr.item_metadata(src.step)[PARAMS_ITEM]
            stored_tree = getattr(stored, "tree", stored)
            if not isinstance(stored_tree, dict):
                raise CheckpointError(f"{where}: no parameter metadata; the checkpoint is incomplete or corrupt")
            check_tree(stored_tree, target, where=where)
            restored = mngr.restore(src.step, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore(target)}))
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{where}: unreadable, the checkpoint may be corrupt "
                              f"({type(e).__name__}: {_first_line(e)})") from None
    return restored[PARAMS_ITEM]


def load_model(path: str | os.PathLike, dtype: str | None = None):
    """A Decoder from a Hugging Face folder, a phi3_jax checkpoint or a training workdir.

    `dtype` sets both the parameter and the activation dtype (default: as saved).
    """
    src = resolve(path)
    if src.kind == "hf":
        from phi3_jax.convert.hf import read_hf

        cfg, flat = read_hf(src.path, dtype)
        params = jax.tree.map(jax.numpy.asarray, unflatten(flat))
        return model_from_params(cfg, params)
    cfg = read_config(path)
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
    return model_from_params(cfg, restore_params(path, cfg))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    # TensorStore appends "See full TensorStore details: <bound method ...>" to a one-line cause.
    line = text.splitlines()[0].split("See full TensorStore details")[0].strip() if text else ""
    return line[:300]


# ----------------------------------------------------------------------------------------------------
# Training checkpoints (WORKDIR/checkpoints/): the model items above plus the train state
# ----------------------------------------------------------------------------------------------------
#
# Each step folder holds
#   "params"        the master weights, in precision.param_dtype (StandardSave; read by restore_params /
#                   phi3_jax.load)
#   "config"        ModelConfig.to_dict() (JsonSave)
#   "train_state"   {"opt_state", "step", "nonfinite_run", "skipped"} (StandardSave); the state's
#                   "compute_params" (bf16 copies of the weights) is not saved: restore casts it again
#   "data"          the data iterator state, one JSON file per process (grain's CheckpointHandler)
#   "train_config"  the whole resolved training config (JsonSave)
# Saves are asynchronous (arrays are copied off the device before `save` returns, files are written in
# the background); keep-last-N plus keep-every-K (ocp.CheckpointManagerOptions max_to_keep / keep_period).



def _cast_like(params: dict, abstract_copy: dict) -> dict:
    """The subtree of `params` that `abstract_copy` names, cast to its dtypes and placed with its shardings."""
    import jax

    sub = {k: params[k] for k in abstract_copy}
    shardings = jax.tree.map(lambda a: a.sharding, abstract_copy)
    return jax.jit(lambda p: jax.tree.map(lambda x, a: x.astype(a.dtype), p, abstract_copy),
                   out_shardings=shardings)(sub)


class _DataState:
    """A frozen data-iterator state for grain's CheckpointHandler (get_state() -> bytes).

    The state is captured when `save` is called, so an asynchronous save cannot see the iterator move on.
    """

    def __init__(self, state: bytes):
        self._state = state

    def get_state(self) -> bytes:
        return self._state


class TrainCheckpointer:
    """Saves and restores training state under WORKDIR/checkpoints with the model-checkpoint layout."""

    def __init__(self, workdir: str | os.PathLike, *, keep_last: int = 2, keep_every: int = 0,
                 async_save: bool = True, read_only: bool = False):
        """read_only: `workdir` is a checkpoints folder itself, to restore from only (another run's, to branch
        from); do not save through it."""
        import orbax.checkpoint as ocp

        self.read_only = read_only
        if read_only:
            self.directory = Path(workdir).absolute()
            # Not orbax's read_only option, which logs two warnings; this manager never saves or deletes.
            options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
        else:
            self.directory = Path(workdir).absolute() / WORKDIR_CHECKPOINTS
            options = ocp.CheckpointManagerOptions(max_to_keep=keep_last, keep_period=keep_every or None,
                                                   create=True, enable_async_checkpointing=async_save)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=_item_handlers())

    def latest_step(self) -> int | None:
        steps = _steps(self.directory)
        return steps[-1] if steps else None

    def save(self, step: int, state: dict, data_state: bytes, model_cfg: ModelConfig, train_config: dict, *,
             progress: dict | None = None, wait: bool = False) -> None:
        import orbax.checkpoint as ocp
        from grain.checkpoint import CheckpointSave

        if self.read_only:
            raise ValueError(f"{self.directory}: opened read_only, to restore from")
        rest = {k: v for k, v in state.items() if k not in ("params", COMPUTE_COPY)}
        self._mngr.save(int(step), force=True, args=ocp.args.Composite(**{
            PARAMS_ITEM: ocp.args.StandardSave(state["params"]),
            CONFIG_ITEM: ocp.args.JsonSave(model_cfg.to_dict()),
            TRAIN_STATE_ITEM: ocp.args.StandardSave(rest),
            DATA_ITEM: CheckpointSave(_DataState(data_state)),
            TRAIN_CONFIG_ITEM: ocp.args.JsonSave(train_config),
            **({PROGRESS_ITEM: ocp.args.JsonSave(progress)} if progress is not None else {}),
        }))
        if wait:
            self._mngr.wait_until_finished()

    def restore(self, step: int, abstract_state: dict, model_cfg: ModelConfig, data_iter,
                train_config: dict | None = None) -> dict:
        """The train state of `step` placed like `abstract_state`; sets `data_iter`'s state.

        Raises CheckpointError (one message naming the step folder) for a checkpoint of another model, of
        another optimizer (naming the `train` fields that differ from `train_config`'s, when given) or an
        unreadable one; nothing in the workdir is changed.
        """
        import orbax.checkpoint as ocp
        from grain.checkpoint import CheckpointRestore

        step_dir = self.directory / str(step)
        for item in (PARAMS_ITEM, CONFIG_ITEM, TRAIN_STATE_ITEM, DATA_ITEM):
            if not (step_dir / item).is_dir():
                raise CheckpointError(f"{step_dir}: checkpoint step has no {item!r} item (corrupt, or not a "
                                      "phi3_jax training checkpoint); move the step folder away to resume from "
                                      "an earlier one, or use a new --workdir")
        saved = read_config(step_dir)
        check_tree(_metadata_tree(self._mngr, step, PARAMS_ITEM, step_dir), abstract_state["params"],
                   where=f"{step_dir}/{PARAMS_ITEM}")
        if saved.family != model_cfg.family:
            raise CheckpointError(f"{step_dir}: checkpoint of a {saved.family} model, the config builds a "
                                  f"{model_cfg.family} model; use a new --workdir or the config it was trained with")
        _check_data_processes(step_dir / DATA_ITEM)
        _check_objective(step_dir, train_config)
        rest = {k: v for k, v in abstract_state.items() if k not in ("params", COMPUTE_COPY)}
        try:
            out = self._mngr.restore(int(step), args=ocp.args.Composite(**{
                PARAMS_ITEM: ocp.args.StandardRestore(abstract_state["params"]),
                TRAIN_STATE_ITEM: ocp.args.StandardRestore(rest),
                DATA_ITEM: CheckpointRestore(data_iter),
            }))
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - any read failure means the step is unusable
            from phi3_jax.train_data import DataStateMismatch

            if isinstance(e, DataStateMismatch):
                raise CheckpointError(f"{step_dir}/{DATA_ITEM}: {e}; resume with the train.data_shards (or "
                                      "process count) the run was started with") from None
            if "tree structures do not match" in str(e) or "Structure mismatch" in str(e):
                raise CheckpointError(
                    f"{step_dir}/{TRAIN_STATE_ITEM}: the saved optimizer state has another structure than this "
                    f"config's optimizer{_changed_train_fields(step_dir, train_config)}; resume with the train "
                    f"settings the run started with, or keep only the weights: a new --workdir with --init_from "
                    f"{step_dir}") from None
            raise CheckpointError(f"{step_dir}: unreadable, the checkpoint may be corrupt "
                                  f"({type(e).__name__}: {_first_line(e)}); move the step folder away to resume "
                                  "from an earlier one, or use a new --workdir") from None
        state = {"params": out[PARAMS_ITEM], **out[TRAIN_STATE_ITEM]}
        if COMPUTE_COPY in abstract_state:
            state[COMPUTE_COPY] = _cast_like(state["params"], abstract_state[COMPUTE_COPY])
        return state

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def read_progress(step_dir: str | os.PathLike) -> dict | None:
    """The {"tokens", "flops"} a training checkpoint step was saved with (None for a step without them)."""
    step_dir = Path(step_dir)
    if not (step_dir / PROGRESS_ITEM).is_dir():
        return None
    return _read_json_item(Source("checkpoint", step_dir.parent, int(step_dir.name)), PROGRESS_ITEM)


def config_changes(step_dir: str | os.PathLike, train_config: dict | None) -> list[str]:
    """"section.field: saved -> now" for each field of `train_config` (a resolved training config) that differs
    from the one saved with the checkpoint step `step_dir` (empty when the step saved none)."""
    step_dir = Path(step_dir)
    try:
        saved = _read_json_item(Source("checkpoint", step_dir.parent, int(step_dir.name)), TRAIN_CONFIG_ITEM)
    except (CheckpointError, ValueError):
        return []
    now = json.loads(json.dumps(train_config or {}, default=str))  # tuples as lists, as the saved JSON has them

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and v:
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    old, new = flat(saved), flat(now)
    missing = object()
    show = lambda v: "(absent)" if v is missing else json.dumps(v)  # noqa: E731
    return [f"{k}: {show(old.get(k, missing))} -> {show(new.get(k, missing))}" for k in sorted(set(old) | set(new))
            if old.get(k, missing) != new.get(k, missing)]


def _changed_train_fields(step_dir: Path, train_config: dict | None) -> str:
    """The `train` fields that differ from the step's saved config, as a parenthesis for a message."""
    changed = [c.split(":")[0] for c in config_changes(step_dir, train_config) if c.startswith("train.")]
    return f" ({', '.join(changed)} changed since it was saved)" if changed else ""


def _check_objective(step_dir: Path, train_config: dict | None) -> None:
    """A DPO state holds the reference weights and reads pair rows: the other objective cannot resume it."""
    try:
        saved = _read_json_item(Source("checkpoint", step_dir.parent, int(step_dir.name)), TRAIN_CONFIG_ITEM)
    except (CheckpointError, ValueError):
        return
    objective = lambda config: (config or {}).get("train", {}).get("objective", "lm")  # noqa: E731 - absent: "lm"
    if objective(saved) != objective(train_config):
        raise CheckpointError(f"{step_dir}: saved by a run with train.objective={objective(saved)!r}, this config has "
                              f"{objective(train_config)!r}; resume with the objective it was saved with, or keep only "
                              f"the weights: a new --workdir with --init_from {step_dir}")


def _check_data_processes(data_dir: Path) -> None:
    """grain writes one iterator state per process (process_I-of-N.json): N must match this run."""
    n = jax.process_count()
    counts = sorted({int(f.stem.rsplit("-of-", 1)[1]) for f in data_dir.glob("process_*-of-*.json")
                     if f.stem.rsplit("-of-", 1)[1].isdigit()})
    if counts and n not in counts:
        raise CheckpointError(f"{data_dir}: the data iterator state was written by {counts[0]} process(es), this "
                              f"run has {n}; resume with {counts[0]} process(es) (the state is per process), or "
                              "start a new --workdir with --init_from the checkpoint to keep the weights only")


def _metadata_tree(mngr, step: int, item: str, step_dir: Path) -> dict:
    try:
        stored = mngr.item_metadata(step)[item]
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{step_dir}/{item}: unreadable, the checkpoint may be corrupt "
                              f"({type(e).__name__}: {_first_line(e)})") from None
    tree = getattr(stored, "tree", stored)
    if not isinstance(tree, dict):
        raise CheckpointError(f"{step_dir}/{item}: no parameter metadata (corrupt checkpoint?)")
    return tree

