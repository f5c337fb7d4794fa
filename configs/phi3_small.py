"""Phi-3-small (7B, 8k context: GEGLU, muP multipliers, GQA, alternating dense / block-sparse attention);
ARG "tiny" / "runlocal": the same family shrunk for a CPU.

    python -m phi3_jax.train --config configs/phi3_small.py --workdir gs://bucket/small \
        --config.data.tokenizer.path=/path/to/cl100k_base.tiktoken
    python -m phi3_jax.train --config configs/phi3_small.py:tiny --workdir /tmp/small_tiny

Tiny variant: family phi3small with LayerNorm, biases, gegelu, tied embeddings, embedding_multiplier 10,
attn_scale_multiplier 1 (scores scaled by 1/head_dim), logit_divisor = the muP width multiplier
(width 256 over a base width of 128 = 2), dense attention on every second layer and block-sparse on the
others with 16-token blocks, 2 local blocks and vertical stride 4, so at seq_len 256 a sparse layer sees
32 local tokens plus every fourth block before them; packed documents longer than 17 tokens start at
multiples of 64 tokens in their row, so each sees its own pattern (phi3_jax/data/packing.py).
"""
from phi3_jax.train_config import default_config, model_section, pretrain_run, textbook_cpu_run

TINY_BASE_WIDTH = 128
TINY = dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32, intermediate_size=512,
            vocab_size=320, max_position_embeddings=4096, original_max_position_embeddings=4096,
            embedding_multiplier=10.0, attn_scale_multiplier=1.0, logit_divisor=256 / TINY_BASE_WIDTH,
            dense_attention_every_n_layers=2, blocksparse_block_size=16, blocksparse_local_blocks=2,
            blocksparse_vert_stride=4, dummy_token_ids=(), bos_token_id=256, eos_token_id=256, pad_token_id=261,
            attention_impl="auto")


def get_config(arg: str = ""):
    c = default_config()
    if arg in ("tiny", "runlocal"):
        c.model = model_section("phi-3-small-8k", **TINY)
        return textbook_cpu_run(c)
    if arg:
        raise ValueError(f"configs/phi3_small.py: unknown ARG {arg!r} (use '', 'tiny' or 'runlocal')")
    c.model = model_section("phi-3-small-8k", remat="full")
    c.data.tokenizer.kind = "tiktoken"  # set data.tokenizer.path to the cl100k_base ranks file
    c.data.tokenizer.preset = "phi3-small"
    return pretrain_run(c, batch_size=512, seq_len=8192, lr=3e-4)
