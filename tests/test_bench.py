"""The benchmarks stay runnable: each one's CPU mode end to end (timings are not checked)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_train_step_bench_jax_side(tmp_path):
    r = _run("bench/train_step.py", "--only", "jax", "--steps", "1", "--warmup", "0", "--layers", "1", "--packed",
             "--unroll", "--breakdown", "--profile", str(tmp_path / "trace"), "--form", "logsumexp=one_read")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ms per call" in r.stdout and "| op |" in r.stdout  # the profile's op table
    result = json.loads(r.stdout.strip().splitlines()[-1].removeprefix("RESULT "))
    assert result["packed"] and not result["scan_layers"] and result["tokens_per_s"] > 0
    assert result["median_s"] > 0 and result["sync_median_s"] > 0
    assert 0 < result["loss_forward_s"] and 0 < result["loss_and_grads_s"]
    assert result["forms"] == {"logsumexp": "one_read"}


def test_bench_forms_set_the_model_constants_and_refuse_unknown_ones(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from common import apply_forms

    from phi3_jax.model import layers
    from phi3_jax.ops import cross_entropy

    monkeypatch.setattr(layers, "SWIGLU_BACKWARD", layers.SWIGLU_BACKWARD)
    monkeypatch.setattr(cross_entropy, "LOGSUMEXP", cross_entropy.LOGSUMEXP)
    assert apply_forms(["swiglu_backward=kernel", "logsumexp=two_reductions"]) == {
        "swiglu_backward": "kernel", "logsumexp": "two_reductions"}
    assert layers.SWIGLU_BACKWARD == "kernel" and cross_entropy.LOGSUMEXP == "two_reductions"
    with pytest.raises(SystemExit, match="NAME must be one of"):
        apply_forms(["softmax=kernel"])
    with pytest.raises(SystemExit, match="VALUE must be one of"):
        apply_forms(["logsumexp=fast"])


def test_time_in_flight_reads_each_step_after_dispatching_the_next(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import time

    from common import time_in_flight

    log = []

    def dispatch():
        log.append(("dispatch", len([e for e in log if e[0] == "dispatch"])))
        return log[-1][1]

    def read(k):
        time.sleep(0.02)
        log.append(("read", k))

    median = time_in_flight(dispatch, read, iters=4, warmup=1)
    assert 0.02 <= median < 0.5
    reads = [k for kind, k in log if kind == "read"]
    assert reads == list(range(len(reads)))  # every step read once, in order
    for k in reads[1:-1]:  # past the warmup, step k + 1 was dispatched before step k was read
        assert log.index(("dispatch", k + 1)) < log.index(("read", k))


@pytest.mark.slow
def test_generate_bench_both_frameworks(tmp_path):
    results = tmp_path / "RESULTS.md"
    r = _run("bench/generate.py", "--batch", "2", "--prompt", "8", "--new", "4", "--iters", "1", "--warmup", "0",
             "--append", str(results))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ratio phi3_jax / transformers" in r.stdout
    assert "| phi3_jax.generate" in results.read_text() and "generated tokens/s" in results.read_text()


def test_elementwise_bench_checks_each_form_and_appends(tmp_path):
    results = tmp_path / "RESULTS.md"
    r = _run("bench/elementwise.py", "--iters", "1", "--append", str(results))
    assert r.returncode == 0, r.stderr[-2000:]
    ops = ("| logsumexp", "| SwiGLU", "| loss rows", "| RMSNorm", "| residual add + RMSNorm")
    rows = [line for line in results.read_text().splitlines() if line.startswith(ops)]
    assert len(rows) == 30 and "- command: `python bench/elementwise.py --iters 1" in results.read_text()


def test_elementwise_bench_refuses_a_form_that_differs(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import elementwise

    forms = elementwise.logsumexp_forms()
    monkeypatch.setattr(elementwise, "logsumexp_forms", lambda: {**forms, "off by one": lambda l: forms[
        "two reductions (phi3_jax on a CPU)"](l) + 1})
    with pytest.raises(SystemExit, match="off by one differs"):
        elementwise.run(dict(batch=1, seq=8, vocab=64, ffn=16, hidden=32), iters=1)


@pytest.mark.slow
def test_attention_bench_smoke():
    r = _run("bench/attention.py", "--seqs", "4096")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "decode seq 4096" in r.stdout and "smoke (reference" in r.stdout


def test_hlo_traffic_tallies_kernels_of_a_compiled_module():
    """bench/hlo_traffic.py's HLO reading, on a module compiled here (its GPU compile needs the CUDA plugin)."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(ROOT / "bench"))
    import hlo_traffic

    assert hlo_traffic.shape_bytes("(f32[2,3]{1,0}, bf16[4]{0}, pred[])") == 2 * 3 * 4 + 4 * 2 + 1
    x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
    text = jax.jit(lambda x: jnp.sum(jnp.exp(x) * 2.0, axis=1)).lower(x).compile().as_text()
    ks = hlo_traffic.kernels(text)
    assert ks and all(k["written"] > 0 for k in ks)
    assert max(k["read"] for k in ks) >= 64 * 128 * 4  # some kernel reads the whole input
    assert "kernels; operand + output bytes" in hlo_traffic.report(ks, top=3)


