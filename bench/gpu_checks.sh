#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one call, for a short lease on one NVIDIA GPU:
# the fused-op tests, bench/train_step.py (against transformers, then JAX-only variants: the kernel forms of
# bench/common.py FORMS, XLA's Triton GEMMs off and other XLA flags, the loss in chunks, the forward /
# backward split, a profile of the busiest ops, packed rows), the Mosaic GPU kernel
# tests, bench/attention.py (with its correctness checks), and bench/generate.py (sampling) and bench/forward.py
# at phi-3-mini width.
# Steps run in order of importance, each under its own time limit; a failing step is logged and the next
# one still runs. Results are appended to bench/RESULTS.md; the variants print to the log only.
#
#   bash bench/gpu_checks.sh [OUTDIR]      # log: OUTDIR/gpu_checks.log (default $OUT or /tmp/phi3_gpu)
#   STEPS="kernels attention" bash bench/gpu_checks.sh    # a subset (names: the `step` lines below;
#                                                         # train_scanned runs only when named)
# Each step's limit bounds it; name a subset when the lease is shorter than their sum. A device call is
# capped at 600 s, so split the list over calls, most important first. On an H100 (jax 0.11.2) the steps
# took: env 15 s, fused over 150 (about 15 s a cuDNN case), train 65, train_packed 35, train_notriton 41,
# train_profile 12, one train_flags or train_forms variant 20, train_breakdown 30, kernels over 112,
# attention 157 (train_forms, eight variants: about 160); e.g. in two calls, about 290 s and 450 s:
#   STEPS="env train_forms train_notriton train_profile elementwise" bash bench/gpu_checks.sh "$OUT"
#   FORMS="--form ..." STEPS="fused train_packed kernels" bash bench/gpu_checks.sh "$OUT"
# FORMS (bench/train_step.py --form flags) applies to train_notriton and train_profile; without it they
# take the forms train_forms found fastest in the same call.
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/phi3_gpu}}
mkdir -p "$out"
log="$out/gpu_checks.log"
py=${PYTHON:-python3}
# JAX takes GPU memory as it needs it, so the torch peers (child processes) fit beside it.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
forms=${FORMS:-}
steps=${STEPS:-"env fused train_forms train train_packed train_notriton train_profile train_flags elementwise train_breakdown train_chunks kernels attention generate forward"}

step() {
  local name=$1 limit=$2
  shift 2
  case " $steps " in *" $name "*) ;; *) return ;; esac
  echo "=== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  printf -v "rc_$name" %s "$rc"
  echo "=== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$log"
  tail -n 25 "$log" | grep -v "^===" || true
}

