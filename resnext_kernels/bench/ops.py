"""Per-op benchmark: the fused ops on ResNeXt's layer shapes, for every provider that can run.

The ops (shapes.OPS): ``grouped_conv_bn_relu``, the block's grouped layer (conv2 + bn2 + relu); and
the block's other two BatchNorms through ``batch_norm_relu``: ``batch_norm_relu`` (bn1 + relu, on the
grouped layer's input) and ``batch_norm_add_relu`` (bn3 + the residual add + relu, on the block's output).

Providers:
* ``eager``: what a PyTorch model runs without this project: F.conv2d (cuDNN) + F.batch_norm + ReLU,
  or F.batch_norm (+ the in-place residual add) + ReLU, as torchvision's Bottleneck does;
* ``compile``: torch.compile of that same function (default mode), compiled afresh for each case;
* ``triton``, ``cuda``: the op with impl=..., when available_impls(device) lists them.

Each kernel provider's case also gets a breakdown by GPU kernel (``kernels``: name, launches and device
time per run, from torch.profiler), so that one run shows which of an op's kernels misses its floor.

Modes (shapes.MODES): ``inference`` (running statistics, under no_grad), ``train_fwd`` (batch
statistics and the running-statistics update, under no_grad: the forward kernels alone) and
``train_fwd_bwd`` (the forward with autograd recording, then the gradients of every input and
parameter for a random dz).
"""

import dataclasses
import functools
import math
import re
import time

import torch
import torch.nn.functional as F

from .. import available_impls, backends, batch_norm_relu, grouped_conv_bn_relu
from . import shapes, timing

# The order each case runs them in. cuda before triton: the flagship, and with no autotuning to do it
# is quick, so a run cut short by its time budget (the GPU check's) still has it.
PROVIDERS = ("eager", "compile", "cuda", "triton")
KERNEL_PROVIDERS = ("cuda", "triton")
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class Unsupported(Exception):
    """The provider does not implement what the case needs (not a failure)."""


@dataclasses.dataclass(frozen=True)
class OpCase:
    layer: shapes.Layer
    n: int
    dtype: str  # a key of DTYPES
    layout: str  # a key of LAYOUTS
    mode: str  # one of shapes.MODES
    op: str = "grouped_conv_bn_relu"  # one of shapes.OPS

    @property
    def id(self):
        return f"{self.layer.id}-{self.op}-n{self.n}-{self.dtype}-{self.layout}-{self.mode}"

    @property
    def convolution(self):
        return self.op == "grouped_conv_bn_relu"

    @property
    def itemsize(self):
        return DTYPES[self.dtype].itemsize

    @property
    def bytes(self):
        if self.convolution:
            return shapes.op_bytes(self.layer, self.n, self.mode, self.itemsize)
        return shapes.batch_norm_bytes(self.layer, self.n, self.mode, self.itemsize, self.op)

    @property
    def flops(self):
        """The convolution's; BatchNorm's few FLOPs per element are not counted (0)."""
        return shapes.op_flops(self.layer, self.n, self.mode) if self.convolution else 0

    def shape(self):
        """The record's ``shape``: the grouped layer's, or the BatchNorm's channels and size."""
        if self.convolution:
            return self.layer.as_dict()
        channels, h, w = shapes.batch_norm_shape(self.layer, self.op)
        return {"channels": channels, "h": h, "w": w, "residual": self.op == "batch_norm_add_relu"}


def op_cases(layers, n, dtypes, layouts, modes, op="grouped_conv_bn_relu"):
    """The cases of ``op`` on ``layers``' blocks; a BatchNorm op's only where its shape is new (bn1 and bn3
    repeat across stages and models more than the grouped layers do)."""
    if op != "grouped_conv_bn_relu":
        shapes_seen = {}
        for layer in layers:
            shapes_seen.setdefault(shapes.batch_norm_shape(layer, op), layer)
        layers = list(shapes_seen.values())
    return [OpCase(layer, n, dtype, layout, mode, op)
            for layer in layers for dtype in dtypes for layout in layouts for mode in modes]


def block_op_cases(layers, batch_norm_layers, n, dtypes, layouts, modes):
    """The grouped layer's cases on ``layers``, then the BatchNorm ops' on ``batch_norm_layers``' blocks
    (so that a run out of time skips those first)."""
    cases = op_cases(layers, n, dtypes, layouts, modes)
    for op in shapes.OPS[1:]:
        cases += op_cases(batch_norm_layers, n, dtypes, layouts, modes, op)
    return cases


