"""What is particular to the CUDA backend: its compiled code, its host test build, its registration.

The numerical checks of impl="cuda" live with every backend's in test_functional.py and
test_modules.py; on a CPU machine they run the kernels through the host test build."""

import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

import resnext_kernels
from conftest import DEVICE, KERNEL_IMPLS
from helpers import (Case, Shape, assert_close_to_reference, forward_backward, large_mean_case, make_case, max_error,
                     mean_over_std, reference64)

CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"
EMULATION_PY = str(pathlib.Path(resnext_kernels.__file__).parent / "cuda" / "emulation.py")
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.isfile("/usr/local/cuda/bin/nvcc") else None)
needs_cuda_backend = pytest.mark.skipif("cuda" not in KERNEL_IMPLS, reason="impl='cuda' cannot run here")
needs_host_build = pytest.mark.skipif(DEVICE.type != "cpu" or "cuda" not in KERNEL_IMPLS,
                                      reason="needs the host test build")


NAMESPACE = "resnext_kernels" if DEVICE.type == "cuda" else "resnext_kernels_emulated"


def ops():
    return getattr(torch.ops, NAMESPACE)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="a GPU runs the nvcc build")
def test_host_test_build_compiles():
    # Otherwise a host test build that stops compiling would only show as skipped CUDA tests.
    from resnext_kernels.cuda import emulation

    assert emulation.enabled() and emulation.load() is None, emulation.load()


