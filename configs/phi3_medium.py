"""Phi-3-medium (14B, 4k context) pretraining; ARG "tiny" / "runlocal": the same architecture shrunk for a CPU.

    python -m phi3_jax.train --config configs/phi3_medium.py --workdir gs://bucket/medium \
        --config.data.tokenizer.path=/path/to/tokenizer.model

Full size: the phi-3-medium-4k preset (40 layers, width 5120, 40 query / 10 kv heads, sliding window
2047), FSDP within a host and data parallelism across (mesh.data=-1 with mesh.fsdp set to the chips per
host is a good start on a pod; the default is FSDP over every device), bf16 compute, full remat.
"""
from phi3_jax.train_config import default_config, model_section, pretrain_run, textbook_cpu_run

TINY = dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32, intermediate_size=896,
            vocab_size=320, max_position_embeddings=4096, original_max_position_embeddings=4096,
            sliding_window=2047, bos_token_id=256, eos_token_id=256, pad_token_id=261, attention_impl="xla")


def get_config(arg: str = ""):
    c = default_config()
    if arg in ("tiny", "runlocal"):
        c.model = model_section("phi-3-medium-4k", **TINY)
        return textbook_cpu_run(c)
    if arg:
        raise ValueError(f"configs/phi3_medium.py: unknown ARG {arg!r} (use '', 'tiny' or 'runlocal')")
    c.model = model_section("phi-3-medium-4k", remat="full")
    c.data.tokenizer.kind = "sentencepiece"
    return pretrain_run(c, batch_size=1024, seq_len=4096, lr=2e-4, checkpoint_every=500)