def providers_for(device):
    """The providers that can run on ``device``: on a CPU only the eager reference is worth timing (the
    kernel backends run there only in test instruments, and compiling would cost more than it tells)."""
    device = torch.device(device)
    if device.type != "cuda":
        return ["eager"]
    return ["eager", "compile"] + [impl for impl in KERNEL_PROVIDERS if impl in available_impls(device)]


def eager_conv_bn_relu(x, weight, gamma, beta, running_mean, running_var, stride: int, groups: int,
                       training: bool):
    """The unfused layer as torchvision's Bottleneck runs it: conv2, bn2, relu (in place)."""
    y = F.conv2d(x, weight, None, stride, 1, 1, groups)
    return F.relu(F.batch_norm(y, running_mean, running_var, gamma, beta, training, 0.1, 1e-5), inplace=True)


def eager_batch_norm_relu(x, residual, gamma, beta, running_mean, running_var, training: bool):
    """bn1, relu or bn3, the residual add, relu, as torchvision's Bottleneck runs them (in place)."""
    y = F.batch_norm(x, running_mean, running_var, gamma, beta, training, 0.1, 1e-5)
    if residual is not None:
        y += residual
    return F.relu(y, inplace=True)


def unsupported_reason(provider, device):
    """Why a kernel provider cannot run on ``device`` (not built, no interpreter...), or None."""
    if provider not in KERNEL_PROVIDERS:
        return None
    return backends.unavailable_reason(provider, torch.device(device))


class OpRunner:
    """One case on one provider: the inputs (rotated among several sets) and a call per timed run.

    Building it compiles (``compile``) or loads nothing yet; the first call does, and ``compile_s``
    then holds how long that first call took for the ``compile`` provider."""

    def __init__(self, case, provider, device, generator_seed=0):
        reason = unsupported_reason(provider, device)
        if reason is not None:
            raise Unsupported(reason)
        self.case, self.provider, self.device = case, provider, torch.device(device)
        dtype, memory_format = DTYPES[case.dtype], LAYOUTS[case.layout]
        training = case.mode != "inference"
        backward = case.mode == "train_fwd_bwd"
        gen = torch.Generator(device=self.device).manual_seed(generator_seed)

        def randn(*size, scale=1.0):
            return (torch.randn(*size, generator=gen, device=self.device, dtype=torch.float32) * scale)

        def activation(*size):
            return randn(*size).to(dtype).contiguous(memory_format=memory_format)

        # Random data (never zeros: they can run faster than real data) with realistic scales.
        layer = case.layer
        if case.convolution:
            channels, out_size = layer.c_out, (layer.h_out, layer.w_out)
            fan_in = layer.channels_per_group * 9
            # In the activations' layout, as model.to(memory_format=...) leaves a model's weights.
            weight = randn(layer.c_out, layer.channels_per_group, 3, 3, scale=(2 / fan_in) ** 0.5).to(dtype)
            weight = weight.contiguous(memory_format=memory_format)
            input_sizes = [(layer.c_in, layer.h, layer.w)]
        else:
            channels, h, w = shapes.batch_norm_shape(layer, case.op)
            out_size = (h, w)
            input_sizes = [(channels, h, w)] * (2 if case.op == "batch_norm_add_relu" else 1)  # x, residual
        gamma = randn(channels, scale=0.1).add_(1.0)
        beta = randn(channels, scale=0.1)
        self.running_mean = randn(channels, scale=0.1)
        self.running_var = randn(channels, scale=0.1).abs_().add_(1.0)
        params = (weight, gamma, beta) if case.convolution else (gamma, beta)

        per_set = sum(case.n * math.prod(size) * case.itemsize for size in input_sizes)
        per_set += case.n * channels * math.prod(out_size) * case.itemsize if backward else 0
        self.sets = []
        for _ in range(shapes.rotation_sets(per_set, timing.cache_bytes(self.device))):
            inputs = tuple(activation(case.n, *size).requires_grad_(backward) for size in input_sizes)
            dz = activation(case.n, channels, *out_size) if backward else None
            self.sets.append((inputs, dz))
        if backward:
            for t in params:
                t.requires_grad_(True)

        if provider in ("eager", "compile"):
            function = eager_conv_bn_relu if case.convolution else eager_batch_norm_relu
            if provider == "compile":
                # A fresh cache for each case: the same function compiled for many shapes would hit
                # dynamo's recompile limit or switch to dynamic shapes, and time something else.
                torch._dynamo.reset()
                function = torch.compile(function, dynamic=False)
            if case.convolution:
                def op_fn(x):
                    return function(x, weight, gamma, beta, self.running_mean, self.running_var, layer.stride,
                                    layer.groups, training)
            else:
                def op_fn(x, residual=None):
                    return function(x, residual, gamma, beta, self.running_mean, self.running_var, training)
        elif case.convolution:
            def op_fn(x):
                return grouped_conv_bn_relu(x, weight, gamma, beta, self.running_mean, self.running_var,
                                            stride=layer.stride, groups=layer.groups, training=training,
                                            impl=provider)
        else:
            def op_fn(x, residual=None):
                return batch_norm_relu(x, gamma, beta, self.running_mean, self.running_var, residual,
                                       training=training, impl=provider)

        if backward:
            def run(inputs, dz):
                z = op_fn(*inputs)
                return torch.autograd.grad(z, inputs + params, dz)
        else:
            def run(inputs, dz):
                with torch.no_grad():
                    return op_fn(*inputs)

        self._run = run
        self._calls = 0
        self.compile_s = None

    def __call__(self):
        inputs, dz = self.sets[self._calls % len(self.sets)]
        first = self._calls == 0
        self._calls += 1
        if not (first and self.provider == "compile"):
            return self._run(inputs, dz)
        start = time.perf_counter()
        result = self._run(inputs, dz)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.compile_s = time.perf_counter() - start
        return result


