"""The benchmark harness on the CPU: the counts, the floor arithmetic, the results schema, the CLI's
no-GPU path and the README generator, so that the figures it prints on a GPU are computed right."""

import collections
import importlib.util
import json
import math
import pathlib

import pytest
import torch

from resnext_kernels import ResNeXtBlock, models
from resnext_kernels.bench import __main__ as bench_main
from resnext_kernels.bench import batch, environment, ops, report, shapes, timing

ROOT = pathlib.Path(__file__).resolve().parents[1]
MB = 1e6

# DESIGN.md section 2: ResNeXt-50 32x4d's grouped layers, bf16: (bytes per image in MB, N=128 floor at
# 3.0 TB/s in us), each doing 28.9 MFLOP per image.
DESIGN_TABLE = {
    "resnext50_32x4d:stage1": (1.61, 68),
    "resnext50_32x4d:stage2-first": (2.01, 86),
    "resnext50_32x4d:stage2": (0.80, 34),
    "resnext50_32x4d:stage3-first": (1.00, 43),
    "resnext50_32x4d:stage3": (0.40, 17),
    "resnext50_32x4d:stage4-first": (0.50, 21),
    "resnext50_32x4d:stage4": (0.20, 8.6),
}


# ------------------------------------------------------------------------------------- counts, floor

@pytest.mark.parametrize("layer_id", list(DESIGN_TABLE))
def test_design_table_bytes_floor_and_flops(layer_id):
    (layer,) = shapes.find_layers([layer_id])
    megabytes, floor_us = DESIGN_TABLE[layer_id]
    x, z = shapes.activation_bytes(layer, 1, itemsize=2)
    assert round((x + z) / MB, 2) == megabytes
    assert shapes.floor_seconds((x + z) * 128, 3.0e12) * 1e6 == pytest.approx(floor_us, rel=0.02)
    assert round(shapes.forward_flops(layer, 1) / MB, 1) == 28.9


def test_stage1_numbers_exactly():
    (layer,) = shapes.find_layers(["resnext50_32x4d:stage1"])
    assert (layer.c_in, layer.h, layer.c_out, layer.h_out) == (128, 56, 128, 56)
    assert (layer.groups, layer.channels_per_group) == (32, 4)
    assert shapes.activation_bytes(layer, 1, 2) == (128 * 56 * 56 * 2, 128 * 56 * 56 * 2)
    assert shapes.forward_flops(layer, 128) == 2 * 128 * 56 * 56 * 128 * 4 * 9


def test_op_bytes_per_mode():
    layer = shapes.Layer("toy", 2, True, c_in=8, h=5, w=5, c_out=16, groups=4, stride=2, repeats=1)
    assert (layer.h_out, layer.w_out, layer.channels_per_group) == (3, 3, 2)
    n, itemsize = 3, 2
    x, z = n * 8 * 25 * itemsize, n * 16 * 9 * itemsize
    weight, channel = 16 * 2 * 9 * itemsize, 16 * 4  # BN values are fp32
    assert shapes.activation_bytes(layer, n, itemsize) == (x, z)
    assert shapes.op_bytes(layer, n, "inference", itemsize) == x + z + weight + 4 * channel
    # The statistics first: a second read of x (8 channels x 25 pixels) moves less than y (16 x 9)
    # written and read back. gamma, beta; running stats read and written.
    forward = 2 * x + z + weight + 2 * channel + 4 * channel
    assert shapes.op_bytes(layer, n, "train_fwd", itemsize) == forward
    # backward: the sums read dz and z, then dgrad and wgrad dz, z and x, and the weight, gamma, beta;
    # writes dx, dweight, dgamma, dbeta
    backward = (2 * (z + z) + x + weight + 2 * channel) + (x + weight + 2 * channel)
    assert shapes.op_bytes(layer, n, "train_fwd_bwd", itemsize) == forward + backward
    stride_1 = shapes.Layer("toy", 2, False, c_in=16, h=5, w=5, c_out=16, groups=4, stride=1, repeats=1)
    e = n * 16 * 25 * itemsize
    weight_1 = 16 * 4 * 9 * itemsize
    assert shapes.op_bytes(stride_1, n, "train_fwd", itemsize) == 3 * e + weight_1 + 6 * channel  # x read twice
    assert shapes.op_bytes(stride_1, n, "train_fwd_bwd", itemsize) == 9 * e + 3 * weight_1 + 10 * channel
    with pytest.raises(ValueError):
        shapes.op_bytes(layer, n, "sideways", itemsize)


def test_batch_norm_bytes_per_mode():
    (layer,) = shapes.find_layers(["resnext50_32x4d:stage2-first"])  # 256x56x56 in, 512x28x28 out
    assert shapes.batch_norm_shape(layer, "batch_norm_relu") == (256, 56, 56)
    assert shapes.batch_norm_shape(layer, "batch_norm_add_relu") == (512, 28, 28)
    n, itemsize = 3, 2
    for op, channels, e in (("batch_norm_relu", 256, n * 256 * 56 * 56 * itemsize),
                            ("batch_norm_add_relu", 512, n * 512 * 28 * 28 * itemsize)):
        residual = op == "batch_norm_add_relu"
        channel = channels * 4
        inference = shapes.batch_norm_bytes(layer, n, "inference", itemsize, op)
        forward = shapes.batch_norm_bytes(layer, n, "train_fwd", itemsize, op)
        both = shapes.batch_norm_bytes(layer, n, "train_fwd_bwd", itemsize, op)
        assert inference == (2 + residual) * e + 4 * channel  # x (residual) in, z out
        assert forward == (3 + residual) * e + 6 * channel  # x twice: the statistics come first
        # without a residual: x and dz twice, dx; with one: x, dz, z, then g written and read, dx
        assert both - forward == (7 if residual else 5) * e + 4 * channel
        with pytest.raises(ValueError):
            shapes.batch_norm_bytes(layer, n, "sideways", itemsize, op)
    with pytest.raises(ValueError, match="not a BatchNorm op"):
        shapes.batch_norm_shape(layer, "grouped_conv_bn_relu")


