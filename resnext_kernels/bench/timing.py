"""Timing: the median of many runs, with CUDA events on a GPU and the host clock on a CPU.

On a GPU, ``measure(..., cold_cache=True)`` (the per-op benchmark) times each run with its own pair of
events and, before each, queues two things on the device:

* a short spin (``torch.cuda._sleep``) long enough for the host to queue the whole run before the
  device reaches the start event, so that Python and launch overhead stay outside the measurement
  (a layer inside a network at N=128 is never waiting for the host either);
* a read of a buffer twice the size of the L2 cache, so that each run starts with its inputs out of
  the cache. A *read* evicts with clean lines only; clearing the cache by writing a buffer (as
  ``triton.testing.do_bench`` does) leaves dirty lines whose write-back lands inside the next
  measurement.

The callers also rotate among several input sets (shapes.rotation_sets). Whole training steps
(per-batch) are timed back to back, host overhead included, as a training loop runs them.
"""

import dataclasses
import functools
import math
import time

import torch


@dataclasses.dataclass(frozen=True)
class Timing:
    median_s: float
    p20_s: float  # the 20th and 80th percentiles: the spread that tells a real difference from noise
    p80_s: float
    reps: int


class Deadline:
    """A wall-clock budget; ``None`` seconds means no limit."""

    def __init__(self, seconds=None):
        self.seconds = seconds
        self._end = None if seconds is None else time.monotonic() + seconds

    def remaining(self):
        return math.inf if self._end is None else self._end - time.monotonic()

    def expired(self):
        return self.remaining() <= 0


def quantile(sorted_values, q):
    """Linear-interpolated quantile of an already sorted, non-empty list."""
    position = (len(sorted_values) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summarize(seconds):
    values = sorted(seconds)
    return Timing(quantile(values, 0.5), quantile(values, 0.2), quantile(values, 0.8), len(values))


def measure(fn, device, *, warmup_s=0.1, rep_s=0.5, min_warmup_calls=3, min_reps=10, max_reps=200,
            cold_cache=False):
    """Times ``fn()`` after a warm-up (which absorbs compilation, autotuning, algorithm search and
    allocator growth); the number of timed runs is ``rep_s`` over the warm-up's estimate of one run,
    clamped to [min_reps, max_reps]."""
    device = torch.device(device)
    host_s, total_s = _warm_up(fn, device, warmup_s, min_warmup_calls)
    reps = max(min_reps, min(max_reps, math.ceil(rep_s / max(total_s, 1e-7))))
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return summarize(times)

    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    if cold_cache:
        flush = _flush_buffer(device)
        # Twice the host's queueing time, at least 50 us, at most 20 ms of spin per run.
        head_start_cycles = int(min(max(2 * host_s, 50e-6), 20e-3) * _spin_cycles_per_second(device))
    for start, end in zip(starts, ends):
        if cold_cache:
            torch.cuda._sleep(head_start_cycles)
            flush.sum()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return summarize([start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends)])


def _warm_up(fn, device, warmup_s, min_calls):
    """Runs ``fn`` until ``warmup_s`` has passed and at least ``min_calls`` times; returns the median of
    the last calls' host time (to queue the work) and total time (host + device)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    host, total = [], []
    began = time.perf_counter()
    while len(total) < min_calls or time.perf_counter() - began < warmup_s:
        sync()
        start = time.perf_counter()
        fn()
        queued = time.perf_counter()
        sync()
        host.append(queued - start)
        total.append(time.perf_counter() - start)
    # The first calls carry compilation and autotuning: judge by the later ones.
    recent = max(1, len(total) // 2)
    return summarize(host[-recent:]).median_s, summarize(total[-recent:]).median_s


@functools.lru_cache(maxsize=None)
def _flush_buffer(device):
    properties = torch.cuda.get_device_properties(device)
    cache_bytes = getattr(properties, "L2_cache_size", 0) or 64 * 2 ** 20
    return torch.ones(2 * cache_bytes // 4, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _spin_cycles_per_second(device):
    """The rate of torch.cuda._sleep's clock, measured (the SM clock varies by card and load)."""
    cycles = 2_000_000
    torch.cuda._sleep(cycles)  # first launch loads the kernel
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize(device)
    return cycles / (start.elapsed_time(end) / 1e3)


def cache_bytes(device):
    """The last-level (L2) cache of a CUDA device; 0 for a CPU (its caches are not modelled)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2 ** 20


def copy_bandwidth(device, nbytes=None):
    """Device memory bandwidth, measured by a large copy: (bytes read + bytes written) / median time.
    Returns a dict for the results (bytes, median_us, gbps)."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = 2 ** 30 if device.type == "cuda" else 2 ** 28
    # Non-constant data, as for every other measurement.
    source = torch.arange(nbytes // 4, dtype=torch.int32, device=device).view(torch.uint8)
    target = torch.empty_like(source)
    timing = measure(lambda: target.copy_(source), device, warmup_s=0.05, rep_s=0.3, min_warmup_calls=2,
                     min_reps=5, max_reps=100)
    del source, target
    release_cached_memory(device)
    return {
        "bytes": nbytes,
        "median_us": timing.median_s * 1e6,
        "gbps": 2 * nbytes / timing.median_s / 1e9,
    }


def release_cached_memory(device):
    """Hands the caching allocator's free blocks back to the device (a no-op on a CPU). After a fault
    that left the CUDA context unusable this raises too: ignored, as the fault is being recorded."""
    if torch.device(device).type == "cuda":
        try:
            torch.cuda.empty_cache()
        except RuntimeError:
            pass


def failure_record(record, error):
    """``record`` for a case whose provider raised: "unsupported" for what a backend does not
    implement, "error" (one line of reason) for anything else."""
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, NotImplementedError):
        return dict(record, status="unsupported", reason=first_line)
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return dict(record, status="error", reason="out of memory")
    return dict(record, status="error", reason=f"{type(error).__name__}: {first_line}")
