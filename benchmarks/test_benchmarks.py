"""The benchmark's cases through pytest-benchmark (skipped without a CUDA GPU):

    pytest benchmarks/ --benchmark-only                      # the --quick cases, per op and per batch
    RESNEXT_BENCH_FULL=1 pytest benchmarks/ --benchmark-only # every case of the full run

The cases and providers are python -m resnext_kernels.bench's own (resnext_kernels/bench/ops.py and
batch.py). pytest-benchmark times with the host clock, so each round runs its case and then synchronises
the device: a round is launch + device time. The main job's event-based medians (with a cold L2 and the
launch overhead kept out) are the figures to quote; these are for pytest-benchmark's comparisons
between runs (--benchmark-autosave, --benchmark-compare).
"""

import os

import pytest
import torch

from resnext_kernels.bench import batch, ops, shapes, timing

GPU = torch.cuda.is_available()
FULL = os.environ.get("RESNEXT_BENCH_FULL") == "1"
DEVICE = torch.device("cuda") if GPU else None
pytestmark = pytest.mark.skipif(not GPU, reason="the benchmarks need a CUDA GPU")

# Without a GPU the cases are still listed (and skipped), so that collection looks the same everywhere.
OP_PROVIDERS = ops.providers_for(DEVICE) if GPU else list(ops.PROVIDERS)
OP_CASES = (ops.block_op_cases(shapes.op_layers(), shapes.op_layers(), 128, ["bfloat16", "float16"],
                              list(ops.LAYOUTS), shapes.MODES) if FULL
            else ops.block_op_cases(shapes.find_layers(shapes.QUICK_LAYER_IDS),
                                    shapes.find_layers(shapes.QUICK_BATCH_NORM_LAYER_IDS), 128, ["bfloat16"],
                                    ["channels_last"], shapes.MODES))
# Compiling whole models takes minutes each: only in the full set.
BATCH_PROVIDERS = [p for p in OP_PROVIDERS if FULL or p != "compile"]
BATCH_CASES = batch.batch_cases(batch.MODELS, batch.MODES, 128 if FULL else 32, 224, "bfloat16", "channels_last")


@pytest.fixture(scope="session", autouse=True)
def cudnn_benchmark():
    # As the main job: cuDNN times its algorithms and keeps the fastest, the baselines at their best.
    previous, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, True
    yield
    torch.backends.cudnn.benchmark = previous


@pytest.fixture(scope="session")
def copy_gbps():
    return timing.copy_bandwidth(DEVICE)["gbps"]


def _synchronised(fn):
    def run():
        fn()
        torch.cuda.synchronize(DEVICE)
    return run


def _release(compiled):
    if compiled:
        torch._dynamo.reset()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("provider", OP_PROVIDERS)
@pytest.mark.parametrize("case", OP_CASES, ids=lambda case: case.id)
def test_op(benchmark, case, provider, copy_gbps):
    try:
        runner = ops.OpRunner(case, provider, DEVICE)
        _synchronised(runner)()  # compilation and autotuning happen here, outside the rounds
    except (ops.Unsupported, NotImplementedError) as error:
        pytest.skip(str(error))
    try:
        benchmark.pedantic(_synchronised(runner), rounds=30 if FULL else 10, warmup_rounds=3, iterations=1)
        floor_s = shapes.floor_seconds(case.bytes, copy_gbps * 1e9)
        benchmark.extra_info.update(bytes=case.bytes, flops=case.flops, copy_gbps=copy_gbps, floor_us=floor_s * 1e6,
                                    compile_s=runner.compile_s)
        if benchmark.stats:  # None under --benchmark-disable
            benchmark.extra_info["fraction_of_floor"] = floor_s / benchmark.stats.stats.median
    finally:
        del runner
        _release(provider == "compile")


@pytest.mark.parametrize("provider", BATCH_PROVIDERS)
@pytest.mark.parametrize("case", BATCH_CASES, ids=lambda case: case.id)
def test_batch(benchmark, case, provider):
    torch.cuda.reset_peak_memory_stats(DEVICE)
    try:
        runner = batch.BatchRunner(case, provider, DEVICE)
        _synchronised(runner)()
    except NotImplementedError as error:
        pytest.skip(str(error).splitlines()[0])
    try:
        benchmark.pedantic(_synchronised(runner), rounds=10, warmup_rounds=2, iterations=1)
        benchmark.extra_info.update(peak_memory_bytes=torch.cuda.max_memory_allocated(DEVICE),
                                    compile_s=runner.compile_s)
        if benchmark.stats:
            benchmark.extra_info["images_per_s"] = case.n / benchmark.stats.stats.median
    finally:
        del runner
        _release(provider == "compile")