step env 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv; $py -c '
import jax, flax, optax, torch, transformers
print(\"jax\", jax.__version__, jax.devices(), \"flax\", flax.__version__, \"optax\", optax.__version__,
      \"torch\", torch.__version__, \"transformers\", transformers.__version__)'"
# The GPU-only backward passes (layers.FUSED_BACKWARD), the fused loss and cuDNN attention (packed documents
# included) against autodiff, on the device (H100: about 15 s a cuDNN case, most of it compiling).
step fused 300 $py -m pytest -q -p no:cacheprovider tests/test_fused_ops.py tests/test_attention_cudnn.py
# The step's kernel forms (bench/common.py FORMS: the Pallas Triton row kernels, XLA's other forms), JAX
# alone with XLA's Triton GEMMs off, one process each, the default forms first: the RESULT lines, and
# "median step, flags" lines in OUTDIR/forms.tsv. Without FORMS, the later steps take the fastest.
# A variant without a RESULT line shows the end of its output (whatever the error looked like); the step
# fails if any variant did.
step train_forms 300 bash -c ': >"$1/forms.tsv"; failed=0; for f in "" "--form logsumexp=kernel" "--form swiglu_backward=kernel" \
    "--form rms_norm_forward=kernel" "--form rms_norm_backward=kernel" "--form swiglu_backward=halves" \
    "--form logsumexp=two_reductions" \
    "--form logsumexp=kernel --form swiglu_backward=kernel --form rms_norm_forward=kernel --form rms_norm_backward=kernel"; do
  echo "forms: ${f:-default}"
  o=$(XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" "$0" bench/train_step.py --device gpu --only jax --unroll $f 2>&1)
  r=$(echo "$o" | grep RESULT)
  m=$(echo "$r" | sed -n "s/.*\"median_s\": \([0-9.]*\).*/\1/p")
  if [ -n "$m" ]; then
    echo "$r"; printf "%s\t%s\n" "$m" "$f" >>"$1/forms.tsv"
  else
    echo "$o" | tail -n 8; failed=$((failed + 1))
  fi
done; [ "$failed" = 0 ]' "$py" "$out"
if [ -z "$forms" ] && [ -s "$out/forms.tsv" ]; then
  forms=$(sort -n "$out/forms.tsv" | head -n 1 | cut -f 2)
  echo "=== fastest forms: ${forms:-the defaults}" | tee -a "$log"
elif [ -z "$forms" ] && [ -n "${rc_train_forms:-}" ]; then
  echo "=== fastest forms: none measured; the later steps run the defaults" | tee -a "$log"
fi
step train 300 $py bench/train_step.py --device gpu --unroll --append bench/RESULTS.md
# Packed rows: cuDNN's packed layout (four documents per row); compare with the train step above.
step train_packed 180 $py bench/train_step.py --device gpu --only jax --unroll --packed
# XLA's GEMMs through cuBLAS alone (Triton's off), with the peer again in the same run.
# shellcheck disable=SC2086  # FORMS is a list of flags
step train_notriton 300 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" \
  $py bench/train_step.py --device gpu --unroll $forms --append bench/RESULTS.md
# shellcheck disable=SC2086
step train_profile 180 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" \
  $py bench/train_step.py --device gpu --only jax --unroll $forms --profile /tmp/phi3_train_trace
# The trace comes back with OUTDIR when it is small enough to (16 MiB a file).
trace=$(ls -t /tmp/phi3_train_trace/plugins/profile/*/perfetto_trace.json.gz 2>/dev/null | head -n 1)
if [ -n "${rc_train_profile:-}" ] && [ -n "$trace" ] && [ "$(stat -c %s "$trace")" -le 16000000 ]; then
  cp "$trace" "$out/perfetto_trace.json.gz"
fi
# More of XLA's GPU GEMM and scheduling choices, one process each (XLA reads its flags once): the RESULT lines.
# (--xla_gpu_exhaustive_tiling_search=true is left out: on the H100 its compile ran past 80 s unfinished.)
step train_flags 300 bash -c 'failed=0; for f in "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_cublaslt=true" \
    "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_command_buffer="; do
  echo "XLA_FLAGS=$f"; o=$(XLA_FLAGS="$f" "$0" bench/train_step.py --device gpu --only jax --unroll 2>&1)
  echo "$o" | grep RESULT || { echo "$o" | tail -n 8; failed=$((failed + 1)); }
done; [ "$failed" = 0 ]' "$py"
# The step's memory-bound kernels in their alternative forms (the leads of the H100 account in RESULTS.md).
step elementwise 120 $py bench/elementwise.py --device gpu --append bench/RESULTS.md
step train_breakdown 180 $py bench/train_step.py --device gpu --only jax --unroll --breakdown
step train_chunks 180 $py bench/train_step.py --device gpu --only jax --unroll --loss-chunks 4
step train_scanned 180 $py bench/train_step.py --device gpu --only jax
# The Mosaic GPU kernels against the reference, and the model's path into them (loss and gradients).
step kernels 180 bash -c '"$0" -m pytest -q -p no:cacheprovider -m gpu tests/test_blocksparse_gpu.py &&
  "$0" -m pytest -q -p no:cacheprovider --runslow tests/test_model_kernels.py -k gpu_kernel_trains' "$py"
if [ "${rc_kernels:-0}" = 124 ]; then
  echo "=== attention: skipped, the kernel tests timed out (a kernel that never finishes would hang it too)" | tee -a "$log"
else
  # shellcheck disable=SC2086  # ATTENTION_ARGS is a list of flags
  step attention 240 $py bench/attention.py ${ATTENTION_ARGS:---seqs 4096,8192,16384,32768 --flex-seqs 8192} \
    --out bench/RESULTS.md
fi
step generate 180 $py bench/generate.py --device gpu --append bench/RESULTS.md
step forward 240 $py bench/forward.py --device gpu --batch 4 --seq 4096 --layers 4 --append bench/RESULTS.md
cp bench/RESULTS.md "$out/RESULTS.md"