def test_fwd_bwd_moves_the_activations_of_both_passes_and_computes_three_forwards():
    (layer,) = shapes.find_layers(["resnext101_64x4d:stage2-first"])
    x, z = shapes.activation_bytes(layer, 128, 2)
    fwd_bwd = shapes.op_bytes(layer, 128, "train_fwd_bwd", 2)
    # forward x, y written and read back (a quarter of x: less than reading x again), z; backward dz
    # and z twice, x, dx
    activations = (x + 2 * z + z) + (4 * z + x + x)
    assert activations <= fwd_bwd <= activations * 1.01  # weights and BN values are the small rest
    assert shapes.op_flops(layer, 128, "train_fwd_bwd") == 3 * shapes.op_flops(layer, 128, "inference")
    assert shapes.op_flops(layer, 128, "train_fwd") == shapes.forward_flops(layer, 128)


@pytest.mark.parametrize("model", sorted(shapes.MODEL_CONFIGS))
def test_layer_tables_match_the_models(model):
    """Every conv2 of the built model (on the meta device: shapes only) has a listed shape, as often
    as the table says."""
    seen = collections.Counter()
    with torch.device("meta"):
        net = getattr(models, model)(impl="torch")
        for block in net.modules():
            if isinstance(block, ResNeXtBlock):
                block.register_forward_pre_hook(lambda b, args: seen.update([(
                    b.conv2.in_channels, args[0].shape[2], args[0].shape[3], b.conv2.out_channels, b.conv2.groups,
                    b.conv2.stride[0])]))
        net(torch.empty(1, 3, 224, 224))
    listed = collections.Counter({(l.c_in, l.h, l.w, l.c_out, l.groups, l.stride): l.repeats
                                  for l in shapes.model_layers(model)})
    assert seen == listed


@pytest.mark.parametrize("model", sorted(shapes.MODEL_CONFIGS))
def test_batch_norm_shapes_match_the_models(model):
    """bn1 and bn3 of every block of the built model have the (channels, h, w) that
    shapes.batch_norm_shape gives for its grouped layer."""
    seen = set()
    with torch.device("meta"):
        net = getattr(models, model)(impl="torch")
        for block in net.modules():
            if isinstance(block, ResNeXtBlock):
                block.register_forward_hook(lambda b, args, out: seen.add((
                    (b.conv2.in_channels, args[0].shape[2], args[0].shape[3], b.conv2.out_channels, b.conv2.groups,
                     b.conv2.stride[0]),
                    (b.bn1.num_features, args[0].shape[2], args[0].shape[3]),
                    (b.bn3.num_features, out.shape[2], out.shape[3]))))
        net(torch.empty(1, 3, 224, 224))
    listed = {((l.c_in, l.h, l.w, l.c_out, l.groups, l.stride),
               shapes.batch_norm_shape(l, "batch_norm_relu"), shapes.batch_norm_shape(l, "batch_norm_add_relu"))
              for l in shapes.model_layers(model)}
    assert seen == listed


def test_op_layer_set():
    layers = shapes.op_layers()
    assert len(layers) == 21 and len({layer.id for layer in layers}) == 21
    assert {layer.channels_per_group for layer in layers if layer.model == "resnext101_32x8d"} == {8, 16, 32, 64}
    assert sum(layer.stride == 2 for layer in layers) == 9
    with pytest.raises(ValueError, match="unknown layer"):
        shapes.find_layers(["resnext50_32x4d:stage9"])


def test_rotation_sets():
    assert shapes.rotation_sets(10 * MB, 50 * MB) == 8  # capped
    assert shapes.rotation_sets(40 * MB, 50 * MB) == 3  # 120 MB >= twice the cache
    assert shapes.rotation_sets(200 * MB, 50 * MB) == 1
    assert shapes.rotation_sets(10 * MB, 0) == 1  # CPU: caches not modelled


def test_timing_figures_and_floor_fraction():
    (layer,) = shapes.find_layers(["resnext50_32x4d:stage1"])
    case = ops.OpCase(layer, 128, "bfloat16", "channels_last", "inference")
    measured = timing.Timing(median_s=100e-6, p20_s=90e-6, p80_s=110e-6, reps=50)
    figures = ops.timing_figures(case, measured, bandwidth_gbps=3000.0)
    assert figures["median_us"] == pytest.approx(100)
    assert figures["gbps"] == pytest.approx(case.bytes / 100e-6 / 1e9)
    assert figures["tflops"] == pytest.approx(2 * 128 * 56 * 56 * 128 * 4 * 9 / 100e-6 / 1e12)
    floor_s = case.bytes / 3000e9
    assert figures["fraction_of_floor"] == pytest.approx(floor_s / 100e-6)
    assert figures["fraction_of_floor"] == pytest.approx(figures["gbps"] / 3000.0)  # the same thing, two ways
    assert ops.base_op_record(case, "eager", 3000.0)["floor_us"] == pytest.approx(floor_s * 1e6)
    assert 68 < floor_s * 1e6 < 70  # DESIGN's 68 us, plus the weights and BN values


