"""Phi-3-small against a float64 reference written from the spec (tests/phi3small_ref.py).

Tiny random checkpoints in the Hugging Face `phi3small` layout go through the config reader and the
weight importer into the model; logits must match the float64 reference, and must NOT match the
reference with one spec §11 trap reverted (so each test fails if the model makes that mistake).
Also: the block-sparse layer equals dense attention up to local_blocks * block_size tokens, parameter
counts of the full presets, config.json reading / writing, and import / export round trips.
"""
import functools
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import phi3_jax
from phi3_jax.checkpoint import model_from_params, unflatten
from phi3_jax.convert import hf as hf_io
from phi3_jax.convert.hf_weights import CheckpointError, expected_hf_shapes, params_from_hf, params_to_hf
from phi3_jax.model import ConfigError, abstract_model, from_hf_config, get_preset, to_hf_config
from phi3_jax.model import params as P
from phi3_jax.model.attention import Attention
from phi3_jax.model.decoder import blocksparse_layout
from phi3_jax.model.layers import rope_tables
from phi3small_ref import DUMMY_IDS_100352, F32_MIN, forward

TOL = 1e-4  # float32 model vs float64 reference, relative to the largest logit (reached: ~1e-6)
TRAP = 1e-2  # a reverted trap must move the logits by more than this


def tiny_hf(**kw):
    """A phi3small config.json as the remote code reads it (field names of spec §2.2)."""
    hf = {
        "model_type": "phi3small", "architectures": ["Phi3SmallForCausalLM"], "vocab_size": 384,
        "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "ff_intermediate_size": 96, "ff_dim_multiplier": None, "gegelu_pad_to_256": True, "hidden_act": "gegelu",
        "gegelu_limit": 2.0, "layer_norm_epsilon": 1e-5, "max_position_embeddings": 256,
        "rope_embedding_base": 1000000, "rope_position_scale": 1.0, "rope_scaling": None,
        "dense_attention_every_n_layers": 2, "blocksparse_block_size": 8, "blocksparse_triton_kernel_block_size": 8,
        "blocksparse_num_local_blocks": 2, "blocksparse_vert_stride": 4, "blocksparse_homo_head_pattern": False,
        "mup_use_scaling": True, "mup_attn_multiplier": 1.0, "mup_embedding_multiplier": 10.0,
        "mup_width_multiplier": 8.0, "embedding_dropout_prob": 0.1, "attention_dropout_prob": 0.0,
        "ffn_dropout_prob": 0.1, "initializer_range": 0.02, "bos_token_id": 100257, "eos_token_id": 100257,
        "pad_sequence_to_multiple_of_64": True, "reorder_and_upcast_attn": False, "attention_bias": False,
        "torch_dtype": "float32", "use_cache": True,
    }
    hf.update(kw)
    return hf