def test_hlo_traffic_counts_only_the_slice_a_fusion_reads():
    """A GEMM fusion that slices one layer out of stacked weights reads that layer, not the stack."""
    sys.path.insert(0, str(ROOT / "bench"))
    import hlo_traffic

    text = """HloModule m

%fused_dot (p0: bf16[16,32], p1: bf16[4,32,8]) -> bf16[16,8] {
  %p1 = bf16[4,32,8]{2,1,0} parameter(1)
  %slice.1 = bf16[1,32,8]{2,1,0} slice(%p1), slice={[2:3], [0:32], [0:8]}
  %bitcast.1 = bf16[32,8]{1,0} bitcast(%slice.1)
  %p0 = bf16[16,32]{1,0} parameter(0)
  ROOT %dot.1 = bf16[16,8]{1,0} dot(%p0, %bitcast.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_cast (r0: f32[4,32,8]) -> bf16[32,8] {
  %r0 = f32[4,32,8]{2,1,0} parameter(0)
  %convert.1 = bf16[4,32,8]{2,1,0} convert(%r0)
  %slice.2 = bf16[1,32,8]{2,1,0} slice(%convert.1), slice={[1:2], [0:32], [0:8]}
  ROOT %bitcast.2 = bf16[32,8]{1,0} bitcast(%slice.2)
}

%fused_add (q0: bf16[4,32,8]) -> bf16[4,32,8] {
  %q0 = bf16[4,32,8]{2,1,0} parameter(0)
  ROOT %add.1 = bf16[4,32,8]{2,1,0} add(%q0, %q0)
}

ENTRY %main (x: bf16[16,32], w: bf16[4,32,8], w32: f32[4,32,8]) -> (bf16[16,8], bf16[4,32,8], bf16[32,8]) {
  %x = bf16[16,32]{1,0} parameter(0)
  %w = bf16[4,32,8]{2,1,0} parameter(1)
  %gemm = bf16[16,8]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_dot
  %twice = bf16[4,32,8]{2,1,0} fusion(%w), kind=kLoop, calls=%fused_add
  %w32 = f32[4,32,8]{2,1,0} parameter(2)
  %cast = bf16[32,8]{1,0} fusion(%w32), kind=kLoop, calls=%fused_cast
  ROOT %t = (bf16[16,8]{1,0}, bf16[4,32,8]{2,1,0}, bf16[32,8]{1,0}) tuple(%gemm, %twice, %cast)
}
"""
    ks = {k["name"]: k for k in hlo_traffic.kernels(text)}
    assert ks["gemm"]["read"] == (16 * 32 + 32 * 8) * 2  # x and one layer of w
    assert ks["twice"]["read"] == 4 * 32 * 8 * 2  # the whole stack
    assert ks["cast"]["read"] == 32 * 8 * 4  # one float32 layer, though it is sliced after the convert


def test_hlo_traffic_counts_the_true_branch_of_a_conditional():
    """A `lax.cond` in the step (packed attention or its fallback) stands for its true branch's kernels."""
    sys.path.insert(0, str(ROOT / "bench"))
    import hlo_traffic

    text = """HloModule m

%fused_exp (p0: f32[64]) -> f32[64] {
  %p0 = f32[64]{0} parameter(0)
  ROOT %exp.1 = f32[64]{0} exponential(%p0)
}

%fused_neg (n0: f32[64]) -> f32[64] {
  %n0 = f32[64]{0} parameter(0)
  ROOT %neg.1 = f32[64]{0} negate(%n0)
}

%on_true (t: f32[64]) -> f32[64] {
  %t = f32[64]{0} parameter(0)
  ROOT %e = f32[64]{0} fusion(%t), kind=kLoop, calls=%fused_exp
}

%on_false (f: f32[64]) -> f32[64] {
  %f = f32[64]{0} parameter(0)
  ROOT %n = f32[64]{0} fusion(%f), kind=kLoop, calls=%fused_neg
}

ENTRY %main (pred: pred[], x: f32[64]) -> f32[64] {
  %pred = pred[] parameter(0)
  %x = f32[64]{0} parameter(1)
  ROOT %c = f32[64]{0} conditional(%pred, %x, %x), true_computation=%on_true, false_computation=%on_false
}
"""
    ks = hlo_traffic.kernels(text)
    assert [k["name"] for k in ks] == ["e"]
    assert ks[0]["read"] == ks[0]["written"] == 64 * 4


