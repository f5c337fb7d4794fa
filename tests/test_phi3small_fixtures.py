"""Phi-3-small logits against the original model code's (shared/fixtures/phi3small, see its README).

Each case becomes a loadable Hugging Face folder (config.json + model.safetensors with the full,
zero-padded tied embedding) read by `phi3_jax.load`; float32 logits must agree with the fixture's.
"""
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import phi3_jax
from phi3_jax.convert import hf as hf_io

# The fixtures live in shared/ beside the checkout (../shared/fixtures), or where PHI3_FIXTURES points.
_REPO = Path(__file__).resolve().parents[1]
_ROOTS = [os.environ.get("PHI3_FIXTURES", ""), _REPO.parent / "shared" / "fixtures", _REPO / "shared" / "fixtures"]
FIXTURES = next((Path(r) / "phi3small" for r in _ROOTS if r and (Path(r) / "phi3small").is_dir()),
                Path("shared/fixtures/phi3small"))
# README bound: max|d| / max|logits| < 1e-3. Reached: 5.7e-6 and 7.4e-5 (the fixture itself is 5.3e-6 and
# 4.6e-5 from a float64 evaluation of the spec, the model 6.8e-6 and 4.2e-5): float32 rounding. The
# bounds below keep a ~3x margin so a regression shows long before the README's bound.
BOUND = {"small_b32_s4": 2e-5, "released_blocks": 2e-4}
DUMMY_IDS = [100256, 100258, 100259, 100260, 100264, 100265] + list(range(100267, 100352))  # spec §8.2

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"no fixtures at {FIXTURES}")


def checkpoint_tensors(case_dir: Path, hf: dict) -> dict[str, np.ndarray]:
    w = np.load(case_dir / "weights.npz")
    out = {}
    for name in w.files:
        if name.startswith("model.embed_tokens.weight["):  # first ROWS rows; the rest are zero
            rows = w[name]
            full = np.zeros((hf["vocab_size"], rows.shape[1]), rows.dtype)
            full[: rows.shape[0]] = rows
            out["model.embed_tokens.weight"] = full
        else:
            out[name] = w[name]
    return out


@pytest.fixture(scope="module", params=sorted(BOUND))
def case(request, tmp_path_factory):
    name = request.param
    d = FIXTURES / name
    hf = json.loads((d / "config.json").read_text())
    folder = tmp_path_factory.mktemp(name)
    tensors = checkpoint_tensors(d, hf)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf))
    model = phi3_jax.load(folder)
    ids = np.load(d / "ids.npy")
    graphdef, state = nnx.split(model)
    logits = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, impl="xla"))(state, jnp.asarray(ids)[None]))[0]
    return name, folder, tensors, model.cfg, logits, np.load(d / "logits.npy")


def test_logits_match_original_code(case):
    name, _, _, cfg, logits, ref = case
    assert cfg.family == "phi3small" and cfg.tie_embeddings and cfg.dense_attention_every_n_layers == 2
    rows = ref.shape[1]
    err = np.abs(logits[:, :rows] - ref).max() / np.abs(ref).max()
    assert err < 1e-3, f"{name}: max|d|/max|logits| = {err:.2e} (README bound 1e-3)"
    assert err < BOUND[name], f"{name}: max|d|/max|logits| = {err:.2e}, reached 3x less before"


def test_other_columns_zero_and_dummy_ids_masked(case):
    _, _, _, cfg, logits, ref = case
    rows = ref.shape[1]
    assert cfg.dummy_token_ids == tuple(DUMMY_IDS)
    dummy = np.zeros(cfg.vocab_size, bool)
    dummy[DUMMY_IDS] = True
    assert np.all(logits[:, dummy] == np.finfo(np.float32).min)
    rest = logits[:, rows:][:, ~dummy[rows:]]
    assert np.all(rest == 0.0)  # zero embedding rows give exactly 0, as in the fixture


def test_export_is_bit_identical(case, tmp_path):
    name, folder, tensors, cfg, _, _ = case
    if name != "small_b32_s4":
        pytest.skip("one case is enough (the other writes a 200 MB embedding)")
    cfg2, params = hf_io.read_hf(folder)
    assert cfg2 == cfg
    hf_io.write_hf(tmp_path / "out", cfg2, params)
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(written) == set(tensors)  # tied: no lm_head.weight written
    for k, v in tensors.items():
        assert written[k].dtype == v.dtype and written[k].tobytes() == v.tobytes(), k
