"""Phi-3-mini (3.8B, 4k context) pretraining; ARG "tiny" / "runlocal": the same architecture shrunk for a CPU.

    python -m phi3_jax.train --config configs/phi3_mini.py --workdir gs://bucket/mini \
        --config.data.tokenizer.path=/path/to/tokenizer.model
    python -m phi3_jax.train --config configs/phi3_mini.py:tiny --workdir /tmp/mini_tiny

Full size: the phi-3-mini-4k preset (32 layers, width 3072, 32 heads, sliding window 2047), Llama-2
SentencePiece vocabulary (set data.tokenizer.path), bf16 compute over float32 master weights, FSDP over
every device (mesh.fsdp=-1), full rematerialisation. Fine-tune a released checkpoint with
--init_from /path/to/Phi-3-mini-4k-instruct (a Hugging Face folder) and a lower train.lr.
"""
from phi3_jax.train_config import default_config, model_section

TINY = dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=8, head_dim=32, intermediate_size=688,
            vocab_size=320, max_position_embeddings=4096, original_max_position_embeddings=4096,
            sliding_window=2047, bos_token_id=256, eos_token_id=256, pad_token_id=261, attention_impl="xla")


def get_config(arg: str = ""):
    c = default_config()
    if arg in ("tiny", "runlocal"):
        c.model = model_section("phi-3-mini-4k", **TINY)
        d = c.data
        d.sources = [dict(d.sources[0], name="textbook", kind="textbook", weight=1.0)]
        d.phases = [dict(name="pretrain", tokens=0, weights={})]
        d.eval_fraction, d.eval_max_docs = 0.001, 64
        t = c.train
        t.steps, t.batch_size, t.seq_len, t.lr, t.warmup_steps = 200, 16, 256, 3e-3, 20
        t.log_every, t.eval_every, t.eval_steps, t.checkpoint_every = 10, 100, 4, 100
        c.precision.compute_dtype = "float32"
        c.sample.prompt = "Exercise 1: What is 12 + 7?\nSolution:"
        return c
    if arg:
        raise ValueError(f"configs/phi3_mini.py: unknown ARG {arg!r} (use '', 'tiny' or 'runlocal')")
    c.model = model_section("phi-3-mini-4k", remat="full")
    c.data.tokenizer.kind = "sentencepiece"  # set data.tokenizer.path to the Llama-2 / Phi-3 tokenizer.model
    t = c.train
    t.steps, t.batch_size, t.seq_len = 100_000, 512, 4096
    t.lr, t.warmup_steps, t.min_lr_ratio, t.schedule = 3e-4, 2000, 0.1, "cosine"
    t.weight_decay, t.b1, t.b2, t.clip_norm = 0.1, 0.9, 0.95, 1.0
    t.log_every, t.eval_every, t.eval_steps = 10, 1000, 20
    t.checkpoint_every, t.keep_last, t.keep_every = 1000, 2, 10_000
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.precision.param_dtype, c.precision.compute_dtype = "float32", "bfloat16"
    c.sample.prompt = "<|user|>\nWhat is 12 + 7?<|end|>\n<|assistant|>\n"
    return c
