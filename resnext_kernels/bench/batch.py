"""Per-batch benchmark, the paper's comparison: one training step (forward, backward, SGD step) and one
inference forward of whole models, ResNeXt against the ResNet of equal depth.

The paper (Xie et al. 2017, ImageNet on 8 GPUs) took 0.95 s per mini-batch for ResNeXt-101 against
0.70 s for ResNet-101: a ratio of 1.36, the price of grouped convolutions that this project exists to
lower. Providers: ``eager`` (the models with impl="torch": cuDNN), ``compile`` (torch.compile of those)
and the kernel backends (impl="triton", impl="cuda") where available.
"""

import dataclasses
import gc
import time

import torch
import torch.nn.functional as F

from .. import models
from . import timing
from .ops import DTYPES, KERNEL_PROVIDERS, LAYOUTS, kernel_breakdown

MODELS = ("resnet50", "resnext50_32x4d", "resnet101", "resnext101_32x4d")
MODES = ("train", "inference")
# (ResNeXt, ResNet of equal depth and nearly equal FLOPs)
PAIRS = (("resnext50_32x4d", "resnet50"), ("resnext101_32x4d", "resnet101"))
PAPER_RATIO = {("resnext101_32x4d", "resnet101"): 0.95 / 0.70}
NUM_CLASSES = 1000
# Kernels kept in a training step's breakdown, the longest first; only the pair of the step
# target is profiled (the profiler's bookkeeping of a whole step takes seconds of the run's budget).
TOP_KERNELS = 10
PROFILED_MODELS = PAIRS[0]


@dataclasses.dataclass(frozen=True)
class BatchCase:
    model: str
    mode: str  # "train" or "inference"
    n: int
    image_size: int
    dtype: str  # the autocast dtype on a GPU (weights stay fp32); float32: no autocast
    layout: str

    @property
    def id(self):
        return f"{self.model}-{self.mode}-n{self.n}-{self.image_size}px-{self.dtype}-{self.layout}"


def batch_cases(model_names, modes, n, image_size, dtype, layout):
    """Ordered so that a run cut short by its budget still has complete ResNeXt/ResNet pairs:
    mode by mode, pair by pair."""
    ordered = [m for pair in PAIRS for m in reversed(pair) if m in model_names]
    ordered += [m for m in model_names if m not in ordered]
    return [BatchCase(model, mode, n, image_size, dtype, layout) for mode in modes for model in ordered]


class BatchRunner:
    """A model on one provider with a fixed synthetic batch; each call runs one step."""

    def __init__(self, case, provider, device, seed=0):
        self.case, self.provider, self.device = case, provider, torch.device(device)
        torch.manual_seed(seed)
        impl = provider if provider in KERNEL_PROVIDERS else "torch"
        memory_format = LAYOUTS[case.layout]
        with self.device:  # initialise on the device: much faster than on the host for 100-layer models
            model = getattr(models, case.model)(num_classes=NUM_CLASSES, impl=impl)
        self.model = model.to(memory_format=memory_format)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        self.images = torch.randn(case.n, 3, case.image_size, case.image_size, generator=gen,
                                  device=self.device).contiguous(memory_format=memory_format)
        self.labels = torch.randint(0, NUM_CLASSES, (case.n,), generator=gen, device=self.device)
        low_precision = DTYPES[case.dtype] in (torch.float16, torch.bfloat16)
        self.autocast = dict(device_type=self.device.type, dtype=DTYPES[case.dtype], enabled=low_precision)
        # fp16 trains with loss scaling; its unscale and inf check are part of a real step.
        self.scaler = torch.amp.GradScaler(self.device.type) if DTYPES[case.dtype] == torch.float16 else None
        self.forward = torch.compile(self.model) if provider == "compile" else self.model
        if case.mode == "train":
            self.model.train()
            # The learning rate does not change the time; a small one keeps many steps on random labels finite.
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        else:
            self.model.eval()
        self._calls = 0
        self.compile_s = None

    def step(self):
        if self.case.mode == "inference":
            with torch.no_grad(), torch.autocast(**self.autocast):
                return self.forward(self.images)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(**self.autocast):
            loss = F.cross_entropy(self.forward(self.images), self.labels)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return loss

    def __call__(self):
        first = self._calls == 0
        self._calls += 1
        if not (first and self.provider == "compile"):
            return self.step()
        start = time.perf_counter()
        result = self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.compile_s = time.perf_counter() - start
        return result


def base_batch_record(case, provider):
    return {
        "model": case.model,
        "mode": case.mode,
        "provider": provider,
        "n": case.n,
        "image_size": case.image_size,
        "dtype": case.dtype,
        "layout": case.layout,
        "status": "ok",
        "reason": None,
        "median_ms": None,
        "p20_ms": None,
        "p80_ms": None,
        "reps": None,
        "images_per_s": None,
        "peak_memory_bytes": None,
        "compile_s": None,
        "kernel_ms": None,
        "fused_ms": None,
        "kernels": None,
    }


