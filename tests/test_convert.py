"""Hugging Face import / export, phi3_jax checkpoints, `phi3_jax.load`, and the errors a user can cause."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

import phi3_jax
from phi3_jax.checkpoint import (CheckpointError, flatten, model_from_params, model_params, read_config, resolve,
                                 restore_params, save_model, unflatten)
from phi3_jax.convert.__main__ import main as convert_main
from phi3_jax.convert.hf import generation_config, read_hf, weight_files, write_hf
from phi3_jax.model import ConfigError, get_preset, init_model
from phi3_reference import hf_logits, load_hf, longrope_factors, make_hf, random_ids, rel_err, run_jit
from train_helpers import snapshot


def _longrope(head_dim: int = 16) -> dict:
    short, long = longrope_factors(head_dim)
    return dict(max_position_embeddings=128, original_max_position_embeddings=32,
                rope_parameters={"rope_type": "longrope", "short_factor": short, "long_factor": long,
                                 "rope_theta": 10000.0})


@pytest.fixture(scope="module")
def hf32(tmp_path_factory):
    """float32 GQA + LongRoPE + sliding-window reference in a Hugging Face folder."""
    return make_hf(tmp_path_factory.mktemp("hf32"), num_key_value_heads=2, sliding_window=48, **_longrope())


@pytest.fixture(scope="module")
def hf_bf16(tmp_path_factory, hf32):
    """The same weights saved in bfloat16, as the released checkpoints are."""
    folder = str(tmp_path_factory.mktemp("hf_bf16"))
    load_hf(hf32, dtype=torch.bfloat16).save_pretrained(folder)
    return folder


def _logits(model, ids):
    from flax import nnx

    graphdef, state = nnx.split(model)
    return np.asarray(run_jit(lambda st, i: nnx.merge(graphdef, st)(i), state, ids))


def _tensors(folder) -> dict[str, np.ndarray]:
    out = {}
    for name, f in weight_files(folder).items():
        with safe_open(str(f), framework="np") as h:
            out[name] = h.get_tensor(name)
    return out


def _cli(*args) -> int:
    return convert_main([str(a) for a in args])


# ----- round trips -----

def test_import_export_bit_identical(tmp_path, hf_bf16):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert _cli("import-hf", "--hf-dir", hf_bf16, "--out", ckpt) == 0
    assert read_config(ckpt).param_dtype == "bfloat16"
    assert _cli("export-hf", "--ckpt", ckpt, "--out", out, "--max-shard-size", "40KB") == 0
    src, dst = _tensors(hf_bf16), _tensors(out)
    assert set(src) == set(dst)
    for name, a in src.items():
        assert a.dtype == dst[name].dtype and a.shape == dst[name].shape, name
        assert a.tobytes() == dst[name].tobytes(), name
    assert read_config(out) == read_config(hf_bf16)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temporary folder left behind


def test_sharded_export_loads_in_transformers(tmp_path, hf32):
    out = tmp_path / "export"
    model = phi3_jax.load(hf32)
    flat = {k: np.asarray(v) for k, v in flatten(model_params(model)).items()}
    write_hf(out, model.cfg, flat, max_shard_bytes=64 * 1024)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ref = load_hf(hf32)
    exported = load_hf(str(out))  # plain from_pretrained: no remote code
    assert exported.config.rope_parameters["rope_type"] == "longrope"
    assert exported.config.sliding_window == ref.config.sliding_window
    ids = random_ids(2, 40)  # longer than original_max_position_embeddings: long factors
    assert rel_err(hf_logits(exported, ids), hf_logits(ref, ids)) < 1e-6
    assert rel_err(_logits(_with_mode(model, "hf"), ids), hf_logits(ref, ids)) < 1e-4


def _with_mode(model, mode):
    return model_from_params(model.cfg.replace(sliding_window_mode=mode), model_params(model))


def test_generation_config():
    phi3 = get_preset("phi-3-mini-4k")
    assert generation_config(phi3) == {"bos_token_id": 1, "eos_token_id": [32000, 32001, 32007], "pad_token_id": 32000}
    assert generation_config(get_preset("phi-3-tiny")) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    small = generation_config(get_preset("phi-3-small-8k"))
    assert small["eos_token_id"] == [100257, 100266]


def test_load_every_kind(tmp_path, hf32):
    ids = random_ids(2, 16)
    ref = _logits(phi3_jax.load(hf32), ids)
    eager = phi3_jax.load(hf32)(ids)  # the public call, outside jit
    assert eager.dtype == jnp.float32 and eager.shape == (2, 16, 256)
    assert rel_err(np.asarray(eager), ref) < 1e-5
    ckpt = tmp_path / "ckpt"
    _cli("import-hf", "--hf-dir", hf32, "--out", ckpt)
    assert resolve(ckpt).kind == "checkpoint" and resolve(ckpt / "0").step == 0
    for path in (ckpt, ckpt / "0"):
        assert rel_err(_logits(phi3_jax.load(path), ids), ref) == 0.0

    # A training workdir: more items per step, several steps; the latest one is read.
    cfg = read_config(ckpt)
    params = restore_params(ckpt, cfg)
    workdir = tmp_path / "workdir"
    with ocp.CheckpointManager(workdir / "checkpoints") as mngr:
        for step, scale in ((10, 0.0), (20, 1.0)):
            mngr.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(jax.tree.map(lambda a: a * scale, params)),
                config=ocp.args.JsonSave(cfg.to_dict()),
                train_state=ocp.args.StandardSave({"step": jnp.asarray(step)}),
                data=ocp.args.JsonSave({"position": step * 4})))
        mngr.wait_until_finished()
    src = resolve(workdir)
    assert (src.kind, src.step) == ("workdir", 20)
    assert rel_err(_logits(phi3_jax.load(workdir), ids), ref) == 0.0

    bf16 = phi3_jax.load(ckpt, dtype="bfloat16")
    assert bf16.cfg.param_dtype == "bfloat16"
    assert bf16.embed_tokens.embedding[...].dtype == jnp.bfloat16
    assert rel_err(_logits(bf16, ids), ref) < 2e-2


def test_cli_subprocess(tmp_path, hf32):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "phi3_jax.convert", *map(str, a)], env=env,
                                    capture_output=True, text=True, timeout=120)
    assert "import-hf" in run("--help").stdout
    ok = run("import-hf", "--hf-dir", hf32, "--out", tmp_path / "ckpt", "--dtype", "bfloat16")
    assert ok.returncode == 0, ok.stderr
    assert read_config(tmp_path / "ckpt").param_dtype == "bfloat16"
    bad = run("export-hf", "--ckpt", tmp_path / "nothing", "--out", tmp_path / "out")
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "nothing: no such file or directory" in bad.stderr
    assert not (tmp_path / "out").exists()


# ----- errors a user can cause: one clear message, nothing written -----

def _edit_config(folder, fn):
    path = os.path.join(folder, "config.json")
    hf = json.load(open(path))
    fn(hf)
    json.dump(hf, open(path, "w"))


def _edit_tensors(folder, fn):
    path = os.path.join(folder, "model.safetensors")
    tensors = _tensors(folder)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _to_bin(folder):
    sd = {k: torch.from_numpy(v.copy()) for k, v in _tensors(folder).items()}
    os.remove(os.path.join(folder, "model.safetensors"))
    torch.save(sd, os.path.join(folder, "pytorch_model.bin"))


def _stale_shard(folder):
    """An index that places one tensor in a shard that does not hold it (a swapped or stale file)."""
    tensors = _tensors(folder)
    moved = "model.layers.1.input_layernorm.weight"
    save_file({"model.norm.weight": tensors["model.norm.weight"]}, os.path.join(folder, "model-2.safetensors"),
              metadata={"format": "pt"})
    weight_map = {k: ("model-2.safetensors" if k == moved else "model.safetensors") for k in tensors}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


BAD_HF = {
    "stale_shard": (_stale_shard, "cannot read tensor 'model.layers.1.input_layernorm.weight' that the weight index"),
    "config_missing_field": (lambda d: _edit_config(d, lambda hf: hf.pop("hidden_size")),
                             "missing required field(s) ['hidden_size']"),
    "config_unknown_field": (lambda d: _edit_config(d, lambda hf: hf.update(magic_scale=2.0)),
                             "unknown field(s) ['magic_scale']"),
    "config_not_json": (lambda d: open(os.path.join(d, "config.json"), "w").write("{"), "not valid JSON"),
    "missing_tensor": (lambda d: _edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.down_proj.weight")),
                       "model.layers.1.mlp.down_proj.weight"),
    "misshaped_tensor": (lambda d: _edit_tensors(d, lambda t: t.update(
        {"model.layers.0.self_attn.o_proj.weight": np.zeros((64, 32), np.float32)})),
        "'model.layers.0.self_attn.o_proj.weight' has shape (64, 32)"),
    "extra_tensor": (lambda d: _edit_tensors(d, lambda t: t.update({"model.layers.9.mlp.w9.weight": np.zeros(2)})),
                     "model.layers.9.mlp.w9.weight"),
    "pickle_weights": (_to_bin, "only safetensors are read; pytorch_model.bin"),
    "no_weights": (lambda d: os.remove(os.path.join(d, "model.safetensors")), "no weights found"),
}


@pytest.mark.parametrize("case", list(BAD_HF))
def test_bad_hf_folder(tmp_path, hf32, capsys, case):
    bad, out = tmp_path / "bad", tmp_path / "out"
    shutil.copytree(hf32, bad)
    corrupt, message = BAD_HF[case]
    corrupt(str(bad))
    assert _cli("import-hf", "--hf-dir", bad, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))
    with pytest.raises((ConfigError, CheckpointError), match=re.escape(message)):  # the loader says the same
        phi3_jax.load(bad)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, hf32):
    path = tmp_path_factory.mktemp("ck") / "ckpt"
    cfg, flat = read_hf(hf32)
    save_model(path, cfg, unflatten(flat))
    return path


def _rewrite(d, params_fn):
    """Replaces the checkpoint's params with params_fn(cfg, params), keeping its config."""
    cfg = read_config(d)
    params = jax.tree.map(np.asarray, restore_params(d, cfg))
    shutil.rmtree(d)
    with ocp.CheckpointManager(d) as mngr:
        mngr.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params_fn(cfg, params)),
                                             config=ocp.args.JsonSave(cfg.to_dict())))
        mngr.wait_until_finished()