def test_speedups_within_each_case():
    (layer,) = shapes.find_layers(["resnext50_32x4d:stage4"])
    case = ops.OpCase(layer, 128, "bfloat16", "channels_last", "inference")
    other = ops.OpCase(layer, 128, "float16", "channels_last", "inference")
    records = []
    for c, provider, us in ((case, "eager", 60.0), (case, "compile", 40.0), (case, "triton", 20.0),
                            (other, "eager", 30.0), (other, "triton", 15.0)):
        records.append(dict(ops.base_op_record(c, provider, 3000.0), median_us=us))
    records.append(dict(ops.base_op_record(case, "cuda", 3000.0), status="unsupported", reason="not yet"))
    ops.add_speedups(records)
    triton = records[2]
    assert triton["speedup_vs_eager"] == pytest.approx(3.0) and triton["speedup_vs_compile"] == pytest.approx(2.0)
    assert records[4]["speedup_vs_eager"] == pytest.approx(2.0) and records[4]["speedup_vs_compile"] is None
    assert records[0]["speedup_vs_eager"] == pytest.approx(1.0)
    assert records[5]["speedup_vs_eager"] is None


def test_time_ratios():
    def rec(model, mode, provider, ms):
        case = batch.BatchCase(model, mode, 32, 224, "bfloat16", "channels_last")
        return dict(batch.base_batch_record(case, provider), median_ms=ms)

    records = [rec("resnext101_32x4d", "train", "eager", 136.0), rec("resnet101", "train", "eager", 100.0),
               rec("resnext101_32x4d", "train", "triton", 90.0), rec("resnet101", "train", "triton", 120.0),
               rec("resnext101_32x4d", "inference", "eager", 50.0), rec("resnet101", "inference", "eager", 40.0),
               rec("resnext50_32x4d", "train", "eager", 60.0)]  # no resnet50: no pair
    ratios = {(r["resnext"], r["mode"], r["provider"]): r for r in batch.time_ratios(records)}
    assert set(ratios) == {("resnext101_32x4d", "train", "eager"), ("resnext101_32x4d", "train", "triton"),
                           ("resnext101_32x4d", "train", "best"), ("resnext101_32x4d", "inference", "eager"),
                           ("resnext101_32x4d", "inference", "best")}
    assert ratios[("resnext101_32x4d", "train", "eager")]["ratio"] == pytest.approx(1.36)
    best = ratios[("resnext101_32x4d", "train", "best")]
    assert best["ratio"] == pytest.approx(0.9)
    assert (best["resnext_provider"], best["resnet_provider"]) == ("triton", "eager")
    assert best["paper_ratio"] == pytest.approx(0.95 / 0.70)
    assert ratios[("resnext101_32x4d", "inference", "eager")]["paper_ratio"] is None  # the paper timed training


def test_batch_cases_keep_pairs_together():
    cases = batch.batch_cases(batch.MODELS, ["train"], 32, 224, "bfloat16", "channels_last")
    assert [c.model for c in cases] == ["resnet50", "resnext50_32x4d", "resnet101", "resnext101_32x4d"]


# ------------------------------------------------------------------------------------------- timing

def test_quantiles_and_summary():
    assert timing.quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert timing.quantile([1.0, 2.0], 0.5) == 1.5
    assert timing.quantile([7.0], 0.2) == 7.0
    summary = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (summary.median_s, summary.p20_s, summary.p80_s, summary.reps) == (3.0, 1.8, 4.2, 5)


def test_measure_on_cpu_counts_reps():
    calls = []
    measured = timing.measure(lambda: calls.append(1), "cpu", warmup_s=0.0, rep_s=0.0, min_warmup_calls=2,
                              min_reps=4, max_reps=4)
    assert measured.reps == 4 and len(calls) == 6 and measured.median_s >= 0


def test_measure_cuda_path_with_stand_ins(monkeypatch):
    """The event-timed path's bookkeeping (the GPU itself is checked by benchmarks/gpu_check.sh): one
    spin, one cache flush and one event pair per timed run, the median of the event times."""
    clock = {"now": 0.0}
    queued = []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.at = clock["now"]
            queued.append("event")

        def elapsed_time(self, end):
            return (end.at - self.at) * 1e3

    def work():
        clock["now"] += 1e-3  # each run takes 1 ms of "device" time
        queued.append("run")

    class Flush:
        def sum(self):
            queued.append("flush")

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: queued.append("spin"))
    monkeypatch.setattr(timing, "_flush_buffer", lambda device: Flush())
    monkeypatch.setattr(timing, "_spin_cycles_per_second", lambda device: 1e9)
    measured = timing.measure(work, torch.device("cuda", 0), warmup_s=0.0, rep_s=0.0, min_warmup_calls=2,
                              min_reps=3, max_reps=3, cold_cache=True)
    assert measured.reps == 3 and measured.median_s == pytest.approx(1e-3)
    assert queued == ["run", "run"] + ["spin", "flush", "event", "run", "event"] * 3


def test_deadline():
    assert not timing.Deadline(None).expired() and timing.Deadline(None).remaining() == math.inf
    assert timing.Deadline(0).expired()
    assert not timing.Deadline(60).expired()


def test_copy_bandwidth_on_cpu():
    result = timing.copy_bandwidth("cpu", nbytes=2 ** 20)
    assert result["bytes"] == 2 ** 20 and result["gbps"] > 0
    assert result["gbps"] == pytest.approx(2 * 2 ** 20 / (result["median_us"] * 1e-6) / 1e9)


# ---------------------------------------------------------------------------------- providers, runner

def test_cpu_providers_are_the_reference_only():
    assert ops.providers_for("cpu") == ["eager"]


