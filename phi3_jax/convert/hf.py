"""Hugging Face folders <-> (ModelConfig, flat parameters).

Reading takes `config.json` and safetensors only (one `model.safetensors` or shards listed in
`model.safetensors.index.json`): pickle-based weight files can run code when loaded, so they are refused
with a message saying how to convert them. Writing produces what `transformers.from_pretrained` loads
(config.json, generation_config.json, safetensors sharded with an index above `max_shard_bytes`) into a
temporary sibling folder that is renamed into place only once complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from phi3_jax.convert.hf_weights import CheckpointError, params_from_hf, params_to_hf
from phi3_jax.model.config import DTYPES, ConfigError, ModelConfig
from phi3_jax.model.hf_config import from_hf_config, to_hf_config

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3
# Formats that unpickle on load (torch.load, joblib, Keras/TF pickles); never opened here.
UNSAFE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Stop tokens of the phi3 chat models (spec §8.1): <|endoftext|>, <|assistant|>, <|end|>.
PHI3_STOP_IDS = (32000, 32001, 32007)
PHI3_SMALL_STOP_IDS = (100257, 100266)  # <|endoftext|>, <|end|> (spec §8.2)


def is_hf_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def read_hf_config(hf_dir: str | os.PathLike) -> ModelConfig:
    path = Path(hf_dir) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{hf_dir}: no {CONFIG_NAME}; a Hugging Face folder needs config.json and safetensors")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return from_hf_config(hf)


def weight_files(hf_dir: str | os.PathLike) -> dict[str, Path]:
    """{tensor name: safetensors file holding it}, from the index or the single weights file."""
    d = Path(hf_dir)
    index = d / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        files = {name: d / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{index} lists shard {f.name}, which is not in {d}")
        return files
    singles = [d / WEIGHTS_NAME] if (d / WEIGHTS_NAME).is_file() else sorted(d.glob("*.safetensors"))
    if len(singles) == 1:
        return {name: singles[0] for name in _tensor_names(singles[0])}
    if len(singles) > 1:
        raise CheckpointError(f"{d}: several safetensors files ({[f.name for f in singles][:3]}...) but no "
                              f"{INDEX_NAME} saying which tensor lives where")
    unsafe = sorted(f.name for f in d.iterdir() if f.name.endswith(UNSAFE_WEIGHT_SUFFIXES))
    if unsafe:
        raise CheckpointError(
            f"{d}: only safetensors are read; {unsafe[0]} is a pickle-based file that can run code when loaded. "
            "Convert it once, where you trust it: transformers.AutoModelForCausalLM.from_pretrained(DIR)"
            ".save_pretrained(OUT) writes model.safetensors")
    raise CheckpointError(f"{d}: no weights found (expected {WEIGHTS_NAME} or {INDEX_NAME})")


def _tensor_names(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def read_hf(hf_dir: str | os.PathLike, dtype: str | None = None):
    """(cfg, {parameter path: np.ndarray}) from a Hugging Face folder; tensors cast to cfg.param_dtype.

    `dtype` overrides the config's dtype (parameters and activations). Every tensor is checked against
    the config's shapes; nothing is read before the set of names is known to match.
    """
    from safetensors import safe_open

    from phi3_jax.checkpoint import abstract_params, flatten

    cfg = read_hf_config(hf_dir)
    if dtype is not None:
        cfg = cfg.replace(param_dtype=_check_dtype(dtype), dtype=dtype)
    files = weight_files(hf_dir)
    model_shapes = {k: tuple(v.shape) for k, v in flatten(abstract_params(cfg)).items()}
    target = np.dtype(_np_dtype(cfg.param_dtype))
    with contextlib.ExitStack() as stack:
        handles = {}

        def get_tensor(name: str) -> np.ndarray:
            f = files[name]
            if f not in handles:
                try:
                    handles[f] = stack.enter_context(safe_open(str(f), framework="np"))
                except Exception as e:
                    raise CheckpointError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from None
            try:
                a = handles[f].get_tensor(name)
            except Exception as e:  # the index names a file that lacks the tensor (a stale or swapped shard)
                raise CheckpointError(f"{f}: cannot read tensor {name!r} that the weight index places there "
                                      f"({type(e).__name__}: {e})") from None
            return a if a.dtype == target else a.astype(target)

        params = params_from_hf(cfg, get_tensor, set(files), model_shapes)
    return cfg, params


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {DTYPES}")
    return dtype


def _np_dtype(name: str):
    import ml_dtypes

    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def generation_config(cfg: ModelConfig, stop_ids: Sequence[int] = ()) -> dict:
    """bos / eos / pad ids for transformers' generate(); eos lists every stop id: `stop_ids` (the tokenizer's)
    when given, else the released tokenizer's where the vocabulary has its size."""
    eos = cfg.eos_token_id
    eos_ids = list(eos) if isinstance(eos, tuple) else ([] if eos is None else [eos])
    stops = tuple(stop_ids) or {"phi3": PHI3_STOP_IDS, "phi3small": PHI3_SMALL_STOP_IDS}[cfg.family]
    if cfg.vocab_size > max(stops):
        eos_ids += [int(i) for i in stops if i not in eos_ids]
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
           "pad_token_id": cfg.pad_token_id}
    return {k: v for k, v in gen.items() if v is not None and v != []}


