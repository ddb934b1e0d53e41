#!/usr/bin/env bash
# The GPU check: one command for a lent GPU machine (H100/H200, no network, torch and triton
# preinstalled). Builds the extension for sm_90 with every core; then, at the same time (nothing is
# timed yet), the whole test suite on the GPU, compute-sanitizer's memcheck, racecheck and synccheck
# on a small run of every CUDA kernel, the main job's self-check and warm-up runs of the benchmarks (timings
# thrown away); then, alone on the GPU, the quick per-op (with each kernel's time) and per-batch
# benchmarks, whose JSON, markdown and PNG land in $OUT/results/ named as in benchmarks/results/
# (<date>-<device>-<commit>): copy the JSON there, run benchmarks/update_readme.py, commit. Budget:
# under 8 minutes in all: each step runs under its own cap and never past the overall deadline; a step
# with no time left is skipped.
#
# The device tool brings back at most 8 files from $OUT (two folders deep), so $OUT (default:
# out/gpu_check) gets five: summary.txt (also printed, step statuses last), logs.tar.gz (every step's
# log, the test shards' logs and JUnit files, environment.txt) and results/. The logs are written to a
# scratch folder first (GPU_CHECK_LOGS, default a fresh one under /tmp).
#
#   RESNEXT_KERNELS_COMMIT=$(git rev-parse HEAD)$(git diff --quiet HEAD || echo -dirty) bash benchmarks/gpu_check.sh
# (the device machine's copy of the tree has no git history to name the commit from; "-dirty" marks
# uncommitted changes in it)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu_check}
LOGS=${GPU_CHECK_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")} || exit 1
: "${LOGS:?no folder for the logs}"
mkdir -p "$OUT" "$LOGS" || exit 1
rm -rf "$OUT/results" "$OUT/summary.txt" "$OUT/logs.tar.gz"  # an earlier run's, and its logs:
rm -f "$LOGS"/*.log "$LOGS"/*.status "$LOGS"/*.xml "$LOGS/environment.txt"
shopt -s nullglob
PY=$(command -v python3 || command -v python)  # the device image's python3 holds PyTorch
NVCC=$(command -v nvcc || true)
export CUDA_HOME=${CUDA_HOME:-$([ -n "$NVCC" ] && dirname "$(dirname "$(readlink -f "$NVCC")")" || echo /usr/local/cuda)}
export PATH="$(dirname "$PY"):$PATH"  # its environment's tools too (ninja: parallel compilation)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PIP_DISABLE_PIP_VERSION_CHECK=1  # no network there
unset TRITON_INTERPRET RESNEXT_KERNELS_CUDA_EMULATE
export RESNEXT_KERNELS_BUILD_CUDA=1  # no nvcc: fail the build, never install without the extension
SANITIZER=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
# Failed CUDA API calls that PyTorch makes and handles itself (probing) are not our errors; a failed
# launch of ours raises in check_launch, and the tools' own checks stay on.
SANITIZE=("$SANITIZER" --error-exitcode 1 --report-api-errors no)
START=$SECONDS
DEADLINE=${GPU_CHECK_SECONDS:-470}
TEST_SHARDS=${TEST_SHARDS:-8}
BENCH_SECONDS=150  # the two benchmark steps' caps (bench_ops 90 s, bench_batch 60 s)

# step NAME SECONDS COMMAND...: runs COMMAND under a timeout that never passes the deadline (timeout
# signals its whole process group, so background children stop too), logs to $LOGS/NAME.log and
# writes how it ended to $LOGS/NAME.status (steps may run in the background).
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - (SECONDS - START)))
  if ((left < 15)); then
    echo "skipped: out of time" >"$LOGS/$name.status"
  else
    ((limit > left)) && limit=$left
    local t0=$SECONDS
    timeout --kill-after=5 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    echo "exit $? after $((SECONDS - t0)) s" >"$LOGS/$name.status"
  fi
  echo "[$((SECONDS - START)) s] $name: $(cat "$LOGS/$name.status")"
}

{
  nvidia-smi
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__, 'device', torch.cuda.get_device_name())"
  "$CUDA_HOME/bin/nvcc" --version | tail -n 2
  "$SANITIZER" --version | head -n 2
  echo "commit: ${RESNEXT_KERNELS_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  git status --short 2>/dev/null | head -20
} >"$LOGS/environment.txt" 2>&1

step build 150 "$PY" -m pip install --no-build-isolation --no-deps -v -e .

# Correctness, all at once. The suite launches about 1 000 Triton specialisations (counted under the
# interpreter, keyed as a compiled launch is: constants, dtypes, integers equal to 1 or divisible by
# 16, pointer alignment), each compiled on first use: in one process that alone would outrun the step,
# so it runs as TEST_SHARDS interleaved parts in parallel (tests/conftest.py's --shard; with 8 parts,
# each needs up to ~230 of them, some compiled by another part first: Triton's disk cache is shared),
# one log (a line per test, so a part stopped by the timeout still shows what failed) and JUnit file
# each. The summary counts the kernels they compiled (a cache of their own). One Triton config per
# kernel: autotuning every test shape would not fit the budget either. The step has all the time the
# benchmarks after it leave (BENCH_SECONDS), at least 170 s: more when the build was quick.
TEST_TRITON_CACHE=${TMPDIR:-/tmp}/gpu_check_triton_cache_tests
compiled_before=$(ls "$TEST_TRITON_CACHE" 2>/dev/null | wc -l)
tests_limit=$((DEADLINE - (SECONDS - START) - BENCH_SECONDS))
step tests $((tests_limit > 170 ? tests_limit : 170)) env RESNEXT_KERNELS_TRITON_AUTOTUNE=0 TRITON_CACHE_DIR="$TEST_TRITON_CACHE" LOGS="$LOGS" SHARDS="$TEST_SHARDS" PY="$PY" bash -c '
  pids=()
  for ((i = 0; i < SHARDS; i++)); do
    "$PY" -m pytest tests -v -rfEs --shard "$i/$SHARDS" --junitxml="$LOGS/tests-$i.xml" >"$LOGS/tests-$i.log" 2>&1 &
    pids+=($!)
  done
  failed=0
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  exit $failed' &
# Without PyTorch's caching allocator, each tensor is its own allocation: an access past one's end is
# then caught instead of landing in a neighbour within the same cached block.
step memcheck 120 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${SANITIZE[@]}" --tool memcheck "$PY" benchmarks/sanitizer_case.py &
# Races are within a block: the small run's blocks (multi-tile ones included) are the large one's.
step racecheck 150 "${SANITIZE[@]}" --tool racecheck "$PY" benchmarks/sanitizer_case.py --small &
# Barriers and warp-synchronous instructions as the hardware executes them (divergent barriers, masks
# naming threads that are not there), beyond the host test build's checks of the same.
step synccheck 120 nice -n 10 "${SANITIZE[@]}" --tool synccheck "$PY" benchmarks/sanitizer_case.py --small &
step selfcheck 90 "$PY" -m resnext_kernels.bench --check-only --dtype bfloat16 &
# Warm-ups of the benchmarks below, their timings thrown away: they fill the disk caches of Triton's
# compiled kernels and of torch.compile's graphs, so that the benchmarks themselves spend their budget
# measuring (a model's first step with impl="triton" compiles every layer's kernels: minutes).
# Autotuning results are not cached, so the measured runs still tune on an idle GPU. Per batch: the
# issue's step target alone, at its N (ResNeXt-50 against ResNet-50, training, N=128): the same
# arguments in both runs, as Triton compiles per shape.
STEP_TARGET=(--models resnet50,resnext50_32x4d --modes train --batch-size 128)
step warm_ops 150 nice -n 10 "$PY" -m resnext_kernels.bench --ops --quick --dtype bfloat16 --no-check --no-save \
  --budget-s 100 &
step warm_batch 150 nice -n 10 "$PY" -m resnext_kernels.bench --quick "${STEP_TARGET[@]}" --no-check --no-save \
  --budget-s 100 &
wait

# The quick benchmarks, alone on the GPU. --budget-s stops starting new cases (the rest are recorded
# as skipped) well before the step's timeout, and a SIGTERM from the timeout still writes what has
# finished. Neither repeats the self-check (selfcheck.log has it): its small shapes share the Triton
# autotuning keys of the benchmarked layers, whose configs would then be tuned on them. Both runs merge
# into one JSON, under $OUT only (--no-save: the tree's benchmarks/results/ is written by the commit).
cap() {  # cap SECONDS: the step limit step() will apply, and a budget of two thirds of it
  local left=$((DEADLINE - (SECONDS - START)))
  limit=$(($1 < left ? $1 : left))
  budget=$((limit * 2 / 3))
}
cap 90
step bench_ops $limit "$PY" -m resnext_kernels.bench --ops --quick --dtype bfloat16 --no-check --no-save \
  --budget-s $budget --out "$OUT/results"
cap 60
step bench_batch $limit "$PY" -m resnext_kernels.bench --quick "${STEP_TARGET[@]}" --no-check --no-save --budget-s $budget \
  --out "$OUT/results"

status() { cat "$LOGS/$1.status" 2>/dev/null || echo "not run"; }
summary() {
  echo "== GPU check summary ($((SECONDS - START)) s; logs in $OUT/logs.tar.gz) =="
  grep -m1 "^torch" "$LOGS/environment.txt"
  grep -m1 "resnext_kernels: building" "$LOGS/build.log"
  echo "-- tests (Triton kernels compiled: $(($(ls "$TEST_TRITON_CACHE" 2>/dev/null | wc -l) - compiled_before))) --"
  for log in "$LOGS"/tests-*.log; do
    echo "$(basename "$log"): $(tail -n 1 "$log" | cut -c 1-160)"
    grep -E "FAILED|ERROR" "$log" | sort -u | head -n 10 | cut -c 1-160
  done
  echo "-- sanitizers --"
  for name in memcheck racecheck synccheck; do echo "$name: $(tail -n 1 "$LOGS/$name.log" 2>/dev/null | cut -c 1-160)"; done
  echo "-- selfcheck --"; tail -n 12 "$LOGS/selfcheck.log" 2>/dev/null
  echo "-- targets --"; grep -h -A 20 "^### Against the issues" "$LOGS/bench_ops.log" "$LOGS/bench_batch.log" | grep "^|" \
    | grep -v -e "^| target " -e "^|---"
  echo "-- bench_batch --"; grep -A 14 "^### Per batch" "$LOGS/bench_batch.log" | tail -n 12
  echo "-- training step, by kernel --"; grep -A 16 "^#### Where a training step" "$LOGS/bench_batch.log" | tail -n 14
  echo "-- bench_ops, per kernel --"; grep -A 40 "^### Per kernel" "$LOGS/bench_ops.log" | tail -n 36
  echo "-- results --"; ls "$OUT/results" 2>/dev/null
  echo "-- steps --"
  for name in build tests memcheck racecheck synccheck selfcheck warm_ops warm_batch bench_ops bench_batch; do
    echo "$name: $(status "$name")"
  done
}
echo
summary 2>&1 | tee "$OUT/summary.txt"
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" .
