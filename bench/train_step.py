"""Training throughput and MFU: phi3_jax's train step against transformers' Phi3ForCausalLM + torch AdamW.

Both sides do the same work per step: forward, masked next-token cross-entropy over full logits,
backward, global-norm clipping at 1.0 and an AdamW update of float32 master weights, with bf16 matmuls
on a GPU (JAX: the bf16 copy of the weights that the optimizer's update writes into the train state;
torch: autocast) and float32 on a CPU.
JAX runs the output head and the loss as one op (phi3_jax.ops.cross_entropy, `--loss-chunks`); the
logits and their gradient have the same bf16 roundings as torch's autocast.
Each framework runs in its own child process so neither one's threads or memory disturb the other.
Step times are timed twice: each step waited for before the next is dispatched, and with the next step in
flight while the host reads a step's loss, as phi3_jax.train does; tokens/s and MFU use the second (the
training loop's throughput: the device never idles while the host dispatches).

    python bench/train_step.py --device gpu     # phi-3-mini width (3072 / ffn 8192 / 32 heads), 4 layers,
                                                # seq 4096, batch 4, bf16: tokens/s and MFU
    python bench/train_step.py                  # CPU: a tiny config against the same peer (ratios only)
    python bench/train_step.py --append bench/RESULTS.md
    python bench/train_step.py --device gpu --unroll    # layers unrolled instead of lax.scan (faster on an H100)
    python bench/train_step.py --device gpu --only jax --packed --breakdown   # one framework, packed rows,
                                                # and the loss forward / loss + gradients timed alone
    python bench/train_step.py --device gpu --only jax --unroll --form logsumexp=kernel --form swiglu_backward=halves
                                                # other forms of the step's memory-bound kernels

By default every row is one document, as on the torch side. `--packed` gives the JAX step segment ids and
reset positions (four documents a row), the batches the training pipeline makes; the torch peer has no
packed-attention path and always runs plain causal rows.

MFU = tokens/s x ModelConfig.flops_per_token(seq) / peak bf16 FLOP/s of the chip (phi3_jax.metrics table;
omitted where the peak is unknown, e.g. CPUs). The same FLOPs per token are used for both frameworks.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import FORMS, apply_forms, entry_head, peer_main, profile_calls, time_calls, time_in_flight  # noqa: E402

GPU_SHAPE = dict(vocab_size=32064, hidden_size=3072, num_heads=32, num_kv_heads=32, head_dim=96,
                 intermediate_size=8192, num_layers=4, seq=4096, batch=4)
CPU_SHAPE = dict(vocab_size=2048, hidden_size=256, num_heads=8, num_kv_heads=8, head_dim=32,
                 intermediate_size=688, num_layers=4, seq=256, batch=8)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--batch", type=int, help="override the shape's batch")
    p.add_argument("--seq", type=int, help="override the shape's sequence length")
    p.add_argument("--layers", type=int, help="override the shape's depth")
    p.add_argument("--packed", action="store_true", help="JAX: four documents per row (segment ids, positions)")
    p.add_argument("--attention", choices=("auto", "xla", "cudnn"), help="JAX attention implementation "
                   "(default: auto on a GPU, xla on a CPU)")
    p.add_argument("--unroll", action="store_true", help="JAX: unrolled layers instead of lax.scan")
    p.add_argument("--remat", choices=("none", "full", "dots"), default="none", help="JAX rematerialisation")
    p.add_argument("--loss-chunks", type=int, default=1,
                   help="JAX: train.loss_chunks (1: logits gradient kept from the forward; N: recomputed per chunk)")
    p.add_argument("--breakdown", action="store_true",
                   help="JAX: also time the loss forward alone and loss + gradients alone (where the step goes)")
    p.add_argument("--profile", metavar="DIR", help="JAX: also trace 3 steps into DIR and print the busiest ops")
    p.add_argument("--form", action="append", metavar="NAME=VALUE",
                   help=f"JAX: a kernel form of the step ({', '.join(FORMS)}; see bench/common.py), repeatable")
    p.add_argument("--steps", type=int, default=10,
                   help="timed train steps per framework and way of timing (medians reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--only", choices=("jax", "torch"), help="run one framework and print its JSON result")
    p.add_argument("--append", metavar="FILE", help="append a markdown entry with the figures to FILE")
    return p.parse_args(argv)


def shape(args) -> dict:
    s = dict(GPU_SHAPE if args.device == "gpu" else CPU_SHAPE)
    for k, arg in (("batch", args.batch), ("seq", args.seq), ("num_layers", args.layers)):
        if arg:
            s[k] = arg
    return s


def model_config(s: dict, dtype: str, device: str, attention: str | None = None, remat: str = "none",
                 scan_layers: bool = True):
    from phi3_jax.model import ModelConfig

    return ModelConfig(family="phi3", vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], num_layers=s["num_layers"],
                       num_heads=s["num_heads"], num_kv_heads=s["num_kv_heads"], head_dim=s["head_dim"],
                       intermediate_size=s["intermediate_size"], max_position_embeddings=max(4096, s["seq"]),
                       original_max_position_embeddings=max(4096, s["seq"]), param_dtype="float32", dtype=dtype,
                       attention_impl=attention or ("auto" if device == "gpu" else "xla"), remat=remat,
                       scan_layers=scan_layers)


def bench_jax(args) -> dict:
    os.environ.setdefault("JAX_PLATFORMS", "cuda" if args.device == "gpu" else "cpu")
    import jax
    import numpy as np

    from phi3_jax import optim, sharding as shd, train_state as ts
    from phi3_jax.checkpoint import abstract_params
    from phi3_jax.metrics import peak_flops

    forms = apply_forms(args.form)
    s = shape(args)
    dtype = "bfloat16" if args.device == "gpu" else "float32"
    cfg = model_config(s, dtype, args.device, args.attention, args.remat, not args.unroll)
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    tx, _ = optim.make_optimizer(abstract_params(cfg), lr=1e-4, steps=1000, warmup_steps=0, weight_decay=0.1,
                                 clip_norm=1.0)
    fns = ts.build(cfg, tx, mesh, compute_dtype=dtype, loss_chunks=args.loss_chunks)
    state = fns.init(0)
    rng = np.random.RandomState(0)
    B, T = s["batch"], s["seq"]
    ids = rng.randint(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    rows = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((B, T), np.float32)}
    if args.packed:
        doc = np.minimum(np.arange(T) * 4 // T, 3).astype(np.int32)
        rows["segment_ids"] = np.broadcast_to(doc + 1, (B, T)).copy()
        rows["positions"] = np.broadcast_to(np.arange(T) - np.searchsorted(doc, doc), (B, T)).astype(np.int32)
    batch = shd.make_global_batch(mesh, rows, B)
    holder = {"state": state}

    def dispatch():
        holder["state"], m = fns.train_step(holder["state"], batch)
        return m

    def step():
        jax.device_get(dispatch())

    first, sync_median = time_calls(step, args.steps, args.warmup)
    median = time_in_flight(dispatch, jax.device_get, args.steps, 0)
    parts = {}
    if args.breakdown:
        graphdef, params = ts.graphdef_of(cfg), holder["state"]["params"]
        loss = lambda p, b: ts.loss_sums(graphdef, p, b, dtype, loss_chunks=args.loss_chunks)[0]  # noqa: E731
        for name, fn in (("loss_forward_s", jax.jit(loss)), ("loss_and_grads_s", jax.jit(jax.value_and_grad(loss)))):
            parts[name] = time_calls(lambda: jax.block_until_ready(fn(params, batch)), args.steps, args.warmup)[1]
            print(f"{name}: {parts[name]:.4f} s (full step {median:.4f} s)", flush=True)
    if args.profile:
        print(profile_calls(step, 3, args.profile), flush=True)
    tps = B * T / median
    peak = peak_flops(jax.devices()[0])
    flops = cfg.flops_per_token(T)
    return dict(framework="phi3_jax", version=jax.__version__, backend=jax.default_backend(),
                device=str(jax.devices()[0].device_kind), first_s=first, median_s=median,
                sync_median_s=sync_median, tokens_per_s=tps,
                params=cfg.param_count(), flops_per_token=flops, mfu=tps * flops / peak if peak else None,
                dtype=dtype, attention=cfg.attention_impl, remat=cfg.remat, packed=bool(args.packed),
                scan_layers=cfg.scan_layers, loss_chunks=args.loss_chunks, forms=forms, **parts)


def bench_torch(args) -> dict:
    import torch
    import transformers
    from transformers import Phi3Config, Phi3ForCausalLM

    s = shape(args)
    torch.manual_seed(0)
    dev = "cuda" if args.device == "gpu" else "cpu"
    hf = Phi3Config(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                    num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"],
                    num_key_value_heads=s["num_kv_heads"], max_position_embeddings=max(4096, s["seq"]),
                    original_max_position_embeddings=max(4096, s["seq"]), sliding_window=None, pad_token_id=0,
                    tie_word_embeddings=False)
    model = Phi3ForCausalLM._from_config(hf, dtype=torch.float32, attn_implementation="sdpa").to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            **({"fused": True} if dev == "cuda" else {}))
    B, T = s["batch"], s["seq"]
    ids = torch.randint(0, s["vocab_size"], (B, T + 1), device=dev)
    inputs, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def dispatch():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            logits = model(inputs, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev != "cuda":
            return loss.detach()
        # The loss goes to pinned host memory behind an event: waiting on the event waits for this step
        # alone, where reading the tensor would also wait for every kernel queued after it on the stream.
        host = torch.empty((), dtype=loss.dtype, pin_memory=True)
        host.copy_(loss.detach(), non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done

    def read(pending):
        if dev == "cuda":
            host, done = pending
            done.synchronize()
            return float(host)
        return float(pending)

    first, sync_median = time_calls(lambda: read(dispatch()), args.steps, args.warmup)
    median = time_in_flight(dispatch, read, args.steps, 0)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    return dict(framework="transformers", version=f"{transformers.__version__} (torch {torch.__version__})",
                backend=dev, device=name, threads=torch.get_num_threads(), first_s=first, median_s=median,
                sync_median_s=sync_median, tokens_per_s=B * T / median,
                params=sum(p.numel() for p in model.parameters()))


def markdown(args, jx: dict, pt: dict, command: str, load: float) -> str:
    s = shape(args)
    ratio = jx["tokens_per_s"] / pt["tokens_per_s"]
    pt_mfu = pt["tokens_per_s"] * jx["mfu"] / jx["tokens_per_s"] if jx.get("mfu") else None  # same FLOPs, peak
    fmt = lambda m: "n/a (peak unknown)" if m is None else f"{100 * m:.1f}%"  # noqa: E731
    shapes = (f"batch {s['batch']}, seq {s['seq']}, {s['num_layers']} layers of hidden {s['hidden_size']} / "
              f"{s['num_heads']} heads / ffn {s['intermediate_size']}, vocab {s['vocab_size']} "
              f"({jx['params'] / 1e6:.1f}M parameters), {jx['dtype']} compute, float32 master weights, AdamW + "
              "clipping, full logits")
    return "\n".join([
        *entry_head("train step", args.device, jx, pt, shapes, command, load),
        "| framework | first step (s) | step, each waited for (s) | step, next in flight (s) | tokens/s | MFU |",
        "|---|---|---|---|---|---|",
        f"| phi3_jax (jit, donated state; attention {jx['attention']}, remat {jx['remat']}, "
        f"{'scanned' if jx['scan_layers'] else 'unrolled'} layers, fused head + loss"
        f"{' in ' + str(jx['loss_chunks']) + ' chunks' if jx['loss_chunks'] > 1 else ''}"
        f"{', packed rows' if jx['packed'] else ''}"
        f"{''.join(f', {k} {v}' for k, v in jx.get('forms', {}).items())}) | {jx['first_s']:.2f} | "
        f"{jx['sync_median_s']:.4f} | {jx['median_s']:.4f} | {jx['tokens_per_s']:.0f} | "
        f"{fmt(jx.get('mfu'))} |",
        f"| transformers Phi3ForCausalLM + torch AdamW | {pt['first_s']:.2f} | {pt['sync_median_s']:.4f} | "
        f"{pt['median_s']:.4f} | "
        f"{pt['tokens_per_s']:.0f} | {fmt(pt_mfu)} |",
        "",
        f"phi3_jax / transformers: **{ratio:.2f}x** training tokens/s.",
        "",
        "Steps are medians of the step times. Tokens/s and MFU come from steps with the next one in flight, the way "
        "phi3_jax.train runs (it reads a step's metrics after dispatching the next): the device never waits "
        "for the host. The column before waits for each step before dispatching the next.",
        "",
    ])


def _line(r: dict) -> str:
    mfu = f"  MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else ""
    return (f"{r['framework']:13s} {r['backend']:4s} first {r['first_s']:7.2f}s  step {r['median_s']:.4f}s "
            f"(waited for: {r['sync_median_s']:.4f}s)  "
            f"{r['tokens_per_s']:10.1f} tokens/s{mfu}")


def main(argv=None) -> int:
    return peer_main(__file__, argv, parse_args(argv), bench_jax, bench_torch, markdown, describe=_line)


if __name__ == "__main__":
    sys.exit(main())
