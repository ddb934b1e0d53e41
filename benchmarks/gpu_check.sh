#!/usr/bin/env bash
# The GPU check: one command for a lent GPU machine (H100/H200, no network, torch and triton
# preinstalled). Builds the extension for sm_90 with every core, runs the whole test suite on the GPU,
# compute-sanitizer's memcheck and racecheck on a small run of every CUDA kernel, then the main job's
# self-check, then the quick per-op (with each kernel's time) and per-batch benchmarks (about 2 minutes
# together), whose JSON, markdown and PNG land in $OUT/results/ named as in benchmarks/results/
# (<date>-<device>-<commit>): copy the JSON there, run benchmarks/update_readme.py, commit. Everything
# lands under $OUT (default: out/gpu_check); a short summary is printed last. Budget: under 8 minutes
# in all: each step runs under its own cap and never past the overall deadline; a step with no time
# left is skipped.
#
#   RESNEXT_KERNELS_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_check.sh
# (the device machine's copy of the tree has no git history to name the commit from)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu_check}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
unset TRITON_INTERPRET RESNEXT_KERNELS_CUDA_EMULATE
START=$SECONDS
DEADLINE=${GPU_CHECK_SECONDS:-450}
declare -A STATUS

step() {  # step NAME SECONDS COMMAND...: run with a timeout, log to $OUT/NAME.log, remember the exit code
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - (SECONDS - START)))
  if ((left < 15)); then
    STATUS[$name]="skipped: out of time"
    echo "[$((SECONDS - START)) s] $name: ${STATUS[$name]}"
    return
  fi
  ((limit > left)) && limit=$left
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" >"$OUT/$name.log" 2>&1
  STATUS[$name]="exit $? after $((SECONDS - t0)) s"
  echo "[$((SECONDS - START)) s] $name: ${STATUS[$name]}"
}

{
  nvidia-smi
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__, 'device', torch.cuda.get_device_name())"
  echo "commit: ${RESNEXT_KERNELS_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  git status --short 2>/dev/null | head -20
} >"$OUT/environment.txt" 2>&1

step build 180 pip install --no-build-isolation --no-deps -v -e .
# One Triton config per kernel in the tests: autotuning every test shape would not fit the budget.
step tests 200 env RESNEXT_KERNELS_TRITON_AUTOTUNE=0 python -m pytest tests -q -rfEs --junitxml="$OUT/tests.xml"
step memcheck 60 compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitizer_case.py
step racecheck 75 compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/sanitizer_case.py
step selfcheck 30 python -m resnext_kernels.bench --check-only --dtype bfloat16  # the main job also benchmarks now
# The quick benchmarks. --budget-s stops starting new cases (the rest are recorded as skipped) well
# before the step's timeout, and a SIGTERM from the timeout still writes what has finished. The per-op
# run repeats the (now cached) self-check so that its JSON records it; both runs merge into one JSON.
step bench_ops 65 python -m resnext_kernels.bench --ops --quick --budget-s 40 --out "$OUT/results"
step bench_batch 55 python -m resnext_kernels.bench --quick --no-check --budget-s 35 --out "$OUT/results"

echo
echo "== GPU check summary ($((SECONDS - START)) s, output in $OUT) =="
grep -m1 "^torch" "$OUT/environment.txt"
for name in build tests memcheck racecheck selfcheck; do echo "$name: ${STATUS[$name]:-not run}"; done
echo "-- tests --"; tail -n 25 "$OUT/tests.log"
echo "-- sanitizers --"; tail -n 2 "$OUT/memcheck.log" "$OUT/racecheck.log"
echo "-- selfcheck --"; tail -n 12 "$OUT/selfcheck.log"
for name in bench_ops bench_batch; do echo "$name: ${STATUS[$name]:-not run}"; done
echo "-- bench_batch --"; grep -A 14 "^### Per batch" "$OUT/bench_batch.log" | tail -n 12
echo "-- bench_ops, per kernel --"; grep -A 24 "^### Per kernel" "$OUT/bench_ops.log" | tail -n 20
echo "-- results --"; ls "$OUT/results" 2>/dev/null
