"""Phi-3-mini (3.8B, 4k context) pretraining; ARG "tiny" / "runlocal": the same architecture shrunk for a CPU.

    python -m phi3_jax.train --config configs/phi3_mini.py --workdir gs://bucket/mini \
        --config.data.tokenizer.path=/path/to/tokenizer.model
    python -m phi3_jax.train --config configs/phi3_mini.py:tiny --workdir /tmp/mini_tiny

Full size: the phi-3-mini-4k preset (32 layers, width 3072, 32 heads, sliding window 2047), Llama-2
SentencePiece vocabulary (set data.tokenizer.path), bf16 compute over float32 master weights, FSDP over
every device (mesh.fsdp=-1), full rematerialisation. Fine-tune a released checkpoint with
--init_from /path/to/Phi-3-mini-4k-instruct (a Hugging Face folder) and a lower train.lr.
"""
from phi3_jax.train_config import default_config, model_section, pretrain_run, textbook_cpu_run

TINY = dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=8, head_dim=32, intermediate_size=688,
            vocab_size=320, max_position_embeddings=4096, original_max_position_embeddings=4096,
            sliding_window=2047, bos_token_id=256, eos_token_id=256, pad_token_id=261, attention_impl="xla")


def get_config(arg: str = ""):
    c = default_config()
    if arg in ("tiny", "runlocal"):
        c.model = model_section("phi-3-mini-4k", **TINY)
        return textbook_cpu_run(c)
    if arg:
        raise ValueError(f"configs/phi3_mini.py: unknown ARG {arg!r} (use '', 'tiny' or 'runlocal')")
    c.model = model_section("phi-3-mini-4k", remat="full")
    c.data.tokenizer.kind = "sentencepiece"  # set data.tokenizer.path to the Llama-2 / Phi-3 tokenizer.model
    return pretrain_run(c, batch_size=512, seq_len=4096, lr=3e-4)
