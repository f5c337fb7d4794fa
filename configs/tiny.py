"""The default config: a 3.3M-parameter Phi-3 that learns the synthetic textbooks on a laptop CPU.

    python -m phi3_jax.train --config configs/tiny.py --workdir /tmp/tiny

Byte-level tokenizer (no files), synthetic "textbook" lessons (arithmetic, logic, definitions, Python
snippets), 256-token packed rows. On 2 CPU cores it takes a few minutes and ends with a loss far below
the data's unigram entropy (printed at the start), then prints a greedy sample.

ARG: "" (default) or "test" (a few steps, small, no eval/sample: for smoke tests).
"""
from phi3_jax.train_config import default_config, model_section, textbook_cpu_run


def get_config(arg: str = ""):
    c = default_config()
    c.model = model_section("phi-3-tiny", vocab_size=320, hidden_size=256, num_layers=4, num_heads=8,
                            num_kv_heads=4, head_dim=32, intermediate_size=768, max_position_embeddings=4096,
                            original_max_position_embeddings=4096, bos_token_id=256, eos_token_id=256,
                            pad_token_id=261, attention_impl="xla")
    textbook_cpu_run(c, steps=300, batch_size=8)
    c.sample.max_new_tokens = 160
    if arg == "test":
        c.model.hidden_size = 64
        c.model.num_layers = 2
        c.model.num_heads = 4
        c.model.num_kv_heads = 2
        c.model.head_dim = 16
        c.model.intermediate_size = 128
        t = c.train
        t.steps, t.batch_size, t.seq_len = 6, 8, 64
        t.warmup_steps, t.log_every, t.eval_every, t.checkpoint_every = 2, 1, 0, 0
        t.tensorboard = t.progress = False
        c.sample.max_new_tokens = 0
    elif arg:
        raise ValueError(f"configs/tiny.py: unknown ARG {arg!r} (use '' or 'test')")
    return c