@pytest.mark.skipif(NVCC is None, reason="no nvcc")
@pytest.mark.skipif(DEVICE.type == "cuda", reason="CI compiles it; the GPU check's minutes go to what needs a GPU")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", sorted(p.name for p in (CSRC / "cuda").glob("*.cu")))
def test_kernels_use_no_local_memory_and_never_spill(source, arch):
    result = subprocess.run(
        [NVCC, "-std=c++17", "-O3", f"-arch={arch}", f"-I{CSRC}", "--expt-relaxed-constexpr", "-Xptxas", "-v",
         "-c", str(CSRC / "cuda" / source), "-o", os.devnull],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = result.stderr
    kernels = re.findall(r"Compiling entry function '(\w+)'", report)
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert kernels and len(frames) == len(kernels), report
    for kernel, counts in zip(kernels, frames):
        assert counts == ("0", "0", "0"), f"{kernel}: {counts[0]} B stack frame, {counts[1]}/{counts[2]} B spills"


@needs_cuda_backend
def test_sanitizer_case_runs():
    # benchmarks/sanitizer_case.py only runs under compute-sanitizer on a GPU: keep it working here.
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "sanitizer_case.py"
    spec = importlib.util.spec_from_file_location("sanitizer_case", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(device=DEVICE.type, large=DEVICE.type == "cuda")


@needs_cuda_backend
def test_opcheck_inference_op():
    case = make_case(Shape(2, 16, 16, 5, 4, groups=4, stride=2))
    scale, shift = torch.rand(16, device=DEVICE) + 0.5, torch.randn(16, device=DEVICE)
    for x in (case.x, case.x.contiguous(memory_format=torch.channels_last)):
        torch.library.opcheck(ops().conv_bn_relu_folded.default, (x, case.weight, scale, shift, 2, 1, 4))


@needs_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_training_ops(dtype):
    case = make_case(Shape(2, 16, 16, 5, 4, groups=4, stride=2), dtype=dtype)
    gamma, beta = torch.rand(16, device=DEVICE) + 0.5, torch.randn(16, device=DEVICE)
    for x in (case.x, case.x.contiguous(memory_format=torch.channels_last)):
        torch.library.opcheck(ops().grouped_conv.default, (x, case.weight, 2, 1, 4))
        for bn in ((gamma, beta), (None, None), (gamma.to(dtype), beta.to(dtype))):
            x_ = x.detach().requires_grad_()
            w_ = case.weight.detach().requires_grad_()
            torch.library.opcheck(ops().conv_bn_relu_train.default, (x_, w_, *bn, 1e-5, 2, 1, 4))
        z, y, stats = ops().conv_bn_relu_train(x, case.weight, gamma, beta, 1e-5, 2, 1, 4)
        dz = torch.randn_like(z)[..., ::1]
        for mean_var in ((stats[0], stats[1]), (None, None)):
            for need in ((True, True, True), (True, False, True), (False, True, False), (True, True, False)):
                torch.library.opcheck(ops().conv_bn_relu_backward.default,
                                      (dz, x, case.weight, y, stats[2], stats[3], *mean_var, 1e-5, 2, 1, 4, *need))


@needs_cuda_backend
def test_binding_refuses_strides_and_dilations_beyond_32_bits():
    # The kernels take them as ints; the Python API clamps them first (test_functional).
    case = make_case(Shape(1, 8, 8, 5, 6, groups=4))
    scale, shift = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    for stride, dilation in ((2**31, 1), (1, 2**32 + 1)):
        with pytest.raises(RuntimeError, match=r"stride, dilation and groups must be < 2\^31"):
            ops().conv_bn_relu_folded(case.x, case.weight, scale, shift, stride, dilation, 4)


@needs_cuda_backend
def test_a_build_with_an_older_signature_says_to_rebuild():
    # A build from before an op gained an argument has every op name: the arguments must match too.
    from resnext_kernels.cuda.ops import FAKES, register_namespace

    library = torch.library.Library("resnext_kernels_older_build", "DEF")
    for name in FAKES:
        schema = str(getattr(ops(), name).default._schema).split("::", 1)[1]
        if name == "conv_bn_relu_backward":
            schema = schema.replace(", bool need_dparams", "")
        library.define(schema)
    reason = register_namespace("resnext_kernels_older_build")
    assert reason.startswith("the built extension lacks the ops conv_bn_relu_backward as this Python side calls")
    assert register_namespace(NAMESPACE) is None


@needs_cuda_backend
def test_binding_refuses_inputs_without_channels():
    case = make_case(Shape(1, 8, 8, 5, 6, groups=4))
    scale, shift = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    with pytest.raises(RuntimeError, match="x must have at least one channel"):
        ops().conv_bn_relu_folded(case.x[:, :0], case.weight[:, :0], scale, shift, 1, 1, 4)


@needs_cuda_backend
def test_binding_refuses_images_beyond_32_bit_pixel_indexing():
    # The ops themselves check what the kernels assume, for callers that bypass the Python API.
    case = make_case(Shape(1, 8, 8, 1, 1, groups=4))
    x = case.x.expand(1, 8, 46341, 46341)
    scale, shift = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"images of more than 2\^31 - 1 pixels"):
        ops().conv_bn_relu_folded(x, case.weight, scale, shift, 1, 1, 4)
    # Rows indexed with the taps' reach: side - 1 + dilation must stay a 32-bit int.
    with pytest.raises(RuntimeError, match=r"an image side plus twice the dilation must be < 2\^31"):
        ops().conv_bn_relu_folded(case.x, case.weight, scale, shift, 1, 2**30, 4)


@needs_cuda_backend
def test_opcheck_inference_op_with_autograd():
    case = make_case(Shape(2, 8, 8, 4, 5, groups=2))
    scale = (torch.rand(8, device=DEVICE) + 0.5).requires_grad_()
    shift = torch.randn(8, device=DEVICE).requires_grad_()
    args = (case.x.requires_grad_(), case.weight.requires_grad_(), scale, shift, 1, 1, 2)
    torch.library.opcheck(ops().conv_bn_relu_folded.default, args)


def _train_step(impl, case, grad, training=True):
    leaves = [t.detach().requires_grad_() for t in case.tensors()[:4]]
    mean, var = case.running_mean.clone(), case.running_var.clone()
    s = case.shape
    z = resnext_kernels.grouped_conv_bn_relu(*leaves, mean, var, stride=s.stride, dilation=s.dilation, groups=s.groups,
                                             training=training, impl=impl)
    z.backward(grad)
    return [z, mean, var] + [t.grad for t in leaves]


@needs_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_training_forward_and_backward_are_deterministic(dtype):
    # Large enough for several pixel blocks, reduction blocks and wgrad splits per channel.
    case = make_case(Shape(3, 32, 32, 19, 17, groups=8), dtype=dtype, layout="channels_last")
    grad = torch.randn(3, 32, 19, 17, device=DEVICE, dtype=dtype)
    first, second = _train_step("cuda", case, grad), _train_step("cuda", case, grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_host_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_results_do_not_depend_on_the_schedule_of_threads_or_the_tiles_per_block(dtype, training, monkeypatch):
    # The host build's default schedule runs warps in lockstep, which hides a race between warps that
    # issue the same warp-level operations: one warp overwriting shared memory another still reads,
    # or reading what another has not written yet, with no barrier between. The warp-serial schedules
    # run each warp alone up to the next __syncthreads(), blocks, warps and lanes last first (a block
    # writing outside its tile is no longer overwritten by the block owning it) or first first (a
    # later warp's write no longer lands before an earlier warp's read). Every kernel, bitwise; and
    # with as many resident blocks as a GPU reports (here 8, or a million: one tile per block, as
    # small shapes get there), persistent tensor-core blocks computing other numbers of tiles.
    # Several tiles per persistent block (stride 1), packed 4-channel groups, stride 2 on odd sizes
    # (8x8 dgrad tiles, a warp per pixel phase, some warps skipping every tap);
    # several chunks per tile (the next chunk's copies in flight); dilations beyond the tiles' span
    # (only the bands of halo rows and columns the taps read staged, dgrad's unevenly apart at stride 3).
    shapes = [Shape(2, 64, 64, 17, 15, groups=16), Shape(2, 32, 48, 11, 9, groups=8, stride=2),
              Shape(2, 128, 96, 4, 3, groups=2, stride=2), Shape(1, 16, 16, 19, 20, groups=2, dilation=13),
              Shape(1, 16, 16, 31, 5, groups=2, stride=3, dilation=14)]
    for shape in shapes:
        case = make_case(shape, dtype=dtype, layout="channels_last")
        grad = torch.randn(shape.n, shape.c_out, (shape.h - 1) // shape.stride + 1, (shape.w - 1) // shape.stride + 1,
                           device=DEVICE, dtype=dtype).contiguous(memory_format=torch.channels_last)
        runs = []
        # Only the tensor-core kernels (16-bit) run persistent blocks.
        slot_counts = ("8", "1000000") if dtype == torch.bfloat16 else ()
        for schedule, slots in (("lockstep", "0"), ("warp-serial", "0"), ("warp-serial-ascending", "0"),
                                *(("lockstep", count) for count in slot_counts)):
            monkeypatch.setenv("RESNEXT_KERNELS_EMULATE_SCHEDULE", schedule)
            monkeypatch.setenv("RESNEXT_KERNELS_EMULATE_SLOTS", slots)
            runs.append(_train_step("cuda", case, grad, training))
        for name, first, *others in zip(("z", "mean", "var", "dx", "dw", "dgamma", "dbeta"), *runs):
            assert all(torch.equal(first, other) for other in others), f"{shape}: {name}"


@needs_cuda_backend
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [Shape(2, 32, 32, 6, 5, groups=8), Shape(2, 12, 18, 5, 7, groups=6, stride=2),
                                   Shape(1, 32, 32, 7, 6, groups=2, dilation=2), Shape(2, 40, 40, 5, 5, groups=40),
                                   Shape(2, 128, 96, 4, 3, groups=2, stride=2), Shape(2, 32, 32, 17, 16, groups=8),
                                   # dgrad's 8x8 tiles at stride 2: a warp per pixel phase, skipping the
                                   # taps that reach none of its pixels
                                   Shape(2, 32, 32, 11, 9, groups=8, stride=2),
                                   # dilations beyond the tiles' span: only the bands of halo rows and
                                   # columns the taps read are staged, dgrad's unevenly apart at stride 3
                                   Shape(1, 16, 16, 19, 20, groups=2, dilation=13),
                                   Shape(1, 8, 16, 31, 5, groups=4, stride=3, dilation=14)],
                         ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("grad_layout", ["nchw", "channels_last"])
def test_low_precision_gradients_within_pytorchs_own_error(dtype, shape, training, grad_layout):
    # fp16/bf16 dgrad and wgrad run on tensor cores (packed small groups; dgrad: zero rows for taps a
    # pixel does not receive from with stride 2, or taps skipped where a warp's pixels share a phase; wgrad: several splits, tiles overhanging the image);
    # every gradient within a small multiple of PyTorch's own error. A channels-last gradient takes
    # the kernels' 16-byte dy path where channels allow.
    case64 = make_case(shape, dtype=torch.float64, layout="channels_last")
    h_out, w_out = (shape.h - 1) // shape.stride + 1, (shape.w - 1) // shape.stride + 1
    grad64 = torch.randn(shape.n, shape.c_out, h_out, w_out, device=DEVICE, dtype=torch.float64)
    runs = [forward_backward(case64, run_dtype, impl, training, "channels_last", grad64, grad_layout)
            for run_dtype, impl in ((torch.float64, "torch"), (dtype, "torch"), (dtype, "cuda"))]
    expected, baseline, ours = ([z] + grads for z, _, _, *grads in runs)  # running statistics left out
    for name, a, b, e in zip(("z", "dx", "dw", "dgamma", "dbeta"), ours, baseline, expected):
        # dgamma, dbeta are fp32 but computed from low-precision tensors: same criterion.
        assert_close_to_reference(a, e, dtype, baseline=b, what=name)


@needs_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
# Dilation 9 on 19x20: dgrad's banded halo (and its exact per-group sums) holds the NaN.
@pytest.mark.parametrize("shape", [Shape(2, 16, 16, 5, 5, groups=8), Shape(1, 16, 16, 19, 20, groups=8, dilation=9)],
                         ids=str)
def test_non_finite_gradient_stays_in_its_group(dtype, shape):
    # An Inf in grad_output makes its channel's dy NaN; packed tensor-core tiles must not spread it to
    # the other groups of the tile (Inf * 0 = NaN).
    case = make_case(shape, dtype=dtype)
    grad = torch.randn(shape.n, shape.c_out, shape.h, shape.w, device=DEVICE, dtype=dtype)
    s = case.shape
    z = resnext_kernels.grouped_conv_bn_relu(*case.tensors()[:4], None, None, dilation=s.dilation, groups=s.groups,
                                             training=True, impl="torch")
    where = (z[:, 5] > 0).nonzero()[0]  # a pixel where ReLU passes the gradient
    grad[where[0], 5, where[1], where[2]] = float("inf")
    ours, ref = _train_step("cuda", case, grad), _train_step("torch", case.on_cpu(), grad.cpu())
    for name, a, b in zip(("dx", "dw"), ours[3:5], ref[3:5]):
        assert torch.equal(a.isnan().cpu(), b.isnan()), name
        assert a.isnan().any() and not a.isnan().all(), name


@needs_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_statistics_merge_over_many_blocks(dtype):
    # More than 256 pixel blocks: the merge of the per-block statistics runs in two stages (blocks
    # of row blocks x 8-channel tiles: 12 channels make a whole and a partial tile). In fp32, |mean| /
    # std of y about a thousand checks that the blocks' statistics and their merge keep the variance's
    # digits (bf16 cannot hold such a y's spread at all).
    shape = Shape(12, 12, 12, 40, 37, groups=2)
    case = large_mean_case(shape) if dtype == torch.float32 else make_case(shape, dtype=dtype)
    expected, _, _ = reference64(case, True, momentum=1.0)
    z, mean, var = resnext_kernels.cuda.batch_stats_forward(case.x, case.weight, case.bn_weight, case.bn_bias, 1e-5,
                                                            1, 1, 2)
    y = torch.nn.functional.conv2d(case.x.double(), case.weight.double(), None, 1, 1, 1, 2)
    if dtype == torch.float32:
        assert mean_over_std(y) > 300
        torch.testing.assert_close(mean.double(), y.mean((0, 2, 3)), rtol=1e-6, atol=0)
        torch.testing.assert_close(var.double(), y.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=0)
        # z inherits fp32's rounding of y ~ 6000: within a small multiple of PyTorch's own error.
        baseline = resnext_kernels.grouped_conv_bn_relu(case.x, case.weight, case.bn_weight, case.bn_bias, None, None,
                                                        groups=2, training=True, impl="torch")
        error, base_error = max_error(z, expected), max_error(baseline, expected)
        assert error <= 3 * base_error + 1e-6 * expected.abs().max(), f"{error:.3g} vs PyTorch's {base_error:.3g}"
    else:  # y is rounded to bf16 before its statistics, as in PyTorch's own bf16 computation
        yb = y.to(dtype).double()
        torch.testing.assert_close(mean.double(), yb.mean((0, 2, 3)), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(var.double(), yb.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)


@needs_cuda_backend
def test_backward_with_bn_parameters_in_fp32_and_x_in_bf16():
    case = make_case(Shape(2, 16, 16, 6, 5, groups=4), dtype=torch.bfloat16, bn_dtype=torch.float32)
    grad = torch.randn(2, 16, 6, 5, device=DEVICE, dtype=torch.bfloat16)
    z, mean, var, dx, dw, dgamma, dbeta = _train_step("cuda", case, grad)
    assert (dx.dtype, dw.dtype, dgamma.dtype, dbeta.dtype) == (torch.bfloat16,) * 2 + (torch.float32,) * 2
    case64 = Case(*(t.double() for t in case.tensors()), case.shape)
    expected, baseline = _train_step("torch", case64, grad.double()), _train_step("torch", case, grad)
    for name, a, b, e in zip(("z", "mean", "var", "dx", "dw", "dgamma", "dbeta"), (z, mean, var, dx, dw, dgamma, dbeta),
                             baseline, expected):
        assert_close_to_reference(a, e, torch.bfloat16, baseline=b, what=name)


@needs_cuda_backend
def test_dgrad_and_wgrad_cover_every_element():
    # Tiles overhanging the image on every side, stride 2 with odd sizes, groups of 1 input channel.
    for shape in (Shape(2, 24, 48, 11, 9, groups=24, stride=2), Shape(1, 12, 12, 3, 14, groups=3, dilation=3)):
        case = make_case(shape)
        grad = torch.randn(shape.n, shape.c_out, (shape.h - 1) // shape.stride + 1, (shape.w - 1) // shape.stride + 1,
                           device=DEVICE)
        ours, ref = _train_step("cuda", case, grad), _train_step("torch", case, grad)
        for a, b in zip(ours, ref):
            assert not a.isnan().any()
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_cuda_backend
def test_compiles_without_graph_breaks_in_training():
    block = resnext_kernels.ResNeXtBlock(64, 16, groups=8, impl="cuda").to(DEVICE).train()
    reference = resnext_kernels.ResNeXtBlock(64, 16, groups=8, impl="torch").to(DEVICE).train()
    reference.load_state_dict(block.state_dict())
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 64, 5, 5, device=DEVICE)
    out, expected = compiled(x), reference(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), q in zip(block.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-3, msg=name)
    torch.testing.assert_close(block.bn2.running_var, reference.bn2.running_var)


@needs_cuda_backend
def test_sgd_steps_of_a_small_resnext_match_the_reference():
    def model(impl):
        torch.manual_seed(1)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 64, 3, padding=1, bias=False), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
            resnext_kernels.ResNeXtBlock(64, 16, groups=8, base_width=8, impl=impl),
            resnext_kernels.ResNeXtBlock(64, 16, stride=2, groups=8, base_width=8, impl=impl,
                                         downsample=torch.nn.Sequential(torch.nn.Conv2d(64, 64, 1, 2, bias=False),
                                                                        torch.nn.BatchNorm2d(64))),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10),
        ).to(DEVICE)

    ours, theirs = model("cuda"), model("torch")
    inputs = torch.randn(4, 8, 3, 12, 12, device=DEVICE)
    labels = torch.randint(0, 10, (4, 8), device=DEVICE)
    losses = []
    for m in (ours, theirs):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        run = []
        for x, y in zip(inputs, labels):
            loss = torch.nn.functional.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-4)
    for (key, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=key)