def run_op_case(case, provider, device, timing_options, bandwidth_gbps):
    """Times one case on one provider; returns its result record (see report.py for the fields)."""
    record = base_op_record(case, provider, bandwidth_gbps)
    runner = None
    try:
        runner = OpRunner(case, provider, device)
        measured = timing.measure(runner, device, cold_cache=True, **timing_options)
        kernels = kernel_breakdown(runner, device) if provider in KERNEL_PROVIDERS else None
    except Unsupported as error:
        return dict(record, status="unsupported", reason=str(error))
    except Exception as error:  # noqa: BLE001 - a failing provider must not stop the others
        return timing.failure_record(record, error)
    finally:
        compile_s = runner.compile_s if runner is not None else None
        del runner
        timing.release_cached_memory(device)
    return dict(record, **timing_figures(case, measured, bandwidth_gbps), compile_s=compile_s, kernels=kernels)


def kernel_breakdown(runner, device, runs=5):
    """What one call of ``runner`` runs on the GPU: each kernel (and copy or memset) by name, with its
    launches and its device time per call, the longest first; None on a CPU or when the profiler
    cannot run (its reason is then logged). Taken after the timing, so nothing compiles or autotunes
    inside it; inputs still rotate, but the L2 is not flushed between calls."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
            for _ in range(runs):
                runner()
            torch.cuda.synchronize(device)
        events = [(event.name, event.time_range.elapsed_us()) for event in profiler.events()
                  if event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)]
    except Exception as error:  # noqa: BLE001 - a breakdown is extra information, never worth a failed case
        print(f"  no kernel breakdown: {type(error).__name__}: {error}", flush=True)
        return None
    return summarize_kernels(events, runs)


def summarize_kernels(events, runs):
    """[{name, calls, us, ours}] per call from (name, microseconds) device events of ``runs`` calls;
    ``ours``: one of this project's kernels (see project_kernel)."""
    totals = {}
    for name, us in events:
        calls, total = totals.get(name, (0, 0.0))
        totals[name] = (calls + 1, total + us)
    rows = [{"name": short_kernel_name(name), "calls": calls / runs, "us": total / runs, "ours": project_kernel(name)}
            for name, (calls, total) in totals.items()]
    return sorted(rows, key=lambda row: -row["us"])


def project_kernel(name):
    """Whether a kernel, by its full name as the profiler gives it, is one of the fused ops' own: the
    CUDA backend's live in namespace resnext_kernels, the Triton backend's carry their function's name."""
    return "resnext_kernels::" in name or name in _triton_kernel_names()


def _triton_kernels():
    """{name: kernel} of the Triton backend's kernels (jitted, autotuned or interpreted); empty without Triton."""
    try:
        from triton.runtime.jit import KernelInterface

        from ..triton import backward, batch_norm_relu, conv
    except ImportError:
        return {}
    return {name: value for module in (conv, backward, batch_norm_relu) for name, value in vars(module).items()
            if isinstance(value, KernelInterface)}


@functools.cache
def _triton_kernel_names():
    return frozenset(_triton_kernels())