def _other_model(cfg, params):
    """Config of this model, parameters of a narrower one: a checkpoint of another model."""
    return model_params(init_model(cfg.replace(hidden_size=32, num_heads=2, num_kv_heads=1)))


def _drop_param(cfg, params):
    del params["layers"]["mlp"]["down_proj"]
    return params


def _misshape_param(cfg, params):
    params["norm"]["scale"] = params["norm"]["scale"][:-1]
    return params


def _rm(d, *parts):
    os.remove(os.path.join(d, *parts))


BAD_CKPT = {
    "other_model": (lambda d: _rewrite(d, _other_model),
                    "parameter embed_tokens/embedding has shape (256, 32), the config needs (256, 64)"),
    "missing_param": (lambda d: _rewrite(d, _drop_param), "parameter layers/mlp/down_proj/kernel is missing"),
    "misshaped_param": (lambda d: _rewrite(d, _misshape_param), "parameter norm/scale has shape (63,)"),
    "no_metadata": (lambda d: _rm(d, "0", "params", "_METADATA"), "incomplete or corrupt"),
    "corrupt_data": (lambda d: [open(f, "wb").write(b"x") for f in (d / "0" / "params").rglob("manifest.ocdbt")],
                     "may be corrupt"),
    "no_params_item": (lambda d: shutil.rmtree(d / "0" / "params"), "no 'params' item"),
    "bad_config": (lambda d: (d / "0" / "config" / "metadata").write_text('{"hidden_size": -1}'),
                   "hidden_size=-1"),
    "empty_dir": (lambda d: [shutil.rmtree(d), d.mkdir()], "is empty"),
    "interrupted": (lambda d: (d / "0").rename(d / "0.orbax-checkpoint-tmp-123"), "unfinished checkpoint writes"),
    "missing_path": (lambda d: shutil.rmtree(d), "no such file or directory"),
    "a_file": (lambda d: [shutil.rmtree(d), d.write_text("x")], "is a file"),
}