@needs_cuda_backend
def test_compiles_without_graph_breaks():
    block = resnext_kernels.ResNeXtBlock(64, 16, groups=8, impl="cuda").to(DEVICE).eval()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 64, 5, 5, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x))


@needs_cuda_backend
def test_output_is_written_everywhere():
    # The host build poisons shared memory with NaN; here the output is checked for unwritten
    # elements too, on a shape where tiles overhang the image on every side. On a GPU the output gets
    # the memory of a freed tensor of NaN (the caching allocator hands the same block out again).
    case = make_case(Shape(3, 96, 96, 11, 9, groups=24))
    scale, shift = torch.ones(96, device=DEVICE), torch.full((96,), 0.5, device=DEVICE)  # relu(y + 0.5): rarely 0
    torch.full((3, 96, 11, 9), float("nan"), device=DEVICE)  # freed at once
    z = ops().conv_bn_relu_folded(case.x, case.weight, scale, shift, 1, 1, 24)
    expected = torch.relu(torch.nn.functional.conv2d(case.x.double(), case.weight.double(), None, 1, 1, 1, 24) + 0.5)
    assert_close_to_reference(z, expected, torch.float32)


def _run_sanitized(body):
    """Runs ``body`` (Python, with ``ops`` the host test build compiled with AddressSanitizer and
    alignment checks) in a fresh interpreter; returns (output, exit status)."""
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan):
        pytest.skip("gcc has no AddressSanitizer runtime")
    # The probe loads emulation.py on its own: importing the package would import torch._dynamo and
    # triton, whose extension aborts under the sanitizer's runtime.
    probe = (
        "import importlib.util, torch\n"
        "from torch.utils.cpp_extension import load\n"
        f"spec = importlib.util.spec_from_file_location('emulation', {EMULATION_PY!r})\n"
        "emulation = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(emulation)\n"
        "load(**emulation.build_arguments(sanitize=True))\n"
        "ops = torch.ops.resnext_kernels_emulated\n"
    ) + body
    env = dict(os.environ, LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0")
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=900)
    return result.stdout + result.stderr, result.returncode