@pytest.mark.parametrize("op", shapes.OPS)
def test_op_runner_eager_on_a_small_layer(op):
    layer = shapes.Layer("toy", 1, False, c_in=16, h=6, w=6, c_out=16, groups=4, stride=1, repeats=1)
    for mode in shapes.MODES:
        record = ops.run_op_case(ops.OpCase(layer, 2, "float32", "nchw", mode, op), "eager", "cpu",
                                 dict(warmup_s=0.0, rep_s=0.0, min_warmup_calls=1, min_reps=2, max_reps=2), 10.0)
        assert record["status"] == "ok", record["reason"]
        assert record["median_us"] > 0 and record["reps"] == 2
        assert (record["tflops"] is None) == (op != "grouped_conv_bn_relu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the kernel backends' CPU test instruments are off on a GPU")
@pytest.mark.parametrize("op", shapes.OPS)
@pytest.mark.parametrize("mode", shapes.MODES)
def test_op_runner_providers_compute_the_same(op, mode):
    """Every provider's runner calls its op on the same inputs, parameters and buffers: the kernel
    backends (in their CPU test instruments) give eager's output, gradients and running statistics."""
    layer = shapes.Layer("toy", 4, False, c_in=16, h=5, w=3, c_out=16, groups=4, stride=1, repeats=1)
    case = ops.OpCase(layer, 2, "float32", "channels_last", mode, op)
    results = {}
    for provider in ("eager", "triton", "cuda"):
        runner = ops.OpRunner(case, provider, "cpu")
        output = runner()
        results[provider] = [t.detach() for t in (output if isinstance(output, tuple) else (output,))]
        results[provider] += [runner.running_mean, runner.running_var]
    expected = results.pop("eager")
    # The output, or the gradients of (x, weight, gamma, beta), (x, gamma, beta) or (x, residual, gamma, beta).
    outputs = 1 if mode != "train_fwd_bwd" else 3 if op == "batch_norm_relu" else 4
    assert len(expected) == outputs + 2
    for provider, got in results.items():
        for want, have in zip(expected, got, strict=True):
            torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{provider}: {m}")


def test_unavailable_providers_are_reported_not_run(monkeypatch):
    layer = shapes.Layer("toy", 1, False, c_in=8, h=4, w=4, c_out=8, groups=2, stride=1, repeats=1)
    case = ops.OpCase(layer, 2, "float32", "nchw", "train_fwd")
    monkeypatch.setattr(ops.backends, "unavailable_reason", lambda impl, device: f"{impl} is not built")
    assert ops.unsupported_reason("eager", "cpu") is None
    record = ops.run_op_case(case, "cuda", "cpu", {}, 10.0)
    assert record["status"] == "unsupported" and record["reason"] == "cuda is not built"
    assert record["median_us"] is None
    assert report.validate(_doc_with(ops=[record])) == []


def test_deadline_and_exclusion_skip_cases():
    layer = shapes.Layer("toy", 1, False, c_in=8, h=4, w=4, c_out=8, groups=2, stride=1, repeats=1)
    cases = ops.op_cases([layer], 2, ["float32"], ["nchw"], ["inference"])
    records = ops.run_ops(cases, ["eager", "triton"], "cpu", timing_options={}, bandwidth_gbps=10.0,
                          deadline=timing.Deadline(0), excluded={"triton": "failed the self-check"},
                          log=lambda *a: None)
    assert [(r["provider"], r["status"], r["reason"]) for r in records] == [
        ("eager", "skipped", "time budget spent"), ("triton", "skipped", "failed the self-check")]


# ------------------------------------------------------------------------------------------- schema

def _doc_with(ops=(), batches=(), device_type="cpu", name="x86_64", date=None, sha="0123456789abcdef"):
    doc = report.new_document(torch.device("cpu"), date=date or "2026-11-28T10:00:00+00:00",
                              commit={"sha": sha, "short": sha[:7], "dirty": False})
    doc["device"] = {"type": device_type, "name": name}
    doc["copy_bandwidth"] = {"bytes": 2 ** 30, "median_us": 700.0, "gbps": 3067.0}
    doc["ops"], doc["batches"] = list(ops), list(batches)
    doc["ratios"] = batch.time_ratios(doc["batches"])
    return doc