@pytest.mark.parametrize("case", list(BAD_CKPT))
def test_bad_checkpoint(tmp_path, ckpt, capsys, case):
    bad, out = tmp_path / "bad", tmp_path / "out"
    shutil.copytree(ckpt, bad)
    corrupt, message = BAD_CKPT[case]
    corrupt(bad)
    assert _cli("export-hf", "--ckpt", bad, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_restore_with_another_config(ckpt):
    cfg = read_config(ckpt)
    with pytest.raises(CheckpointError, match=r"layers/mlp/down_proj/kernel has shape \(2, 128, 64\), the config "
                                              r"needs \(2, 96, 64\)"):
        restore_params(ckpt, cfg.replace(intermediate_size=96))
    with pytest.raises(CheckpointError, match="parameter layers/input_layernorm/scale"):
        save_model(ckpt.parent / "never", cfg.replace(num_layers=3), restore_params(ckpt, cfg))
    assert not (ckpt.parent / "never").exists()


def test_output_exists(tmp_path, ckpt, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert _cli("export-hf", "--ckpt", ckpt, "--out", out) == 2
    assert "pass --force" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert _cli("export-hf", "--ckpt", ckpt, "--out", out, "--force") == 0
    assert (out / "model.safetensors").exists() and not (out / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    # --force never replaces the folder it reads from, or one that holds it.
    before = snapshot(ckpt.parent)
    for cmd, src, dst in (("export-hf", ckpt, ckpt), ("export-hf", ckpt, ckpt.parent), ("import-hf", out, out)):
        flag = "--ckpt" if cmd == "export-hf" else "--hf-dir"
        assert _cli(cmd, flag, src, "--out", dst, "--force") == 2
        assert f"{dst} is or holds the source {src}" in capsys.readouterr().err
    assert snapshot(ckpt.parent) == before and (out / "model.safetensors").exists()


def test_export_writes_the_training_tokenizer(tmp_path, capsys):
    """A training checkpoint's tokenizer goes into the HF folder: transformers' tokenizer and model there greedily
    continue a chat prompt token for token as phi3_jax does from the same folder."""
    from transformers import AutoTokenizer

    from phi3_jax.generate import generate_ids, recorded_tokenizer

    hf = make_hf(tmp_path / "hf", vocab_size=320, bos_token_id=256, eos_token_id=256, pad_token_id=261)
    assert _cli("import-hf", "--hf-dir", hf, "--out", tmp_path / "ckpt") == 0
    cfg = read_config(tmp_path / "ckpt")
    workdir = tmp_path / "workdir"
    with ocp.CheckpointManager(workdir / "checkpoints") as mngr:
        mngr.save(5, args=ocp.args.Composite(
            params=ocp.args.StandardSave(restore_params(tmp_path / "ckpt", cfg)),
            config=ocp.args.JsonSave(cfg.to_dict()),
            train_config=ocp.args.JsonSave({"data": {"sources": [], "tokenizer": {"kind": "byte",
                                                                                  "chat_template": "phi3.5"}}})))
        mngr.wait_until_finished()
    out = tmp_path / "out"
    assert _cli("export-hf", "--ckpt", workdir, "--out", out) == 0
    assert "byte tokenizer, chat template 'phi3.5'" in capsys.readouterr().out
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [256, 260]  # <|end|> stops

    auto, ours = AutoTokenizer.from_pretrained(out), phi3_jax.load_tokenizer(out)
    assert phi3_jax.load_tokenizer(workdir).special_tokens == ours.special_tokens
    assert recorded_tokenizer(out).chat_template == ours.chat_template == "phi3.5"
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "What is 2 + 2?"}]
    text = auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = auto.encode(text, add_special_tokens=False)
    assert ids == ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    with torch.no_grad():
        theirs = load_hf(str(out)).generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):]
    new = generate_ids(phi3_jax.load(out), ids, 16, stop_ids=ours.stop_ids, pad_id=ours.pad_id)
    theirs = theirs.tolist()
    assert theirs[:len(new)] == new and (len(new) == 16 or theirs[len(new)] in ours.stop_ids)

    # import-hf keeps the tokenizer beside the checkpoint: sampling and a later export use it.
    assert _cli("import-hf", "--hf-dir", out, "--out", tmp_path / "ckpt2") == 0
    assert "with tokenizer.json" in capsys.readouterr().out
    back = phi3_jax.load_tokenizer(tmp_path / "ckpt2")
    assert back.special_tokens == ours.special_tokens and back.chat_template == "phi3.5"
    assert _cli("export-hf", "--ckpt", tmp_path / "ckpt2", "--out", tmp_path / "out2") == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out2" / name).read_text() == (out / name).read_text(), name

    # --tokenizer none: the weights alone; a checkpoint with no training config has no tokenizer to write.
    assert _cli("export-hf", "--ckpt", workdir, "--out", tmp_path / "bare", "--tokenizer", "none") == 0
    assert _cli("export-hf", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "bare2") == 0
    assert "none recorded" in capsys.readouterr().out
    for d in ("bare", "bare2"):
        assert not (tmp_path / d / "tokenizer.json").exists() and (tmp_path / d / "model.safetensors").exists()