def _tensor_order(name: str):
    """Embedding, layers in index order, final norm, LM head: the order transformers writes."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)), name)
    return (0 if "embed_tokens" in name else 3 if name.startswith("lm_head") else 2, 0, name)


def plan_shards(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[list[str]]:
    """Groups tensor names into shards of at most max_shard_bytes (one oversized tensor per shard)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors, key=_tensor_order):
        n = tensors[name].nbytes
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def prepare_out_dir(out: str | os.PathLike, force: bool, source: str | os.PathLike | None = None) -> Path:
    """Checks `out` may be written, before any work is done: writing replaces the whole folder, so it must
    not be, or hold, the `source` being converted."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    if source is not None:
        src = Path(source).resolve()
        if src == out.resolve() or out.resolve() in src.parents:
            raise CheckpointError(f"{out} is or holds the source {source}, which writing it would replace; "
                                  "choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CheckpointError(f"{out} exists and is not empty; choose another path or pass --force (force=True)")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary sibling `OUT.tmp-<random>`; on success it replaces OUT, on error it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        yield tmp
        _default_permissions(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=out.name + ".old-", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _default_permissions(root: Path) -> None:
    """mkdtemp and some writers create owner-only entries; give the result the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    for d, _, files in os.walk(root):
        os.chmod(d, 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(d, f), 0o666 & ~umask)


def write_hf(out: str | os.PathLike, cfg: ModelConfig, params: dict[tuple[str, ...], np.ndarray], *,
             dtype: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, force: bool = False,
             files: Mapping[str, str] | None = None, stop_ids: Sequence[int] = ()) -> Path:
    """Writes a Hugging Face folder; tensors in `dtype` (default cfg.param_dtype), bytes unchanged otherwise.
    `files` ({name: text}, the tokenizer's) go in beside them; `stop_ids` see `generation_config`."""
    out = prepare_out_dir(out, force)
    if max_shard_bytes <= 0:
        raise ConfigError(f"max_shard_bytes={max_shard_bytes} must be positive")
    dtype = _check_dtype(dtype or cfg.param_dtype)
    cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
    target = np.dtype(_np_dtype(dtype))
    tensors = {name: (t if t.dtype == target else np.ascontiguousarray(t.astype(target)))
               for name, t in params_to_hf(cfg, params).items()}
    shards = plan_shards(tensors, max_shard_bytes)
    with atomic_dir(out) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(to_hf_config(cfg), indent=2) + "\n")
        (tmp / GENERATION_CONFIG_NAME).write_text(json.dumps(generation_config(cfg, stop_ids), indent=2) + "\n")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        _write_shards(tmp, tensors, shards)
    return out


def _write_shards(d: Path, tensors: dict[str, np.ndarray], shards: list[list[str]]) -> None:
    from safetensors.numpy import save_file

    meta = {"format": "pt"}  # transformers checks this key before loading a safetensors file
    if len(shards) == 1:
        save_file({n: tensors[n] for n in shards[0]}, str(d / WEIGHTS_NAME), metadata=meta)
        return
    weight_map = {}
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(d / fname), metadata=meta)
        weight_map.update({n: fname for n in names})
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))}, "weight_map": weight_map}
    (d / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
