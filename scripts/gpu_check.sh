#!/usr/bin/env bash
# Every GPU check in one call of at most 8 minutes (the step limits add up to 470 s; docs/gpu.md lists each
# step's expected seconds): the gpu-marked parity tests (fp32 with its SGD step under the floor rule) and
# the levers' float64 tests on the GPU; every float64 parity check at every depth on the GPU; ResNet-101/152
# train mode in fp32 and TF32; `resnet-train --preset imagenet-resnet50 --dataset synthetic` for 200 steps
# with its export verified; the trainer's step against the torch loop, each speed lever alone and together;
# the trainer's step under each XLA GPU flag. The steps are in scripts/gpu_steps.py. Each runs in its own
# process with its own time limit, and a failed step never stops the next.
#
# Written to $OUT (./gpu-report/ when OUT is unset), three files: gpu-check.md (the report), gpu-check-DEVICE.json
# (every figure of every step, named for the card: the copy for docs/gpu/) and gpu-logs.tar.gz (each step's
# log and JSON). A short table is printed last. Nothing is installed and no GPU setting is changed.
#
#   scripts/gpu_check.sh            # on a machine with a CUDA GPU (torch, jax[cuda], flax, optax)
#   scripts/gpu_check.sh --dry-run  # anywhere: every step in a tiny CPU form, in one process (GPU tests skip)
set -u
MODE=gpu
for arg in "$@"; do
  case "$arg" in
    --dry-run) MODE=dry ;;
    *) echo "gpu_check.sh: unknown argument $arg; expected --dry-run or nothing" >&2; exit 2 ;;
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

if [ "$MODE" = gpu ] && ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "no CUDA GPU visible to torch: running the dry run (tiny CPU versions of every step)"
  MODE=dry
fi

run_step() {  # NAME LIMIT_S [ENV=VALUE...]: one step of gpu_steps.py with a time limit, logged, its rc recorded
  local name=$1 limit=$2
  shift 2
  local log="$LOG_DIR/$name.log" start=$SECONDS rc
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=5 "$limit" env "$@" $PY scripts/gpu_steps.py --out "$REPORT_DIR" "$name" > "$log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$* scripts/gpu_steps.py $name" >> "$STEPS"
  tail -n 2 "$log"
}

if [ "$MODE" = gpu ]; then
  # A compilation cache shared by the steps (the parity checks and the tests compile the same programs).
  CACHE_DIR="$(mktemp -d)"
  trap 'rm -rf "$CACHE_DIR"' EXIT
  # torch and jax share the GPU in one process: jax allocates as it goes instead of taking 75% up front.
  SHARED=(XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_COMPILATION_CACHE_DIR="$CACHE_DIR")
  # Parity programs run a few times each: XLA's autotuning would cost more than it saves.
  QUICK=("${SHARED[@]}" XLA_FLAGS=--xla_gpu_autotune_level=0)
  run_step environment 10 "${SHARED[@]}"
  run_step gpu-tests 60 "${SHARED[@]}"
  run_step parity-fp64 50 "${QUICK[@]}"
  run_step parity-deep 55 "${QUICK[@]}"
  run_step train 70 "${SHARED[@]}"
  run_step speed 145 "${SHARED[@]}"
  run_step flags 80 "${SHARED[@]}"
else
  # One process for every step: one import of torch and jax (the dry run's cost is imports and compiling).
  echo "== every step, tiny, on the CPU in one process"
  timeout --kill-after=5 600 env JAX_PLATFORMS=cpu $PY scripts/gpu_steps.py --out "$REPORT_DIR" --dry-run all
  rc=$?
  [ "$rc" -ge 124 ] && printf 'dry-run\t%s\t-\tscripts/gpu_steps.py --dry-run all\n' "$rc" >> "$STEPS"
fi

if ! $PY scripts/gpu_summary.py --steps "$STEPS" --report-dir "$REPORT_DIR" --mode "$MODE"; then
  echo "summary failed; raw step records (name, rc, seconds, command):"
  cat "$STEPS"
fi
# The logs and each step's JSON travel as one archive beside the report and the combined JSON.
tar -czf "$REPORT_DIR/gpu-logs.tar.gz" -C "$REPORT_DIR" gpu-logs && rm -rf "$LOG_DIR"