@pytest.mark.parametrize("spec, message", [
    ("sentencepiece:{sp}", "normaliser 'nmt_nfkc': no exact tokenizer.json form here; pass --tokenizer none"),
    ("hf:{missing}", "tokenizer.json file not found"),
    ("tiktoken:{bpe}", "ids up to 100351, the model 256 rows"),
    ("wordpiece", "unknown tokenizer kind"),
])
def test_export_tokenizer_errors(tmp_path, ckpt, capsys, spec, message):
    from test_tokenizers import _corpus, _tiny_bpe_ranks


    paths = {"sp": str(tmp_path / "sp.model"), "missing": str(tmp_path / "nothing.json"),
             "bpe": str(tmp_path / "tiny.tiktoken")}
    if spec.startswith("sentencepiece"):  # nmt_nfkc: a character map, which has no exact tokenizer.json form
        from test_tokenizers import _spm_model

        _spm_model(tmp_path, "sp", model_type="bpe", normalization_rule_name="nmt_nfkc")
    if spec.startswith("tiktoken"):
        import base64

        ranks = _tiny_bpe_ranks(_corpus(20), merges=5)
        lines = [f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()]
        (tmp_path / "tiny.tiktoken").write_text("".join(lines))
    out = tmp_path / "out"
    assert _cli("export-hf", "--ckpt", ckpt, "--out", out, "--tokenizer", spec.format(**paths)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_bad_index(tmp_path, hf32):
    bad = tmp_path / "bad"
    shutil.copytree(hf32, bad)
    (bad / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="lists shard model-00001-of-00002.safetensors"):
        phi3_jax.load(bad)


def test_restore_into_shardings(ckpt):
    # Arrays go straight to the requested devices: the embedding split over 8 devices by vocab rows.
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    cfg = read_config(ckpt)
    mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
    replicated = NamedSharding(mesh, P())
    shardings = jax.tree.map(lambda _: replicated, restore_params(ckpt, cfg))
    shardings["embed_tokens"]["embedding"] = NamedSharding(mesh, P("fsdp", None))
    params = restore_params(ckpt, cfg, shardings=shardings)
    emb = params["embed_tokens"]["embedding"]
    assert emb.sharding == shardings["embed_tokens"]["embedding"]
    assert emb.addressable_shards[0].data.shape == (cfg.vocab_size // 8, cfg.hidden_size)
    plain = restore_params(ckpt, cfg)
    assert np.array_equal(np.asarray(emb), np.asarray(plain["embed_tokens"]["embedding"]))


def test_show_reads_checkpoint_and_hf(ckpt, hf32, capsys):
    from phi3_jax.model.show import main as show_main

    for flag, path in (("--ckpt", ckpt), ("--hf-dir", hf32)):
        assert show_main([flag, str(path), "--seq-len", "64"]) == 0
        out = capsys.readouterr().out
        assert f"{read_config(ckpt).param_count():,}" in out and "MISMATCH" not in out


def test_released_config_layout(tmp_path, hf32):
    """The released checkpoints' config.json (rope_theta at top level, rope_scaling of type "longrope", or
    "su" in the April 2024 revision) reads as the same model transformers 5 writes with rope_parameters."""
    old = tmp_path / "released"
    shutil.copytree(hf32, old)

    def released(kind):
        def edit(hf):
            rp = hf.pop("rope_parameters")
            hf.pop("dtype")
            hf.update(rope_theta=rp["rope_theta"], torch_dtype="float32", rope_scaling={
                "type": kind, "short_factor": rp["short_factor"], "long_factor": rp["long_factor"]})
        return edit

    _edit_config(old, released("longrope"))
    assert read_config(old) == read_config(hf32)
    ids = random_ids(1, 40)  # past original_max_position_embeddings = 32
    assert rel_err(hf_logits(load_hf(str(old)), ids), hf_logits(load_hf(hf32), ids)) == 0.0
    # transformers 5.24 no longer loads "su" without rope_scaling.original_max_position_embeddings;
    # phi3_jax reads it as the longrope it was renamed to.
    shutil.copy(os.path.join(hf32, "config.json"), old / "config.json")
    _edit_config(old, released("su"))
    assert read_config(old) == read_config(hf32)