@needs_host_build
def test_warp_operations_need_every_lane_at_the_same_operation():
    # Undefined on a GPU (a hang, or values from another operation): the host build must refuse them,
    # or a kernel doing so would pass here and fail there.
    with pytest.raises(RuntimeError, match="lane 1 of the warp has returned; a warp-wide operation needs every lane"):
        ops().misuse_warp_operation(0)
    either_order = "(__shfl_sync and __any_sync|__any_sync and __shfl_sync)"
    with pytest.raises(RuntimeError, match="different warp-wide operations: " + either_order):
        ops().misuse_warp_operation(1)


@needs_host_build
def test_address_sanitizer_catches_an_out_of_bounds_read_in_a_kernel():
    output, status = _run_sanitized(
        "x, w = torch.randn(1, 8, 5, 5), torch.randn(8, 2, 3, 3)\n"
        "ops.conv_bn_relu_folded(x, w, torch.ones(8), torch.zeros(8), 1, 1, 4)\n"
        "print('in-bounds launch passed', flush=True)\n"
        "ops.read_past_the_end(x, w, 4)\n"
        "print('out-of-bounds read went unnoticed', flush=True)\n"
    )
    assert "in-bounds launch passed" in output, output[-3000:]
    assert "out-of-bounds read went unnoticed" not in output
    assert "ERROR: AddressSanitizer" in output and "conv_bn_relu_folded" in output, output[-3000:]
    assert status != 0


