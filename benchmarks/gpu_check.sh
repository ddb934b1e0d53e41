#!/usr/bin/env bash
# The GPU check: one command for a lent GPU machine (H100/H200, no network, torch and triton
# preinstalled). Builds the extension for sm_90 with every core, runs the whole test suite on the GPU,
# compute-sanitizer's memcheck and racecheck on a small run of every CUDA kernel, then the main job's
# self-check. Everything lands under $OUT (default: out/gpu_check); a short
# summary is printed last. Budget: under 8 minutes in all, each step under its own timeout.
#
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu_check}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
unset TRITON_INTERPRET RESNEXT_KERNELS_CUDA_EMULATE
START=$SECONDS
declare -A STATUS

step() {  # step NAME SECONDS COMMAND...: run with a timeout, log to $OUT/NAME.log, remember the exit code
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  STATUS[$name]="exit $? after $((SECONDS - t0)) s"
  echo "[$((SECONDS - START)) s] $name: ${STATUS[$name]}"
}

{
  nvidia-smi
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__, 'device', torch.cuda.get_device_name())"
  git rev-parse HEAD 2>/dev/null || echo "commit: unknown (no git)"
  git status --short 2>/dev/null | head -20
} >"$OUT/environment.txt" 2>&1

step build 240 pip install --no-build-isolation --no-deps -v -e .
step tests 240 python -m pytest tests -q -rfEs --junitxml="$OUT/tests.xml"
step memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitizer_case.py
step racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/sanitizer_case.py
step selfcheck 60 python -m resnext_kernels.bench --dtype bfloat16

echo
echo "== GPU check summary ($((SECONDS - START)) s, output in $OUT) =="
grep -m1 "^torch" "$OUT/environment.txt"
for name in build tests memcheck racecheck selfcheck; do echo "$name: ${STATUS[$name]}"; done
echo "-- tests --"; tail -n 25 "$OUT/tests.log"
echo "-- sanitizers --"; tail -n 2 "$OUT/memcheck.log" "$OUT/racecheck.log"
echo "-- selfcheck --"; tail -n 12 "$OUT/selfcheck.log"
