"""--init_from: fine-tuning starts from another run's weights or a Hugging Face folder (weights only)."""
import jax
import numpy as np
import pytest

from train_helpers import load_config

from phi3_jax.checkpoint import CheckpointError, read_config, restore_params
from phi3_jax.train import run


def _cfg(steps, lr=None):
    c = load_config("tiny", "test")
    c.train.steps = steps
    c.mesh.fsdp = 1
    if lr is not None:
        c.train.lr = lr
    return c


def test_init_from_a_workdir_and_from_hugging_face(tmp_path):
    src = tmp_path / "pretrain"
    run(_cfg(4), str(src))
    base = restore_params(src, read_config(src))
    # lr = 0: the fine-tuning run keeps exactly the weights it started from.
    ft = tmp_path / "finetune"
    res = run(_cfg(2, lr=0.0), str(ft), init_from=str(src))
    assert res.step == 2
    got = restore_params(ft, read_config(ft))
    jax.tree.map(np.testing.assert_array_equal, base, got)
    # The same command later resumes from the run's own checkpoint, even with the source moved away.
    src.rename(tmp_path / "moved")
    assert run(_cfg(3, lr=0.0), str(ft), init_from=str(src)).step == 3

    # A Hugging Face folder written by transformers itself.
    torch = pytest.importorskip("torch")
    from transformers import Phi3Config, Phi3ForCausalLM

    from phi3_jax.train_config import validate

    m = validate(_cfg(1)).model
    hf_cfg = Phi3Config(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                        num_key_value_heads=m.num_kv_heads, max_position_embeddings=m.max_position_embeddings,
                        original_max_position_embeddings=m.original_max_position_embeddings,
                        sliding_window=m.sliding_window, bos_token_id=m.bos_token_id, eos_token_id=m.eos_token_id,
                        pad_token_id=m.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf_dir = tmp_path / "hf"
    Phi3ForCausalLM(hf_cfg).save_pretrained(hf_dir, safe_serialization=True)
    res = run(_cfg(2, lr=0.0), str(tmp_path / "from_hf"), init_from=str(hf_dir))
    got = restore_params(tmp_path / "from_hf", read_config(tmp_path / "from_hf"))
    want = restore_params(hf_dir, m.replace(param_dtype="float32"), "float32")
    jax.tree.map(np.testing.assert_array_equal, want, got)


def test_init_from_a_missing_path_fails_before_writing(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        run(_cfg(2), str(tmp_path / "wd"), init_from=str(tmp_path / "nothing"))
    assert not (tmp_path / "wd").exists()


def test_sft_from_a_pretrained_workdir_trains_on_the_replies(tmp_path):
    """configs/tiny.py:sft started from a pretraining run: its loss is the mean next-token loss of the
    assistants' reply tokens only, as the model alone computes it on the same batch."""
    import phi3_jax
    from phi3_jax.data import make_pipeline, make_tokenizer_from_config

    src = tmp_path / "pretrain"
    run(_cfg(2), str(src))
    c = load_config("tiny", "sft,test")
    c.mesh.fsdp, c.train.steps, c.train.lr, c.sample.max_new_tokens = 1, 1, 0.0, 8
    res = run(c, str(tmp_path / "sft"), init_from=str(src))
    assert isinstance(res.sample, str)

    t = c.train
    batch = next(make_pipeline(c.data, make_tokenizer_from_config(c.data), t.seq_len, t.batch_size, t.seed))
    model = phi3_jax.load(str(src))
    logits = model(batch["inputs"], positions_BT=batch["positions"], segment_ids_BT=batch["segment_ids"])
    nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), batch["targets"][..., None], -1)[..., 0]
    replies = batch["loss_mask"] > 0
    seg = batch["segment_ids"]
    same_document = (seg[:, :-1] > 0) & (seg[:, 1:] == seg[:, :-1])  # targets inside the row's documents
    assert not (replies[:, :-1] & ~same_document).any() and 0 < replies.sum() < 0.8 * same_document.sum()
    np.testing.assert_allclose(res.losses[1], nll[replies].mean(), rtol=1e-4)
    assert abs(nll[:, :-1][same_document].mean() - nll[replies].mean()) > 0.01  # the mask matters to this check
