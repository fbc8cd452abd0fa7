#!/usr/bin/env bash
# Every GPU check in one call: the gpu-marked tests, `resnet-parity check` at every depth in every
# GPU precision, the throughput benchmarks (conversion speed is a CPU figure: the dry run times it with
# benchmarks/convert_speed.py) and short ResNet-50 training runs of resnet-train (synthetic batches,
# then the Grain pipeline on a generated JPEG folder). Each step has its own time limit and a failed
# step never stops the next, so one bug does not lose the other figures; the limits add up to 600 s
# on a GPU. The full report goes to $OUT/parity-gpu.md (gpu-levers.md with --levers; ./gpu-report/
# when OUT is unset), the JSON figures and a gpu-logs.tar.gz of every log beside it; a short table is
# printed last. Nothing is installed and no GPU setting is changed.
#
#   scripts/gpu_check.sh            # on a machine with a CUDA GPU (torch, jax[cuda], flax, optax)
#   scripts/gpu_check.sh --levers   # instead: resnet_flax training under each speed lever (210 s)
#   scripts/gpu_check.sh --dry-run  # anywhere: the same steps in a tiny CPU form (GPU tests skip)
set -u
MODE=gpu
LEVERS=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) MODE=dry ;;
    --levers) LEVERS=1 ;;
    *) echo "gpu_check.sh: unknown argument $arg; expected --dry-run and/or --levers" >&2; exit 2 ;;
  esac
done
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

if [ "$MODE" = gpu ] && ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
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

TP=(benchmarks/throughput.py --arch resnet50 --dtype bf16 --batch 256 --size 224 --device gpu --repeats 2)
# One torch thread in the dry run: its figures mean nothing, and on a CPU shared with other jobs OpenMP
# barriers between threads stall for whole scheduler slices.
TINY=(benchmarks/throughput.py --arch resnet18 --dtype fp32 --batch 2 --size 32 --device cpu --steps 1 --warmup 1
  --repeats 1 --latency-batches "" --torch-threads 1)
if [ "$LEVERS" = 1 ]; then
  # Training speed levers, each in its own process (XLA flags are read once per process), each
  # measuring the fused-BatchNorm model and the plain mirror; compare figures within this call only.
  if [ "$MODE" = gpu ]; then
    run_step environment 20 $PY scripts/gpu_env.py
    LV=("${TP[@]}" --impl resnet_flax,resnet_flax_plain --mode train --interleave)
    LIMIT=70
  else
    run_step environment 120 $PY scripts/gpu_env.py
    LV=("${TINY[@]}" --impl resnet_flax,resnet_flax_plain --mode train --interleave)
    LIMIT=300
  fi
  run_step throughput-levers-base $LIMIT $PY "${LV[@]}" --json "$REPORT_DIR/throughput-levers-base.json"
  # The levers proper: the dry run has walked this path with the base step (tests/test_throughput.py
  # covers --flax-steps-per-call), and the command-buffer flag means nothing on a CPU.
  if [ "$MODE" = gpu ]; then
    run_step throughput-levers-scan4 $LIMIT $PY "${LV[@]}" --flax-steps-per-call 4 \
      --json "$REPORT_DIR/throughput-levers-scan4.json"
    run_step throughput-levers-no-command-buffers $LIMIT $PY "${LV[@]}" --xla-gpu-command-buffer "" \
      --json "$REPORT_DIR/throughput-levers-no-command-buffers.json"
  fi
elif [ "$MODE" = gpu ]; then
  run_step environment 20 $PY scripts/gpu_env.py
  run_step gpu-tests 100 "${SHARED_GPU[@]}" $PY -m pytest tests/test_parity_gpu.py -m gpu -q -p no:cacheprovider -W default --durations=10
  run_step parity-check 80 "${SHARED_GPU[@]}" $PY -m parity.cli check --device gpu --precision all --arch all \
    --size 224 224 --batch 8 --checks "eval logits,train logits,running stats" \
    --json "$REPORT_DIR/parity-gpu.json"
  # The headline ratio first (Flax against torchvision under torch.compile), then the eager rows,
  # then resnet_torch under torch.compile, whose compilation is the slowest part of the run.
  # resnet_flax_plain beside them: what the fused BatchNorm (train) and folding (inference) give.
  # One after another (not --interleave), so a step cut short by its limit keeps every figure it
  # finished; on a GPU the order effect is small (docs/performance.md, "GPU figures").
  run_step throughput-headline 170 $PY "${TP[@]}" --impl resnet_flax,torchvision+compile,resnet_flax_plain \
    --json "$REPORT_DIR/throughput-headline.json"
  run_step throughput-eager 50 $PY "${TP[@]}" --impl torchvision,resnet_torch \
    --json "$REPORT_DIR/throughput-eager.json"
  run_step throughput-compile 80 $PY "${TP[@]}" --impl resnet_torch+compile \
    --json "$REPORT_DIR/throughput-compile.json"
  # resnet-train itself, ResNet-50 bf16 at 224, batch 256: images/s and whether the loss falls.
  run_step train-resnet50 100 $PY scripts/gpu_train.py --out "$REPORT_DIR" --limit 90
else
  run_step environment 120 $PY scripts/gpu_env.py
  run_step gpu-tests 200 $PY -m pytest tests/test_parity_gpu.py -m gpu -q -p no:cacheprovider
  run_step parity-check 120 $PY -m parity.cli check --device cpu --precision fp32 --arch resnet18 --size 33 47 \
    --batch 2 --checks "eval logits" --json "$REPORT_DIR/parity-gpu.json"
  run_step throughput-headline 300 $PY "${TINY[@]}" --impl resnet_flax,resnet_torch,resnet_flax_plain --interleave \
    --json "$REPORT_DIR/throughput-headline.json"
  # One layout, one fresh process: the others differ in names only (tests/test_hub.py converts each).
  run_step convert-speed 90 $PY benchmarks/convert_speed.py resnet18 --layouts torchvision --repeat 1
  run_step train-resnet50 300 $PY scripts/gpu_train.py --out "$REPORT_DIR" --dry-run --limit 280
fi

REPORT=parity-gpu.md
[ "$LEVERS" = 1 ] && REPORT=gpu-levers.md
if ! $PY scripts/gpu_summary.py --steps "$STEPS" --report-dir "$REPORT_DIR" --mode "$MODE" --report "$REPORT"; then
  echo "summary failed; raw step records (name, rc, seconds, command):"
  cat "$STEPS"
fi
# The logs travel as one archive beside the report, so the report folder stays a handful of files.
tar -czf "$REPORT_DIR/gpu-logs.tar.gz" -C "$REPORT_DIR" gpu-logs && rm -rf "$LOG_DIR"