def run_batch_case(case, provider, device, timing_options):
    device = torch.device(device)
    record = base_batch_record(case, provider)
    runner = None
    _release(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        runner = BatchRunner(case, provider, device)
        measured = timing.measure(runner, device, **timing_options)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        # Where a training step's GPU time goes: how much of it the fused ops' own kernels take.
        profiled = case.mode == "train" and case.model in PROFILED_MODELS
        kernels = kernel_breakdown(runner, device, runs=1) if profiled else None
    except Exception as error:  # noqa: BLE001 - a failing provider must not stop the others
        return timing.failure_record(record, error)
    finally:
        compile_s = runner.compile_s if runner is not None else None
        del runner
        _release(device, compiled=provider == "compile")
    record = dict(record, median_ms=measured.median_s * 1e3, p20_ms=measured.p20_s * 1e3,
                  p80_ms=measured.p80_s * 1e3, reps=measured.reps, images_per_s=case.n / max(measured.median_s, 1e-12),
                  peak_memory_bytes=peak, compile_s=compile_s)
    return dict(record, **step_breakdown(kernels)) if kernels is not None else record


def step_breakdown(kernels):
    """A batch record's kernel_ms, fused_ms and kernels from ops.kernel_breakdown's rows for one step."""
    return dict(kernel_ms=sum(k["us"] for k in kernels) / 1e3, fused_ms=sum(k["us"] for k in kernels if k["ours"]) / 1e3,
                kernels=kernels[:TOP_KERNELS])


def _release(device, compiled=False):
    # One model at a time: free the last one's memory so that peaks are each model's own.
    gc.collect()
    if compiled:
        torch._dynamo.reset()
    timing.release_cached_memory(device)


def run_batches(cases, providers, device, *, timing_options, deadline=None, excluded=None, log=print, records=None):
    """Every case on every provider; records appended to ``records`` as they finish (see ops.run_ops)."""
    deadline = deadline or timing.Deadline()
    excluded = excluded or {}
    records = [] if records is None else records
    for index, case in enumerate(cases):
        for provider in providers:
            if provider in excluded:
                record = dict(base_batch_record(case, provider), status="skipped", reason=excluded[provider])
            elif deadline.expired():
                record = dict(base_batch_record(case, provider), status="skipped", reason="time budget spent")
            else:
                record = run_batch_case(case, provider, device, timing_options)
                if record["status"] == "ok":
                    text = f"{record['median_ms']:.1f} ms, {record['images_per_s']:.0f} images/s"
                else:
                    text = f"{record['status']} ({record['reason']})"
                log(f"  batch {index + 1}/{len(cases)} {case.id} {provider}: {text}")
            records.append(record)
    return records


def time_ratios(records):
    """ResNeXt time / ResNet time for each pair, mode and provider, and for each model's fastest
    provider ("best"); the paper's ratio beside the pair it measured."""
    times = {}
    for r in records:
        if r["status"] == "ok":
            times[(r["model"], r["mode"], r["provider"])] = r["median_ms"]
    providers = sorted({r["provider"] for r in records}, key=_provider_order)
    # "best" says something new only when there is more than one provider to choose from.
    candidates = providers + (["best"] if len(providers) > 1 else [])
    ratios = []
    for mode in MODES:
        for resnext, resnet in PAIRS:
            for provider in candidates:
                if provider == "best":
                    a, resnext_provider = _best(times, resnext, mode)
                    b, resnet_provider = _best(times, resnet, mode)
                else:
                    a, b = times.get((resnext, mode, provider)), times.get((resnet, mode, provider))
                    resnext_provider = resnet_provider = provider
                if a is None or b is None:
                    continue
                ratios.append({
                    "resnext": resnext,
                    "resnet": resnet,
                    "mode": mode,
                    "provider": provider,
                    "resnext_provider": resnext_provider,
                    "resnet_provider": resnet_provider,
                    "resnext_ms": a,
                    "resnet_ms": b,
                    "ratio": a / b,
                    # The paper timed training only.
                    "paper_ratio": PAPER_RATIO.get((resnext, resnet)) if mode == "train" else None,
                })
    return ratios


def _best(times, model, mode):
    """(fastest time, its provider) of ``model`` in ``mode``, or (None, None)."""
    candidates = [(t, p) for (m, md, p), t in times.items() if m == model and md == mode]
    return min(candidates) if candidates else (None, None)


def _provider_order(name):
    order = ("eager", "compile") + KERNEL_PROVIDERS
    return order.index(name) if name in order else len(order)