def _gpu_doc(date="2026-11-28T10:00:00+00:00", sha="0123456789abcdef"):
    """A synthetic GPU result made by the harness's own record builders (figures invented for the test)."""
    op_records = []
    for layer in shapes.find_layers(shapes.QUICK_LAYER_IDS):
        for mode in shapes.MODES:
            case = ops.OpCase(layer, 128, "bfloat16", "channels_last", mode)
            for provider, us in (("eager", 300.0), ("compile", 200.0), ("triton", 100.0)):
                measured = timing.Timing(us * 1e-6, us * 0.9e-6, us * 1.1e-6, 50)
                op_records.append(dict(ops.base_op_record(case, provider, 3067.0),
                                       **ops.timing_figures(case, measured, 3067.0)))
            op_records[-1]["kernels"] = ops.summarize_kernels([("_conv_kernel", 70.0), ("_bn_relu_kernel", 25.0)], 1)
            op_records.append(dict(ops.base_op_record(case, "cuda", 3067.0), status="unsupported",
                                   reason="impl='cuda' does not implement training mode yet"))
    # The BatchNorm ops: triton only 1.2x eager, which the grouped layer's targets must not count.
    for op in shapes.OPS[1:]:
        for layer in shapes.find_layers(shapes.QUICK_BATCH_NORM_LAYER_IDS):
            for mode in shapes.MODES:
                case = ops.OpCase(layer, 128, "bfloat16", "channels_last", mode, op)
                for provider, us in (("eager", 600.0), ("triton", 500.0)):
                    measured = timing.Timing(us * 1e-6, us * 0.9e-6, us * 1.1e-6, 50)
                    op_records.append(dict(ops.base_op_record(case, provider, 3067.0),
                                           **ops.timing_figures(case, measured, 3067.0)))
    ops.add_speedups(op_records)
    batch_records = []
    for case in batch.batch_cases(batch.MODELS, batch.MODES, 32, 224, "bfloat16", "channels_last"):
        for provider, ms in (("eager", 100.0), ("triton", 80.0)):
            ms *= 1.36 if case.model.startswith("resnext") else 1.0
            batch_records.append(dict(batch.base_batch_record(case, provider), median_ms=ms, p20_ms=ms, p80_ms=ms,
                                      reps=10, images_per_s=32 / (ms / 1e3), peak_memory_bytes=5 * 2 ** 30))
            if case.mode == "train":  # a step's kernels: the fused op's (triton only) and cuDNN's
                events = [("_conv_kernel", 20e3), ("_dgrad_kernel", 10e3)] if provider == "triton" else []
                events += [("void cudnn::sm90_xmma_wgrad(int)", 30e3), ("void at::native::bn_bw(float)", 9e3),
                           ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", 1e3)]
                batch_records[-1].update(batch.step_breakdown(ops.summarize_kernels(events, 1)))
    doc = _doc_with(op_records, batch_records, "cuda", "NVIDIA H100 80GB HBM3", date, sha)
    doc["settings"] = {"ops": {"n": 128, "quick": True}, "batches": {"n": 32, "image_size": 224, "dtype": "bfloat16",
                                                                      "layout": "channels_last", "quick": True}}
    return doc


def test_schema_accepts_a_complete_gpu_document():
    doc = _gpu_doc()
    assert report.validate(doc) == []
    for record in doc["ops"]:  # results written before the kernel breakdown existed
        record.pop("kernels")
    assert report.validate(doc) == []
    assert all(r["tflops"] is None for r in doc["ops"] if r["op"] != "grouped_conv_bn_relu")  # no FLOPs counted
    json.loads(json.dumps(doc))


@pytest.mark.parametrize("breakage, message", [
    (lambda d: d.pop("versions"), "versions is missing"),
    (lambda d: d.update(schema_version=99), "schema_version"),
    (lambda d: d["ops"][0].update(status="great"), "status"),
    (lambda d: d["ops"][0].update(median_us=None), "median_us is missing for status 'ok'"),
    (lambda d: d["ops"][0].update(tflops=None), "tflops is missing for status 'ok'"),  # a convolution's
    (lambda d: d["ops"][0].pop("op"), "op is missing"),
    (lambda d: d["ops"][0].update(gbps=float("nan")), "gbps is nan"),
    (lambda d: d["batches"][0].update(n=True), "n is bool"),
    (lambda d: d["batches"][0].update(status="error", reason=None), "reason is empty"),
    (lambda d: d["ratios"][0].pop("ratio"), "ratio is missing"),
    (lambda d: d["ops"][2]["kernels"][0].update(us="fast"), "kernels[0].us is str"),
    (lambda d: d["ops"][2].update(kernels="fast"), "kernels is str"),
    (lambda d: d["batches"][0]["kernels"][0].update(ours=1), "kernels[0].ours is int"),
])
def test_schema_rejects_broken_documents(breakage, message):
    doc = _gpu_doc()
    breakage(doc)
    problems = report.validate(doc)
    assert any(message in p for p in problems), problems
    with pytest.raises(ValueError):
        report.check(doc)


def test_result_name_and_merge(tmp_path):
    ops_only, batches_only = _gpu_doc(), _gpu_doc()
    ops_only["batches"], ops_only["ratios"] = [], []
    del ops_only["settings"]["batches"]
    batches_only["ops"] = []
    del batches_only["settings"]["ops"]
    assert report.result_stem(ops_only) == "2026-11-28-nvidia-h100-80gb-hbm3-0123456"
    path = tmp_path / "r.json"
    report.write_json(ops_only, path)
    batches_only["copy_bandwidth"] = dict(batches_only["copy_bandwidth"], gbps=1.0)
    merged = report.write_json(batches_only, path)
    assert merged["ops"] and merged["batches"] and set(merged["settings"]) == {"ops", "batches"}
    assert merged["copy_bandwidth"] == ops_only["copy_bandwidth"]  # the one the ops' floors used
    assert json.loads(path.read_text()) == merged
    other = _gpu_doc(sha="fedcba9876543210")
    other["ops"] = []
    assert not report.merge(other, merged)["ops"]  # another commit: nothing carried over


def test_kernel_breakdown_per_call():
    events = [("void resnext_kernels::(anonymous namespace)::dgrad_mma<__nv_bfloat16>(resnext_kernels::Params, "
               "resnext_kernels::DgradTiling)", 40.0), ("_wgrad_kernel", 30.0), ("_wgrad_kernel", 34.0),
              ("Memset (Device)", 1.0)] * 2
    assert ops.summarize_kernels(events, runs=2) == [
        {"name": "_wgrad_kernel", "calls": 2.0, "us": 64.0, "ours": True},
        {"name": "dgrad_mma<__nv_bfloat16>", "calls": 1.0, "us": 40.0, "ours": True},
        {"name": "Memset (Device)", "calls": 1.0, "us": 1.0, "ours": False},
    ]
    # Names alike but not the project's: PyTorch's own kernels, a Triton kernel Inductor generated.
    assert not any(map(ops.project_kernel, ["void at::native::vectorized_elementwise_kernel<4>(int)",
                                            "triton_poi_fused_relu_0", "conv_kernel"]))
    assert ops.kernel_breakdown(lambda: None, "cpu") is None


def test_markdown_has_every_figure():
    text = report.render_markdown(_gpu_doc())
    assert "### Per kernel" in text and "| 100.0 | 95.0 | _conv_kernel 70.0; _bn_relu_kernel 25.0 |" in text
    assert "NVIDIA H100 80GB HBM3" in text and "No GPU" not in text
    assert "| resnext101_32x4d / resnet101 | train | eager cuDNN | 136.0 | 100.0 | 1.36 | 1.36 |" in text
    assert "% floor" in text and "vs compile" in text and "3.00×" in text
    assert "impl='cuda' does not implement training mode yet" in text
    assert "5.00" in text  # peak GiB
    # bn3 + add + relu on stage 1's block: 256x56x56 bf16 at N=128 = 205.5 MB per activation; inference
    # moves 3 of them (and 4 KB of per-channel values), 616.6 MB: 201.0 us at 3067 GB/s, 500 us measured.
    assert ("| resnext50_32x4d:stage1 | bn3+add+relu | 256x56x56 + residual | bfloat16 | channels_last | inference "
            "forward | triton | 500.0 | 201.0 | 40% | 1,233 | – | 1.20× | – |") in text
    assert "#### Where a training step's GPU time goes" in text
    # resnext50 on triton: 108.8 ms a step, 70 ms of kernels, 30 of them the fused op's.
    assert ("| resnext50_32x4d | triton | 108.8 | 70.0 | 30.0 | 28% | cudnn::sm90_xmma_wgrad 30.0; at::native::bn_bw 9.0; "
            "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc… 1.0 |") in text
    assert "fused ops could reach by taking no time at all; the target is <= 1.05): triton: 0.79." in text
    doc = _gpu_doc()
    resnet = next(r for r in doc["batches"] if (r["model"], r["mode"], r["provider"]) == ("resnet50", "train", "eager"))
    resnet.update(kernel_ms=None, fused_ms=None, kernels=None)  # not profiled: still the baseline
    assert report.validate(doc) == [] and "target is <= 1.05): triton: 0.79." in report.render_markdown(doc)


def test_targets_count_the_layers_that_meet_each():
    doc = _gpu_doc()
    rows = {(r[0], r[1]): r[2:] for r in report.target_rows(doc)}
    # The invented figures: triton 3x eager and 2x torch.compile on the three quick layers of seven;
    # far from the floor.
    assert rows[("train fwd+bwd >= 2x eager cuDNN", "triton")] == ["3/7 (4 not measured)",
                                                                  "resnext50_32x4d:stage1: 3.00×"]
    assert rows[("train fwd+bwd >= 1.5x torch.compile", "triton")][0] == "3/7 (4 not measured)"
    assert rows[("inference >= 85% of the copy floor", "triton")][0] == "0/7 (4 not measured)"
    assert rows[("ResNeXt-50 train step <= 1.05x ResNet-50 eager", "triton")] == ["0/1", "1.09×"]
    # cuda was unsupported everywhere and has no step: a miss, not a row left out.
    assert rows[("train fwd+bwd faster than triton", "cuda")] == ["0/7 (7 not measured)", "–"]
    assert rows[("ResNeXt-50 train step <= 1.05x ResNet-50 eager", "cuda")] == ["0/1 (1 not measured)", "–"]
    slow = next(r for r in doc["ops"] if r["provider"] == "triton" and r["mode"] == "train_fwd_bwd")
    slow["speedup_vs_eager"] = 1.5
    rows = {(r[0], r[1]): r[2:] for r in report.target_rows(doc)}
    assert rows[("train fwd+bwd >= 2x eager cuDNN", "triton")] == ["2/7 (4 not measured)", f"{slow['layer']}: 1.50×"]
    doc["ops"].append(dict(slow, provider="cuda", median_us=slow["median_us"] / 2))
    rows = {(r[0], r[1]): r[2:] for r in report.target_rows(doc)}
    assert rows[("train fwd+bwd faster than triton", "cuda")] == ["1/7 (6 not measured)", f"{slow['layer']}: 2.00×"]
    # A layer whose measurement failed counts as not measured.
    slow["status"], slow["reason"] = "error", "RuntimeError: invented"
    rows = {(r[0], r[1]): r[2:] for r in report.target_rows(doc)}
    assert rows[("train fwd+bwd >= 2x eager cuDNN", "triton")][0] == "2/7 (5 not measured)"
    text = report.render_markdown(doc)
    assert "### Against the issues' targets" in text
    assert "Not an acceptance run: 3 of ResNeXt-50's 7 layers were run; the training steps used N=32" in text
    assert "self-check FAILED" not in text
    doc["selfcheck"] = {"dtype": "bfloat16", "passed": False, "failed_impls": ["cuda"]}
    assert "**The self-check FAILED (cuda): these figures do not count.**" in report.render_markdown(doc)
    # Every layer at N=128, in both modes, and the steps at N=128: the issues' setting.
    doc["ops"] = [dict(r, layer=layer.id) for r in doc["ops"] if r["op"] == "grouped_conv_bn_relu"
                  for layer in shapes.model_layers("resnext50_32x4d")]
    doc["settings"]["batches"]["n"] = 128
    assert report.acceptance_caveats(doc) == []
    assert "The issues' setting: N=128" in report.render_markdown(doc)
    doc["ops"] = [r for r in doc["ops"] if r["mode"] != "inference"]
    assert report.acceptance_caveats(doc) == [f"no {shapes.MODE_LABELS['inference']} runs"]
    doc["ops"], doc["batches"] = [], []
    assert report.acceptance_caveats(doc) == ["no per-op runs of the grouped layer", "no training steps"]
    # A CPU run has no targets.
    doc["device"] = {"type": "cpu", "name": "cpu"}
    assert report.target_rows(doc) == []


def test_chart(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    path, why_not = report.save_chart(_gpu_doc(), tmp_path / "chart.png")
    assert why_not is None and path.read_bytes()[:4] == b"\x89PNG"


def test_chart_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    path, why_not = report.save_chart(_gpu_doc(), tmp_path / "chart.png")
    assert path is None and "matplotlib is not installed" in why_not and not (tmp_path / "chart.png").exists()


# ------------------------------------------------------------------------------------- the CLI on CPU

@pytest.fixture
def no_gpu(monkeypatch, tmp_path):
    if torch.cuda.is_available():
        # The CPU runs of the harness, every CI run's: on a GPU machine (the GPU check), time and cores
        # go to the GPU's own runs.
        pytest.skip("the harness's CPU path: run where there is no GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # Whatever happens, nothing may land in the checkout's benchmarks/results/.
    monkeypatch.setattr(environment, "repository_results_dir", lambda: tmp_path / "must-not-be-written")
    yield
    assert not (tmp_path / "must-not-be-written").exists()


def test_cli_without_gpu_times_the_cpu_reference(no_gpu, tmp_path, capsys):
    out = tmp_path / "out"
    code = bench_main.main(["--no-check", "--quick", "--models", "resnet50,resnext50_32x4d", "--image-size", "32",
                            "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert bench_main.NO_GPU_MESSAGE in printed
    assert "| resnet50 | eager (CPU) |" in printed and "| resnext50_32x4d | eager (CPU) |" in printed
    assert "cuDNN" not in printed.split(bench_main.NO_GPU_MESSAGE)[1].split("Per batch")[1]
    (json_path,) = out.glob("*.json")
    doc = json.loads(json_path.read_text())
    assert report.validate(doc) == []
    assert doc["device"]["type"] == "cpu" and doc["ops"] == [] and doc["selfcheck"] is None
    assert {(r["model"], r["mode"], r["provider"], r["status"]) for r in doc["batches"]} == {
        (m, mode, "eager", "ok") for m in ("resnet50", "resnext50_32x4d") for mode in ("train", "inference")}
    assert all(r["peak_memory_bytes"] is None for r in doc["batches"])
    assert doc["settings"]["batches"]["n"] == 2 and doc["settings"]["batches"]["image_size"] == 32
    assert json_path.with_suffix(".md").read_text().startswith("**")
    assert json_path.name == report.result_stem(doc) + ".json"


def test_cli_ops_without_gpu(no_gpu, tmp_path, capsys):
    json_path = tmp_path / "ops.json"
    code = bench_main.main(["--ops", "--no-check", "--layers", "resnext50_32x4d:stage4", "--modes", "inference",
                            "--json", str(json_path)])
    printed = capsys.readouterr().out
    assert code == 0 and bench_main.NO_GPU_MESSAGE in printed
    doc = json.loads(json_path.read_text())
    assert report.validate(doc) == []
    # The grouped layers first; the BatchNorm ops once per shape (both blocks' bn3 are 2048x7x7).
    assert [(r["layer"], r["op"], r["provider"], r["status"]) for r in doc["ops"]] == [
        ("resnext50_32x4d:stage4-first", "grouped_conv_bn_relu", "eager", "ok"),
        ("resnext50_32x4d:stage4", "grouped_conv_bn_relu", "eager", "ok"),
        ("resnext50_32x4d:stage4-first", "batch_norm_relu", "eager", "ok"),
        ("resnext50_32x4d:stage4", "batch_norm_relu", "eager", "ok"),
        ("resnext50_32x4d:stage4-first", "batch_norm_add_relu", "eager", "ok")]
    assert doc["ops"][2]["shape"] == {"channels": 1024, "h": 14, "w": 14, "residual": False}
    assert doc["ops"][4]["shape"] == {"channels": 2048, "h": 7, "w": 7, "residual": True}
    assert all(r["dtype"] == "float32" and r["n"] == 2 for r in doc["ops"])
    assert all(0 < r["fraction_of_floor"] for r in doc["ops"])


def test_cli_failed_self_check_fails_the_run(no_gpu, tmp_path, monkeypatch, capsys):
    def failing_check(device, dtype):
        yield "torch", "toy", "eval", 0.5, False

    monkeypatch.setattr(bench_main, "self_check", failing_check)
    assert bench_main.main(["--check-only"]) == 1
    code = bench_main.main(["--ops", "--layers", "resnext50_32x4d:stage4-first", "--modes", "inference",
                            "--json", str(tmp_path / "r.json")])
    assert code == 1 and "self-check FAILED" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["selfcheck"] == {
        "dtype": "float32", "passed": False, "failed_impls": ["torch"]}


def test_cli_ops_then_batches_merge_into_one_result(no_gpu, tmp_path, monkeypatch):
    """As the GPU check runs them: two invocations, one folder, one JSON (and markdown) with both."""
    # The real self-check runs every backend through its CPU test instrument: slow, and tested elsewhere.
    monkeypatch.setattr(bench_main, "self_check", lambda device, dtype: iter([("torch", "toy", "eval", 0.0, True)]))
    out = str(tmp_path / "results")
    assert bench_main.main(["--ops", "--layers", "resnext50_32x4d:stage4-first", "--modes", "inference",
                            "--out", out]) == 0
    assert bench_main.main(["--no-check", "--models", "resnet50", "--modes", "inference", "--image-size", "32",
                            "--out", out]) == 0
    (json_path,) = (tmp_path / "results").glob("*.json")
    doc = json.loads(json_path.read_text())
    assert report.validate(doc) == [] and len(doc["ops"]) == 3 and len(doc["batches"]) == 1
    assert set(doc["settings"]) == {"ops", "batches"} and doc["selfcheck"]["passed"] is True
    markdown = json_path.with_suffix(".md").read_text()
    assert "Per op" in markdown and "Per batch" in markdown


def test_cli_json_to_stdout_is_pure_json(no_gpu, capsys):
    code = bench_main.main(["--ops", "--no-check", "--layers", "resnext50_32x4d:stage4-first", "--modes", "inference",
                            "--json", "-"])
    captured = capsys.readouterr()
    assert code == 0 and bench_main.NO_GPU_MESSAGE in captured.err
    assert report.validate(json.loads(captured.out)) == []


def test_cli_runs_the_baselines_with_cudnns_algorithm_search(no_gpu, tmp_path, monkeypatch):
    real_case, during = batch.run_batch_case, []

    def spy(*args, **kwargs):
        during.append(torch.backends.cudnn.benchmark)
        return real_case(*args, **kwargs)

    monkeypatch.setattr(batch, "run_batch_case", spy)
    before = torch.backends.cudnn.benchmark
    code = bench_main.main(["--no-check", "--models", "resnet50", "--modes", "train", "--image-size", "32",
                            "--json", str(tmp_path / "r.json")])
    doc = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and during == [True] and doc["settings"]["batches"]["cudnn_benchmark"] is True
    assert torch.backends.cudnn.benchmark == before  # the process's setting, restored


# What stops a run: the step's timeout (SIGTERM), or a kernel fault that leaves the CUDA context unusable,
# so that even freeing memory raises.
@pytest.mark.parametrize("stop", [bench_main.Interrupted("SIGTERM"),
                                  RuntimeError("CUDA error: an illegal memory access was encountered")])
def test_cli_stopped_run_keeps_what_finished(no_gpu, tmp_path, monkeypatch, stop):
    real_case = batch.run_batch_case
    calls = []

    def stopped(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise stop
        return real_case(*args, **kwargs)

    monkeypatch.setattr(batch, "run_batch_case", stopped)
    code = bench_main.main(["--no-check", "--models", "resnet50", "--modes", "inference,train", "--image-size", "32",
                            "--json", str(tmp_path / "r.json")])
    doc = json.loads((tmp_path / "r.json").read_text())
    assert code == 1 and doc["interrupted"] is True and report.validate(doc) == []
    assert [(r["model"], r["status"]) for r in doc["batches"]] == [("resnet50", "ok")]


def test_commit_without_git_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(environment, "REPOSITORY", tmp_path)  # not a git checkout
    sha = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("RESNEXT_KERNELS_COMMIT", sha)
    assert environment.commit() == {"sha": sha, "short": "0123456", "dirty": False}
    monkeypatch.setenv("RESNEXT_KERNELS_COMMIT", sha + "-dirty")
    assert environment.commit() == {"sha": sha, "short": "0123456", "dirty": True}
    monkeypatch.setenv("RESNEXT_KERNELS_COMMIT", "v1.0-3-gabcdef0")  # not a sha: kept, state unknown
    assert environment.commit() == {"sha": "v1.0-3-gabcdef0", "short": "v1.0-3-", "dirty": None}
    monkeypatch.delenv("RESNEXT_KERNELS_COMMIT")
    assert environment.commit() == {"sha": None, "short": None, "dirty": None}


def test_cli_rejects_unknown_names():
    with pytest.raises(SystemExit):
        bench_main.main(["--no-check", "--models", "resnet9000"])


# ------------------------------------------------------------------------------------ README generator

def _update_readme_module():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "benchmarks" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_update_readme(tmp_path):
    update_readme = _update_readme_module()
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Results\n\n{update_readme.BEGIN}\nold\n{update_readme.END}\n\n## After\n")
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    cpu_run = _doc_with(date="2026-12-01T00:00:00+00:00")  # newer, but not a GPU result
    (results / "cpu.json").write_text(json.dumps(cpu_run))

    assert update_readme.main(["--readme", str(readme), "--results", str(results)]) == 0
    text = readme.read_text()
    assert update_readme.PLACEHOLDER in text and "old" not in text and text.endswith("## After\n")

    older, newer = _gpu_doc("2026-11-01T00:00:00+00:00"), _gpu_doc("2026-11-28T00:00:00+00:00")
    older["batches"][0]["median_ms"] = 12345.0
    for doc in (older, newer):
        (results / f"{report.result_stem(doc)}.json").write_text(json.dumps(doc))
    assert update_readme.main(["--readme", str(readme), "--results", str(results)]) == 0
    text = readme.read_text()
    assert update_readme.PLACEHOLDER not in text
    assert f"[`{report.result_stem(newer)}.json`](benchmarks/results/{report.result_stem(newer)}.json)" in text
    assert "12,345.0" not in text and "| resnet50 | eager cuDNN |" in text
    assert text.count(update_readme.BEGIN) == 1 and text.endswith("## After\n")
    if importlib.util.find_spec("matplotlib"):
        assert "![benchmark chart](benchmarks/results/chart.png)" in text and (results / "chart.png").exists()
    # Idempotent: a second run changes nothing.
    update_readme.main(["--readme", str(readme), "--results", str(results)])
    assert readme.read_text() == text


def test_real_readme_has_the_markers():
    update_readme = _update_readme_module()
    text = (ROOT / "README.md").read_text()
    assert text.count(update_readme.BEGIN) == 1 and text.count(update_readme.END) == 1