@needs_host_build
def test_every_kernel_stays_in_bounds_and_aligned_under_the_sanitizers():
    # On a GPU a misaligned 16-byte access is a launch error; on a CPU it works. Under the alignment
    # sanitizer it aborts: every kernel, on 16-bit channels-last tensors (the vector paths) whose data
    # starts 16-byte aligned or one element off (the kernels must fall back to narrower accesses).
    output, status = _run_sanitized(
        "def shifted(t, offset):\n"
        "    buffer = torch.empty(t.numel() + offset, dtype=t.dtype)[offset:]\n"
        "    return buffer.as_strided(t.shape, t.stride()).copy_(t)\n"
        "for dtype in (torch.bfloat16, torch.float32):\n"
        "    for stride in (1, 2):\n"
        "        for offset in (0, 1):\n"
        "            x = torch.randn(2, 32, 9, 7).to(dtype).contiguous(memory_format=torch.channels_last)\n"
        "            x, w = shifted(x, offset), torch.randn(32, 4, 3, 3).to(dtype)\n"
        "            gamma, beta = torch.rand(32) + 0.5, torch.randn(32)\n"
        "            z, y, stats = ops.conv_bn_relu_train(x, w, gamma, beta, 1e-5, stride, 1, 8)\n"
        "            dz = shifted(torch.randn_like(z), offset)\n"
        "            ops.conv_bn_relu_backward(dz, x, w, y, stats[2], stats[3], stats[0], stats[1], 1e-5, stride, 1, 8,\n"
        "                                      True, True, True)\n"
        "            ops.conv_bn_relu_folded(x, w, stats[2], stats[3], stride, 1, 8)\n"
        "            y = shifted(ops.grouped_conv(x, w, stride, 1, 8), offset)\n"
        "            ops.conv_bn_relu_backward(dz, x, w, y, stats[2], stats[3], None, None, 1e-5, stride, 1, 8,\n"
        "                                      True, True, False)\n"
        "            for residual in (None, shifted(torch.randn_like(x), offset)):\n"
        "                z, stats = ops.batch_norm_relu_train(x, residual, gamma, beta, 1e-5)\n"
        "                ops.batch_norm_relu_folded(x, residual, stats[2], stats[3])\n"
        "                for mean_var in ((stats[0], stats[1]), (None, None)):\n"
        "                    for output in ((None, shifted(z, offset)) if residual is not None else (None,)):\n"
        "                        ops.batch_norm_relu_backward(shifted(torch.randn_like(z), offset), x, output, stats[2],\n"
        "                                                     stats[3], *mean_var, 1e-5,\n"
        "                                                     residual is None or output is not None, True, True)\n"
        "print('every kernel ran', flush=True)\n"
    )
    assert "every kernel ran" in output and "runtime error" not in output and "Sanitizer" not in output, output[-3000:]
    assert status == 0
