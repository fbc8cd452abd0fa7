#!/usr/bin/env bash
# Every GPU check in one call: the gpu-marked tests, `resnet-parity check` at every depth in every
# GPU precision, and the throughput benchmarks (conversion speed is a CPU figure, measured by
# benchmarks/convert_speed.py). Each step has its own time limit and a failed step never stops the
# next, so one bug does not lose the other figures; the limits add up to 515 s on a GPU. The full
# report goes to $OUT/parity-gpu.md (./gpu-report/ when OUT is unset), the JSON figures and a
# gpu-logs.tar.gz of every log beside it; a short table is printed last. Nothing is installed and
# no GPU setting is changed.
#
#   scripts/gpu_check.sh            # on a machine with a CUDA GPU (torch, jax[cuda], flax, optax)
#   scripts/gpu_check.sh --dry-run  # anywhere: the same steps in a tiny CPU form (GPU tests skip)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=python3
REPORT_DIR="${OUT:-./gpu-report}"
LOG_DIR="$REPORT_DIR/gpu-logs"
STEPS="$LOG_DIR/steps.tsv"
mkdir -p "$LOG_DIR"
: > "$STEPS"
# A compilation cache shared by the steps (the tests and the check compile the same ResNet-50), kept
# outside the report folder and removed at the end.
CACHE_DIR="$(mktemp -d)"
trap 'rm -rf "$CACHE_DIR"' EXIT
# torch and jax share the GPU in one process: jax allocates as it goes instead of taking 75% upfront.
SHARED_GPU=(env XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_COMPILATION_CACHE_DIR="$CACHE_DIR")

MODE=gpu
if [ "${1:-}" = "--dry-run" ]; then
  MODE=dry
elif ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "no CUDA GPU visible to torch: running the dry run (tiny CPU versions of every step)"
  MODE=dry
fi

run_step() {  # NAME LIMIT_S COMMAND...: run with a time limit, log to $LOG_DIR/NAME.log, record rc
  local name=$1 limit=$2
  shift 2
  local log="$LOG_DIR/$name.log" start=$SECONDS rc
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$*" >> "$STEPS"
  tail -n 3 "$log"
}

skip_step() {  # NAME REASON
  printf '%s\tskip\t0\t%s\n' "$1" "$2" >> "$STEPS"
}

TP=(benchmarks/throughput.py --arch resnet50 --dtype bf16 --batch 256 --size 224 --device gpu --repeats 2)
if [ "$MODE" = gpu ]; then
  run_step environment 20 $PY scripts/gpu_env.py
  run_step gpu-tests 110 "${SHARED_GPU[@]}" $PY -m pytest tests/test_parity_gpu.py -m gpu -q -p no:cacheprovider -W default --durations=10
  run_step parity-check 80 "${SHARED_GPU[@]}" $PY -m parity.cli check --device gpu --precision all --arch all \
    --size 224 224 --batch 8 --checks "eval logits,train logits,running stats" \
    --json "$REPORT_DIR/parity-gpu.json"
  # The headline ratio first (Flax against torchvision under torch.compile), then the eager rows,
  # then resnet_torch under torch.compile, whose compilation is the slowest part of the run.
  run_step throughput-headline 150 $PY "${TP[@]}" --impl resnet_flax,torchvision+compile \
    --json "$REPORT_DIR/throughput-headline.json"
  run_step throughput-eager 75 $PY "${TP[@]}" --impl torchvision,resnet_torch,resnet_flax_unfolded \
    --json "$REPORT_DIR/throughput-eager.json"
  run_step throughput-compile 80 $PY "${TP[@]}" --impl resnet_torch+compile \
    --json "$REPORT_DIR/throughput-compile.json"
else
  run_step environment 120 $PY scripts/gpu_env.py
  run_step gpu-tests 200 $PY -m pytest -m gpu -q -p no:cacheprovider
  run_step parity-check 120 $PY -m parity.cli check --device cpu --precision fp32 --arch resnet18 --size 33 47 \
    --batch 2 --checks "eval logits" --json "$REPORT_DIR/parity-gpu.json"
  run_step throughput-headline 300 $PY benchmarks/throughput.py --arch resnet18 --dtype fp32 --batch 2 --size 32 \
    --device cpu --steps 1 --warmup 1 --repeats 1 --impl resnet_flax,resnet_torch --mode infer --latency-batches "" \
    --json "$REPORT_DIR/throughput-headline.json"
  run_step convert-speed 90 $PY benchmarks/convert_speed.py resnet18 --repeat 1
fi

if ! $PY scripts/gpu_summary.py --steps "$STEPS" --report-dir "$REPORT_DIR" --mode "$MODE"; then
  echo "summary failed; raw step records (name, rc, seconds, command):"
  cat "$STEPS"
fi
# The logs travel as one archive beside the report, so the report folder stays a handful of files.
tar -czf "$REPORT_DIR/gpu-logs.tar.gz" -C "$REPORT_DIR" gpu-logs && rm -rf "$LOG_DIR"