def test_hlo_traffic_counts_in_place_updates_and_scan_iterations():
    """A scatter into an existing buffer moves its updates only; a scan's body counts once per iteration."""
    sys.path.insert(0, str(ROOT / "bench"))
    import hlo_traffic

    text = """HloModule m

%add (a: bf16[], b: bf16[]) -> bf16[] {
  %a = bf16[] parameter(0)
  %b = bf16[] parameter(1)
  ROOT %s = bf16[] add(%a, %b)
}

%fused_write (c0: bf16[8,1024,64], c1: s32[4,1], c2: bf16[4,64]) -> bf16[8,1024,64] {
  %c0 = bf16[8,1024,64]{2,1,0} parameter(0)
  %c1 = s32[4,1]{1,0} parameter(1)
  %c2 = bf16[4,64]{1,0} parameter(2)
  ROOT %sc = bf16[8,1024,64]{2,1,0} scatter(%c0, %c1, %c2), update_window_dims={1}, inserted_window_dims={0,1}, scatter_dims_to_operand_dims={1}, index_vector_dim=1, to_apply=%add
}

%fused_fresh (z1: s32[4,1], z2: bf16[4,64]) -> bf16[8,1024,64] {
  %zero = bf16[] constant(0)
  %z0 = bf16[8,1024,64]{2,1,0} broadcast(%zero), dimensions={}
  %z1 = s32[4,1]{1,0} parameter(0)
  %z2 = bf16[4,64]{1,0} parameter(1)
  ROOT %sz = bf16[8,1024,64]{2,1,0} scatter(%z0, %z1, %z2), update_window_dims={1}, inserted_window_dims={0,1}, scatter_dims_to_operand_dims={1}, index_vector_dim=1, to_apply=%add
}

%fused_exp (e0: f32[256]) -> f32[256] {
  %e0 = f32[256]{0} parameter(0)
  ROOT %ex = f32[256]{0} exponential(%e0)
}

%body (bp: (s32[], f32[256])) -> (s32[], f32[256]) {
  %bp = (s32[], f32[256]{0}) parameter(0)
  %i = s32[] get-tuple-element(%bp), index=0
  %x = f32[256]{0} get-tuple-element(%bp), index=1
  %e = f32[256]{0} fusion(%x), kind=kLoop, calls=%fused_exp
  ROOT %bt = (s32[], f32[256]{0}) tuple(%i, %e)
}

%cond (cp: (s32[], f32[256])) -> pred[] {
  %cp = (s32[], f32[256]{0}) parameter(0)
  ROOT %t = pred[] constant(true)
}

ENTRY %main (cache: bf16[8,1024,64], idx: s32[4,1], new: bf16[4,64], init: (s32[], f32[256])) -> (bf16[8,1024,64], bf16[8,1024,64], (s32[], f32[256])) {
  %cache = bf16[8,1024,64]{2,1,0} parameter(0)
  %idx = s32[4,1]{1,0} parameter(1)
  %new = bf16[4,64]{1,0} parameter(2)
  %w = bf16[8,1024,64]{2,1,0} fusion(%cache, %idx, %new), kind=kInput, calls=%fused_write
  %f = bf16[8,1024,64]{2,1,0} fusion(%idx, %new), kind=kInput, calls=%fused_fresh
  %init = (s32[], f32[256]{0}) parameter(3)
  %loop = (s32[], f32[256]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %r = (bf16[8,1024,64]{2,1,0}, bf16[8,1024,64]{2,1,0}, (s32[], f32[256]{0})) tuple(%w, %f, %loop)
}
"""
    ks = hlo_traffic.kernels(text)
    by_name = {k["name"]: k for k in ks}
    assert by_name["w"]["read"] == 4 * 4 + 4 * 64 * 2 and by_name["w"]["written"] == 4 * 64 * 2  # in place
    assert by_name["f"]["written"] == 8 * 1024 * 64 * 2  # a fresh buffer is written whole
    assert [k["name"] for k in ks].count("e") == 5 and "loop" not in by_name