def spec_shapes(hf):
    """Checkpoint tensors and shapes of spec §7.2 (torch [out, in]); tied head absent."""
    D, nH, nKV, L = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"], hf["num_hidden_layers"]
    hd, I = D // nH, hf["ff_intermediate_size"]
    if I is None:  # Phi3SmallConfig.intermediate_size from the multiplier
        I = hf["ff_dim_multiplier"] * (D // 3) * 2
        I = -(-I // 256) * 256 if hf.get("gegelu_pad_to_256", True) else I
    s = {"model.embed_tokens.weight": (hf["vocab_size"], D),
         "model.final_layernorm.weight": (D,), "model.final_layernorm.bias": (D,)}
    for i in range(L):
        p = f"model.layers.{i}."
        s |= {p + "self_attn.query_key_value.weight": ((nH + 2 * nKV) * hd, D),
              p + "self_attn.query_key_value.bias": ((nH + 2 * nKV) * hd,),
              p + "self_attn.dense.weight": (D, nH * hd), p + "self_attn.dense.bias": (D,),
              p + "mlp.up_proj.weight": (2 * I, D), p + "mlp.up_proj.bias": (2 * I,),
              p + "mlp.down_proj.weight": (D, I), p + "mlp.down_proj.bias": (D,)}
        for n in ("input_layernorm", "post_attention_layernorm"):
            s |= {p + n + ".weight": (D,), p + n + ".bias": (D,)}
    return s


def random_tensors(hf, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in spec_shapes(hf).items():
        if name.endswith("embed_tokens.weight"):
            a = rng.normal(0, 0.1, shape)
        elif "layernorm.weight" in name:
            a = 1 + 0.2 * rng.normal(size=shape)
        elif name.endswith(".bias"):
            a = 0.2 * rng.normal(size=shape)
        else:  # sharper attention from a larger qkv gain, so the score scale matters
            gain = 2.0 if "query_key_value" in name else 1.0
            a = rng.normal(0, gain / np.sqrt(shape[1]), shape)
        out[name] = a.astype(np.float32)
    return out


def model_from(hf, tensors, **cfg_changes):
    """config.json + checkpoint tensors -> Decoder, through the reader and the weight importer."""
    cfg = from_hf_config(hf)
    if cfg_changes:
        cfg = cfg.replace(**cfg_changes)
    params = params_from_hf(cfg, tensors.__getitem__, set(tensors), P.param_shapes(abstract_model(cfg)))
    return model_from_params(cfg, unflatten({k: jnp.asarray(v) for k, v in params.items()}))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids, impl="xla")


def run(model, ids):
    """Logits of a [batch, seq] id array, as numpy (one jitted call: quicker than eager on CPU)."""
    return np.asarray(_forward(*nnx.split(model), jnp.asarray(ids)))


def rel(out, ref):
    """max |out - ref| relative to the largest finite, unmasked reference logit (float64)."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    live = ref != F32_MIN
    return np.abs(out - ref).max() / np.abs(ref[live]).max()


# Further cases: (config.json changes, T) with T not a multiple of the block and past the local window
# (local_blocks * block_size), so the sparse layers are sparse; two sequences each. The GQA-2 case with
# the real vocabulary is `trap_case` below. Slow-marked cases run in the full CI run (--runslow).
CASES = {
    # GQA 3, block 16 x 3 local blocks, vert stride 3, two layers.
    "gqa3_b16": pytest.param(
        dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=2,
             blocksparse_block_size=16, blocksparse_triton_kernel_block_size=16, blocksparse_num_local_blocks=3,
             blocksparse_vert_stride=3, gegelu_limit=20.0), 75),
    # MQA (2 q heads on 1 kv head); vert stride 8 > heads gives head step 4; block 4.
    "mqa_step4": pytest.param(
        dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, blocksparse_block_size=4,
             blocksparse_triton_kernel_block_size=4, blocksparse_vert_stride=8), 61),
    # MHA, homogeneous heads, mup_use_scaling false (1/sqrt(head_dim)), size from ff_dim_multiplier.
    "mha_homo_nomup": pytest.param(
        dict(num_key_value_heads=4, blocksparse_homo_head_pattern=True, mup_use_scaling=False,
             ff_intermediate_size=None, ff_dim_multiplier=1, gegelu_pad_to_256=False), 45, marks=pytest.mark.slow),
}


@pytest.mark.parametrize("changes,T", list(CASES.values()), ids=list(CASES))
def test_matches_float64_reference(changes, T):
    hf = tiny_hf(**changes)
    tensors = random_tensors(hf, seed=T)
    ids = np.random.default_rng(1).integers(0, hf["vocab_size"], (2, T))
    out = run(model_from(hf, tensors), ids)
    for b in range(2):
        assert rel(out[b], forward(hf, tensors, ids[b])) < TOL


@pytest.mark.parametrize("T,short_mscale,long_mscale", [
    (40, None, None), (30, 1.07, 1.3), *(pytest.param(*p, marks=pytest.mark.slow)
                                         for p in [(30, None, None), (40, 1.07, 1.3), (40, 0.0, 0.0)])])
def test_longrope_matches_reference(T, short_mscale, long_mscale):
    """128k-style LongRoPE: short factors and short_mscale (default 1.0) up to L0, long ones beyond."""
    rng = np.random.default_rng(3)
    rs = {"type": "su", "original_max_position_embeddings": 32, "short_factor": list(1 + rng.random(8)),
          "long_factor": list(1 + 8 * rng.random(8))}
    if short_mscale is not None:
        rs |= {"short_mscale": short_mscale, "long_mscale": long_mscale}
    hf = tiny_hf(num_hidden_layers=2, rope_scaling=rs, max_position_embeddings=1024)
    tensors = random_tensors(hf, seed=4)
    ids = rng.integers(0, hf["vocab_size"], (1, T))
    out = run(model_from(hf, tensors), ids)[0]
    assert rel(out, forward(hf, tensors, ids[0])) < TOL
    # The reference's mscale rule matters: ignoring it (m = 1 on the long branch) is visibly wrong.
    if T > 32 and long_mscale != 1.0:
        plain = forward(dict(hf, rope_scaling=dict(rs, long_mscale=1.0, short_mscale=1.0)), tensors, ids[0])
        assert rel(out, plain) > TRAP


@pytest.fixture(scope="module")
def trap_case():
    """GQA 2 (4 q heads, 2 kv heads), head step 1, window 2 x 8 = 16 tokens, T = 53, the real vocabulary."""
    hf = tiny_hf(vocab_size=100352)
    tensors = random_tensors(hf, seed=11)
    ids = np.random.default_rng(12).integers(0, hf["vocab_size"], (2, 53))
    out = run(model_from(hf, tensors), ids)
    assert rel(out[1], forward(hf, tensors, ids[1])) < TOL
    return hf, tensors, ids[0], out[0]


TRAPS = {
    "scale_1_over_sqrt_head_dim": dict(scale="sqrt"),
    "qkv_contiguous_QKV": dict(qkv="contiguous"),
    "gegelu_halves_not_interleaved": dict(mlp="halves"),
    "gegelu_without_plus_one": dict(plus_one=False),
    "sparse_offsets_by_kv_head": dict(head_offsets="kv"),
    "sparse_offsets_same_for_all_heads": dict(head_offsets="none"),
    "dense_on_even_layers": dict(dense_layers="even"),
    "no_logit_division": dict(divide_logits=False),
    "no_dummy_mask": dict(mask_dummy=False),
    "no_embedding_multiplier": dict(embed_mult=False),
}


@pytest.mark.parametrize("trap", sorted(TRAPS))
def test_each_trap_is_detected(trap_case, trap):
    hf, tensors, ids, out = trap_case
    assert rel(out, forward(hf, tensors, ids)) < TOL
    assert rel(out, forward(hf, tensors, ids, **TRAPS[trap])) > TRAP


def test_dummy_ids_masked_to_float32_min(trap_case):
    hf, _, _, out = trap_case
    assert len(DUMMY_IDS_100352) == 91 and len(set(DUMMY_IDS_100352)) == 91
    assert np.all(out[:, DUMMY_IDS_100352] == F32_MIN)
    live = np.setdiff1d(np.arange(hf["vocab_size"]), DUMMY_IDS_100352)
    assert np.all(out[:, live] > -1e4)
    assert 100257 in live and 100266 in live  # <|endoftext|> and <|end|> stay predictable


@pytest.mark.slow
def test_unrolled_layers_match_scan(trap_case):
    hf, tensors, ids, out = trap_case
    out2 = run(model_from(hf, tensors, scan_layers=False), ids[None])[0]
    assert rel(out2, out) < 1e-5


def test_sparse_layer_equals_dense_up_to_the_local_window():
    cfg = get_preset("phi-3-small-tiny")  # block 16, 4 local blocks -> dense-equal up to 64 tokens
    window = cfg.blocksparse_block_size * cfg.blocksparse_local_blocks
    graphdef, state = nnx.split(Attention(cfg, rngs=nnx.Rngs(0)))
    layout = blocksparse_layout(cfg)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def both(T, _, x):
        attn = nnx.merge(graphdef, state)
        cos, sin = rope_tables(cfg, jnp.arange(T)[None], jnp.float32)
        return (attn(x[:, :T], cos, sin, layout=layout, impl="xla"),
                attn(x[:, :T], cos, sin, layout=None, impl="xla"))

    x = jax.random.normal(jax.random.key(1), (1, window + 9, cfg.hidden_size))
    sparse, dense = both(window, None, x)
    np.testing.assert_array_equal(np.asarray(sparse), np.asarray(dense))
    sparse, dense = (np.asarray(a)[0] for a in both(window + 9, None, x))
    np.testing.assert_allclose(sparse[:window], dense[:window], rtol=0, atol=1e-6)  # causal: earlier rows agree
    assert np.abs(sparse[window:] - dense[window:]).max() > 0.1 * np.abs(dense[window:]).max()


def test_packed_rows_give_each_document_the_logits_it_gets_alone():
    """The block-sparse pattern is applied by row position; the packer's alignment makes that each
    document's own pattern, so a packed row's logits equal every document's logits on its own."""
    import grain

    from phi3_jax.data import pack
    from phi3_jax.train_data import packing_alignment

    cfg = get_preset("phi-3-small-tiny", attention_impl="xla")  # blocks of 16, stride 2, 4 local blocks
    align = packing_alignment(cfg)
    assert (align.period, align.max_unaligned) == (32, 49)
    assert packing_alignment(get_preset("phi-3-small-8k")) == type(align)(512, 961)
    assert packing_alignment(get_preset("phi-3-mini-4k")) is None
    assert packing_alignment(cfg, seq_len=49) is None  # no piece of a 49-token row outgrows the window
    model = phi3_jax.model.init_model(cfg, seed=0)
    rng = np.random.RandomState(0)
    docs = [{"tokens": rng.randint(2, cfg.vocab_size, n).astype(np.int32)} for n in (20, 150, 30, 120, 10, 90)]

    def worst(align):
        row = next(iter(pack(grain.MapDataset.source(docs).to_iter_dataset(), 256, 0, align=align)))
        seg, pos = row["segment_ids"][None], row["positions"][None]
        packed = np.asarray(model(row["inputs"][None], positions_BT=pos, segment_ids_BT=seg))[0]
        err = 0.0
        for s in np.unique(seg[seg > 0]):
            (idx,) = np.nonzero(seg[0] == s)
            if pos[0, idx[0]] == 0:  # a document's first piece: the same tokens alone
                alone = np.asarray(model(row["inputs"][None, idx]))[0]
                err = max(err, float(np.abs(packed[idx] - alone).max() / np.abs(alone).max()))
        return err

    assert worst(align) < 1e-5
    assert worst(None) > 1e-3  # unaligned, the 150-token document at offset 20 sees a shifted pattern


# ------------------------------------------------------------------------------------------------------
# Full-size presets: shapes and counts without allocating (spec §7.2)
# ------------------------------------------------------------------------------------------------------

# Spec §7.2 shapes: embedding 100352 x 4096 (tied) + 32 x [qkv 6144 x 4096 + 6144, dense 4096^2 + 4096,
# up 28672 x 4096 + 28672, down 4096 x 14336 + 4096, 2 LayerNorms x 2 x 4096] + final LayerNorm 2 x 4096.
SPEC_COUNT = 100352 * 4096 + 32 * (6144 * 4096 + 6144 + 4096 * 4096 + 4096 + 28672 * 4096 + 28672
                                   + 4096 * 14336 + 4096 + 4 * 4096) + 2 * 4096


@pytest.mark.parametrize("name", ["phi-3-small-8k", "phi-3-small-128k"])
def test_full_preset_count_and_tensor_table(name):
    assert SPEC_COUNT == 7_392_272_384  # "7.392 B (tied emb.)", spec §1
    cfg = get_preset(name)
    model = abstract_model(cfg)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert sum(int(np.prod(a.shape)) for a in leaves) == SPEC_COUNT
    assert cfg.param_count() == SPEC_COUNT
    table = expected_hf_shapes(cfg, P.param_shapes(model))
    hf = to_hf_config(cfg.replace(rope_scaling=None, rope_short_mscale=1.0, rope_long_mscale=1.0,
                                  max_position_embeddings=8192))
    assert table == spec_shapes(hf)  # names and [out, in] shapes of §7.2, no lm_head.weight


# ------------------------------------------------------------------------------------------------------
# config.json
# ------------------------------------------------------------------------------------------------------

def released_8k():
    """The released Phi-3-small-8k-instruct config.json fields (spec §2.2)."""
    return tiny_hf(vocab_size=100352, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, ff_intermediate_size=14336, gegelu_limit=20.0,
                   max_position_embeddings=8192, blocksparse_block_size=64, blocksparse_triton_kernel_block_size=64,
                   blocksparse_num_local_blocks=16, blocksparse_vert_stride=8, torch_dtype="bfloat16",
                   _name_or_path="Phi-3-small-8k-instruct", transformers_version="4.38.1",
                   auto_map={"AutoConfig": "configuration_phi3_small.Phi3SmallConfig"})


def test_released_configs_read_as_presets():
    assert from_hf_config(released_8k()) == get_preset("phi-3-small-8k")
    rs = {"type": "su", "original_max_position_embeddings": 8192, "short_factor": [1.0] * 64,
          "long_factor": [2.0] * 64}
    cfg = from_hf_config(dict(released_8k(), max_position_embeddings=131072, rope_scaling=rs))
    assert cfg == get_preset("phi-3-small-128k", rope_short_factor=(1.0,) * 64, rope_long_factor=(2.0,) * 64)
    # Spec §4 small-128k rules: short_mscale if > 0 else 1.0; long_mscale if > 0 else the sqrt formula.
    assert cfg.rope_short_mscale == 1.0 and cfg.rope_long_mscale == pytest.approx(1.1435437497937313, abs=1e-15)
    cfg = from_hf_config(dict(released_8k(), max_position_embeddings=131072,
                              rope_scaling=dict(rs, short_mscale=1.1, long_mscale=1.2)))
    assert (cfg.rope_short_mscale, cfg.rope_long_mscale) == (1.1, 1.2)
    cfg = from_hf_config(dict(released_8k(), max_position_embeddings=131072,
                              rope_scaling=dict(rs, short_mscale=0.0, long_mscale=-1)))
    assert cfg.rope_short_mscale == 1.0 and cfg.rope_long_mscale == pytest.approx(1.1435437497937313, abs=1e-15)


def test_config_fields_that_change_nothing_or_derive_values():
    base = from_hf_config(tiny_hf())
    # attention_bias is ignored by the remote code (biases are always there).
    assert from_hf_config(tiny_hf(attention_bias=True, reorder_and_upcast_attn=True,
                                  pad_sequence_to_multiple_of_64=False)) == base
    # Dropout is read (training-only): embeddings and MLP outputs.
    drop = from_hf_config(tiny_hf(embedding_dropout_prob=0.0, ffn_dropout_prob=0.3))
    assert (drop.embd_dropout, drop.resid_attn_dropout, drop.resid_mlp_dropout) == (0.0, 0.0, 0.3)
    # Fields left out take the Phi3SmallConfig defaults.
    hf = tiny_hf()
    for key in ("attention_bias", "reorder_and_upcast_attn", "embedding_dropout_prob", "gegelu_pad_to_256"):
        del hf[key]
    assert from_hf_config(hf) == base
    # ff_dim_multiplier: I = mult * (hidden // 3) * 2, padded to a multiple of 256 when gegelu_pad_to_256.
    assert from_hf_config(tiny_hf(ff_intermediate_size=None, ff_dim_multiplier=4)).intermediate_size == 256
    assert from_hf_config(tiny_hf(ff_intermediate_size=None, ff_dim_multiplier=4,
                                  gegelu_pad_to_256=False)).intermediate_size == 168
    # A kernel tile dividing the block leaves the token mask unchanged.
    assert from_hf_config(tiny_hf(blocksparse_triton_kernel_block_size=4)) == base
    # Untied checkpoints are read as untied (and then need lm_head.weight).
    assert not from_hf_config(tiny_hf(tie_word_embeddings=False)).tie_embeddings
    assert from_hf_config(tiny_hf()).dummy_token_ids == ()  # dummies exist only in the 100352 vocabulary


@pytest.mark.parametrize("changes,field", [
    (dict(new_thing=1), "new_thing"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(ff_dim_multiplier=4), "ff_dim_multiplier"),
    (dict(blocksparse_triton_kernel_block_size=16), "blocksparse_triton_kernel_block_size"),
    (dict(dense_attention_every_n_layers=None), "dense_attention_every_n_layers"),
    (dict(dense_attention_every_n_layers=3), "dense_attention_every_n_layers"),
    (dict(rope_position_scale=2.0), "rope_position_scale"),
    (dict(gegelu_limit=None), "gegelu_limit"),
    (dict(ffn_dropout_prob=1.5), "ffn_dropout_prob"),
    (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "factor"),
    (dict(rope_scaling={"type": "su", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}),
     "original_max_position_embeddings"),
    (dict(rope_scaling={"type": "su", "original_max_position_embeddings": 64, "short_factor": [1.0] * 7,
                        "long_factor": [1.0] * 8}), "short_factor"),
    (dict(num_key_value_heads=3), "num_kv_heads"),
])
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        from_hf_config(tiny_hf(**changes))


@pytest.mark.parametrize("name", ["phi-3-small-8k", "phi-3-small-tiny", "phi-3-small-tiny-long", "128k"])
def test_config_round_trip(name):
    if name == "128k":
        cfg = get_preset("phi-3-small-128k", rope_short_factor=tuple(np.linspace(1, 2, 64)),
                         rope_long_factor=tuple(np.linspace(1, 9, 64)))
    else:
        cfg = get_preset(name)
    hf = json.loads(json.dumps(to_hf_config(cfg)))
    assert from_hf_config(hf) == cfg


# ------------------------------------------------------------------------------------------------------
# Weights: the HF phi3small layout through the common convert code
# ------------------------------------------------------------------------------------------------------

def test_weight_table_round_trip_and_ignored_names():
    hf = tiny_hf()
    tensors = random_tensors(hf, seed=5)
    cfg = from_hf_config(hf)
    shapes = P.param_shapes(abstract_model(cfg))
    names = set(tensors) | {"model.layers.0.self_attn.rotary_emb.inv_freq"}  # buffer: ignored on import
    src = dict(tensors, **{"model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(8, np.float32)})
    params = params_from_hf(cfg, src.__getitem__, names, shapes)
    # The fused layouts stay fused: the qkv kernel is the transposed query_key_value weight, the MLP
    # kernel the transposed (interleaved) up_proj weight.
    np.testing.assert_array_equal(params[("layers", "self_attn", "qkv_proj", "kernel")][1],
                                  tensors["model.layers.1.self_attn.query_key_value.weight"].T)
    np.testing.assert_array_equal(params[("layers", "mlp", "gate_up_proj", "bias")][3],
                                  tensors["model.layers.3.mlp.up_proj.bias"])
    np.testing.assert_array_equal(params[("norm", "bias")], tensors["model.final_layernorm.bias"])
    back = params_to_hf(cfg, params)
    assert set(back) == set(tensors) and "lm_head.weight" not in back
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and np.array_equal(back[k], tensors[k]), k
    with pytest.raises(CheckpointError, match="lm_head.weight"):  # untied config needs the head
        untied = from_hf_config(tiny_hf(tie_word_embeddings=False))
        params_from_hf(untied, tensors.__getitem__, set(tensors), P.param_shapes(abstract_model(untied)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_folder_import_export_bit_identical(tmp_path, dtype):
    hf = tiny_hf(torch_dtype=dtype)
    tensors = random_tensors(hf, seed=6)
    if dtype == "bfloat16":
        tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(hf))
    save_file(dict(tensors, **{"model.layers.2.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}),
              str(src / "model.safetensors"))
    cfg, params = hf_io.read_hf(src)
    assert cfg == from_hf_config(hf)
    hf_io.write_hf(tmp_path / "out", cfg, params)
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(written) == set(tensors)  # no lm_head.weight, no inv_freq
    for k, v in tensors.items():
        assert written[k].dtype == v.dtype and written[k].tobytes() == v.tobytes(), k
    assert from_hf_config(json.loads((tmp_path / "out" / "config.json").read_text())) == cfg
    # phi3_jax.load reads the folder; its logits are the reference's.
    ids = np.arange(1, 30) * 7 % hf["vocab_size"]
    out = run(phi3_jax.load(src, dtype="float32"), ids[None])[0]
    ref_tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    assert rel(out, forward(hf, ref_tensors, ids)) < TOL


def test_tokenizer_and_model_agree_on_dummy_ids():
    tokenizers = pytest.importorskip("phi3_jax.data.tokenizers")
    cfg = get_preset("phi-3-small-8k")
    assert tuple(cfg.dummy_token_ids) == tuple(DUMMY_IDS_100352) == tuple(tokenizers.PHI3_SMALL_DUMMY_IDS)
    assert cfg.vocab_size == tokenizers.PHI3_SMALL_VOCAB_SIZE
    assert cfg.bos_token_id == cfg.eos_token_id == tokenizers.PHI3_SMALL_SPECIAL_TOKENS["<|endoftext|>"]