def short_kernel_name(name):
    """A kernel's name without "void", namespaces of this project and its argument list."""
    name = re.sub(r"^void ", "", name).replace("(anonymous namespace)::", "").replace("resnext_kernels::", "")
    depth = 0
    for index, char in enumerate(name):
        depth += (char == "<") - (char == ">")
        if char == "(" and depth == 0 and index > 0 and name[index - 1] != " ":  # not "Memset (Device)"
            return name[:index]
    return name


def base_op_record(case, provider, bandwidth_gbps):
    floor_s = shapes.floor_seconds(case.bytes, bandwidth_gbps * 1e9) if bandwidth_gbps else None
    return {
        "op": case.op,
        "layer": case.layer.id,
        "shape": case.shape(),
        "n": case.n,
        "dtype": case.dtype,
        "layout": case.layout,
        "mode": case.mode,
        "provider": provider,
        "status": "ok",
        "reason": None,
        "bytes": case.bytes,
        "flops": case.flops,
        "floor_us": None if floor_s is None else floor_s * 1e6,
        "median_us": None,
        "p20_us": None,
        "p80_us": None,
        "reps": None,
        "gbps": None,
        "tflops": None,
        "fraction_of_floor": None,
        "speedup_vs_eager": None,
        "speedup_vs_compile": None,
        "compile_s": None,
        "kernels": None,
    }


def timing_figures(case, measured, bandwidth_gbps):
    """GB/s, TFLOP/s and the fraction of the memory floor achieved (floor time / measured time: 1.0
    means the kernel moves its minimal bytes at copy bandwidth)."""
    seconds = max(measured.median_s, 1e-12)  # a clock tick of 0 must not divide by zero
    figures = {
        "median_us": seconds * 1e6,
        "p20_us": measured.p20_s * 1e6,
        "p80_us": measured.p80_s * 1e6,
        "reps": measured.reps,
        "gbps": case.bytes / seconds / 1e9,
        "tflops": case.flops / seconds / 1e12 if case.flops else None,
    }
    if bandwidth_gbps:
        figures["fraction_of_floor"] = shapes.floor_seconds(case.bytes, bandwidth_gbps * 1e9) / seconds
    return figures


def add_speedups(records):
    """Fills speedup_vs_eager / speedup_vs_compile (baseline time / this time) within each case."""
    by_case = {}
    for record in records:
        key = (record["op"], record["layer"], record["n"], record["dtype"], record["layout"], record["mode"])
        by_case.setdefault(key, {})[record["provider"]] = record
    for providers in by_case.values():
        for baseline, field in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile")):
            base = providers.get(baseline)
            if base is None or base["status"] != "ok":
                continue
            for record in providers.values():
                if record["status"] == "ok":
                    record[field] = base["median_us"] / record["median_us"]
    return records


def run_ops(cases, providers, device, *, timing_options, bandwidth_gbps, deadline=None, compile_deadline=None,
            excluded=None, log=print, records=None):
    """Every case on every provider, in order; returns the records, appended to ``records`` as they
    finish (so that an interrupted run keeps them). Cases left when ``deadline`` expires are recorded
    as skipped, and the compile provider is skipped once ``compile_deadline`` has (compiling is the
    slow part of a short run). ``excluded``: {provider: reason} not to run."""
    deadline = deadline or timing.Deadline()
    compile_deadline = compile_deadline or timing.Deadline()
    excluded = excluded or {}
    records = [] if records is None else records
    for index, case in enumerate(cases):
        for provider in providers:
            if provider in excluded:
                record = dict(base_op_record(case, provider, bandwidth_gbps), status="skipped",
                              reason=excluded[provider])
            elif deadline.expired():
                record = dict(base_op_record(case, provider, bandwidth_gbps), status="skipped",
                              reason="time budget spent")
            elif provider == "compile" and compile_deadline.expired():
                record = dict(base_op_record(case, provider, bandwidth_gbps), status="skipped",
                              reason="compile time budget spent")
            else:
                record = run_op_case(case, provider, device, timing_options, bandwidth_gbps)
                log(f"  op {index + 1}/{len(cases)} {case.id} {provider}: " + describe_status(record))
            records.append(record)
    return add_speedups(records)


def describe_status(record):
    if record["status"] == "ok":
        text = f"{record['median_us']:.1f} us"
        if record.get("fraction_of_floor"):
            text += f", {100 * record['fraction_of_floor']:.0f}% of the memory floor"
        return text
    return f"{record['status']} ({record['reason']})"
