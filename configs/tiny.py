"""The default config: a 3.3M-parameter Phi-3 that learns the synthetic textbooks on a laptop CPU.

    python -m phi3_jax.train --config configs/tiny.py --workdir /tmp/tiny

Byte-level tokenizer (no files), synthetic "textbook" lessons (arithmetic, logic, definitions, Python
snippets), 256-token packed rows. On 2 CPU cores it takes a few minutes and ends with a loss far below
the data's unigram entropy (printed at the start), then prints a greedy sample.

ARG: comma-separated, any of
  ""     the default run;
  "sft"  supervised fine-tuning on synthetic tutoring conversations, the loss on the assistant's replies
         only; start it from the default run's weights:
         python -m phi3_jax.train --config configs/tiny.py:sft --workdir /tmp/tiny_sft --init_from /tmp/tiny
  "dpo"  direct preference optimisation on synthetic preference pairs (the same tutoring conversations,
         chosen with the right final answer, rejected with a wrong one); start it from the SFT run:
         python -m phi3_jax.train --config configs/tiny.py:dpo --workdir /tmp/tiny_dpo --init_from /tmp/tiny_sft
  "test" a few steps of a smaller model, no eval or sample: for smoke tests ("sft,test", "dpo,test").
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
    args = set(arg.split(",")) - {""}
    if args - {"sft", "dpo", "test"}:
        raise ValueError(f"configs/tiny.py: unknown ARG {arg!r} (comma-separated: 'sft', 'dpo', 'test')")
    if "sft" in args:
        d = c.data
        d.sources = [dict(d.sources[0], name="chat", kind="textbook_chat")]
        t = c.train
        t.steps, t.lr, t.warmup_steps, t.eval_every, t.checkpoint_every = 150, 1e-3, 10, 50, 50
        t.eval_on_start = True  # the held-out replies' loss before fine-tuning
        c.sample.prompt, c.sample.chat, c.sample.max_new_tokens = "What is 12 + 7?", True, 120
    if "dpo" in args:
        d = c.data
        d.sources = [dict(d.sources[0], name="chat_pairs", kind="textbook_chat")]
        t = c.train
        t.objective, t.dpo_beta = "dpo", 0.1
        # A pair is packed whole: in 512-token rows 7 in 10 of these pairs lose the start of their shared
        # prompt (data.pair_overflow="truncate_prompt"); both answers stay, and the last question with its
        # <|user|> marker in 96% of them.
        t.steps, t.batch_size, t.seq_len, t.lr, t.warmup_steps = 100, 8, 512, 1e-4, 10
        t.eval_every, t.eval_steps, t.checkpoint_every, t.eval_on_start = 25, 4, 50, True
        c.sample.prompt, c.sample.chat, c.sample.max_new_tokens = "What is 12 + 7?", True, 120
    if "test" in args:
        c.model.hidden_size = 64
        c.model.num_layers = 2
        c.model.num_heads = 4
        c.model.num_kv_heads = 2
        c.model.head_dim = 16
        c.model.intermediate_size = 128
        t = c.train
        t.steps = 6
        if "dpo" not in args:  # pairs keep their 512-token rows: shorter ones would cut most of each prompt
            t.batch_size, t.seq_len = 8, 64
        t.warmup_steps, t.log_every, t.eval_every, t.checkpoint_every = 2, 1, 0, 0
        t.tensorboard = t.progress = False
        c.sample.max_new_tokens = 0
    return c
