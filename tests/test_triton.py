"""impl="triton" on its own terms: group packing, tile and split boundaries, strides, low-precision
gradients, non-finite values, determinism and the torch.library ops, all against float64.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
shapes stay small; they are chosen to cross the kernels' tile boundaries all the same. Every buffer
the backend allocates is poisoned with NaN, so an element a kernel forgets to write shows up.
"""

import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

import resnext_kernels  # noqa: E402
from conftest import DEVICE, KERNEL_IMPLS  # noqa: E402
from helpers import (Shape, assert_close_to_reference, large_mean_case, layout_as, make_case,  # noqa: E402
                     max_error, mean_over_std)
from resnext_kernels.triton import backward as triton_backward  # noqa: E402
from resnext_kernels.triton import config, ops  # noqa: E402
from resnext_kernels.triton import conv as triton_conv  # noqa: E402

pytestmark = pytest.mark.skipif("triton" not in KERNEL_IMPLS, reason=f"impl='triton' cannot run on {DEVICE} here")

# Channel widths of ResNeXt's grouped 3x3 layers at a small batch and spatial size.
RESNEXT_SHAPES = [
    Shape(2, 128, 128, 4, 4, groups=32),            # 32x4d: four groups of 4 packed per tile
    Shape(2, 256, 256, 3, 3, groups=64),            # 64x4d
    Shape(2, 256, 256, 3, 3, groups=32),            # 32x8d: two groups of 8 per tile
    Shape(2, 128, 128, 7, 7, groups=32, stride=2),  # a stage entry on an odd size
    Shape(1, 256, 256, 5, 5, groups=32, stride=2),  # 32x8d stage entry, N = 1
]
AWKWARD_SHAPES = [
    Shape(3, 16, 16, 1, 1, groups=4),                          # 1x1 spatial: only the centre tap
    Shape(1, 8, 8, 7, 13, groups=8),                           # depthwise, N = 1, two row tiles
    Shape(2, 12, 12, 5, 5, groups=4),                          # 3 channels per group
    Shape(2, 32, 32, 5, 5, groups=2),                          # 16 per group: one group per tile
    Shape(2, 64, 64, 3, 3, groups=2),                          # 32 per group
    Shape(2, 64, 64, 3, 3, groups=1),                          # dense, 64 channels
    Shape(1, 128, 16, 3, 4, groups=1),                         # K = 128: two K chunks per tap
    Shape(2, 6, 48, 5, 5, groups=2),                           # 3 in / 24 out: tiles straddle groups
    Shape(2, 16, 16, 9, 9, groups=4),                          # 162 pixels: a partial last row tile
    Shape(2, 16, 16, 7, 6, groups=4, dilation=2),
    Shape(2, 16, 16, 9, 7, groups=4, stride=2, dilation=2),
    Shape(2, 16, 16, 1, 4, groups=4, stride=2),                # one row at stride 2: a dgrad phase has no pixels
]
LAYOUTS = ["nchw", "channels_last", "strided"]
# Each shape runs in one input layout (cycling), and the gradient arrives in another, non-contiguous one.
MATRIX = [(shape, LAYOUTS[i % 3]) for i, shape in enumerate(RESNEXT_SHAPES + AWKWARD_SHAPES)]
GRAD_LAYOUTS = {"nchw": "strided", "channels_last": "nchw-transposed", "strided": "channels_last"}


@pytest.fixture(autouse=True)
def _poison_allocations(monkeypatch):
    """torch.empty and torch.empty_like hand out NaN-filled memory while the backend runs."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(factory):
        def allocate(*args, **kwargs):
            t = factory(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return allocate

    monkeypatch.setattr(torch, "empty", poisoned(empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(empty_like))


@pytest.fixture(autouse=True)
def _ieee_fp32():
    # fp32 is checked tightly against float64, so cuDNN's TF32 default (which the kernels follow on a
    # GPU) is turned off; test_fp32_dot_precision_follows_cudnn covers the policy itself.
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


def grad_like(z, layout):
    """A random gradient for ``z`` in a layout other than z's own."""
    g = torch.randn(z.shape, dtype=z.dtype, device=z.device)
    if layout == "nchw-transposed":  # a permuted view: contiguous along H instead of W
        return g.transpose(2, 3).contiguous().transpose(2, 3)
    return layout_as(g, layout)


def evaluate(case, impl, training, dz=None, momentum=0.3, dtype=None, device=DEVICE):
    """z, the updated running stats and, given dz, the four gradients, computed by ``impl`` in
    ``dtype`` (default: the case's) on copies of the case's tensors on ``device``."""
    s = case.shape
    x, weight, bn_weight, bn_bias = (
        t.detach().to(device, dtype or t.dtype).clone(memory_format=torch.preserve_format).requires_grad_()
        for t in case.tensors()[:4]
    )
    running_mean, running_var = (t.detach().to(device, bn_weight.dtype).clone() for t in case.tensors()[4:])
    z = resnext_kernels.grouped_conv_bn_relu(
        x, weight, bn_weight, bn_bias, running_mean, running_var, stride=s.stride, dilation=s.dilation,
        groups=s.groups, training=training, momentum=momentum, impl=impl)
    out = {"z": z, "running_mean": running_mean, "running_var": running_var}
    if dz is not None:
        grads = torch.autograd.grad(z, (x, weight, bn_weight, bn_bias), dz.to(z.device, z.dtype))
        out.update(zip(("grad x", "grad weight", "grad bn_weight", "grad bn_bias"), grads))
    return out


def kink_free_grad(case, training, layout, margin):
    """A random dz that is zero where the float64 pre-activation lies within ``margin`` of ReLU's kink,
    where the gradient jumps and any rounding of y may legitimately flip the mask."""
    s = case.shape
    x, weight, bn_weight, bn_bias, running_mean, running_var = (t.detach().double().clone() for t in case.tensors())
    y = F.conv2d(x, weight, None, s.stride, s.dilation, s.dilation, s.groups)
    pre = F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, 0.0, 1e-5)
    dz = grad_like(pre.to(case.x.dtype), layout)
    dz[pre.abs() < margin] = 0
    return dz


def assert_matches(out, expected, dtype, baseline=None):
    for name, want in expected.items():
        assert_close_to_reference(out[name], want, dtype, baseline=None if baseline is None else baseline[name],
                                  what=name)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,layout", MATRIX, ids=[f"{s}-{layout}" for s, layout in MATRIX])
def test_forward_running_stats_and_gradients_match_float64(shape, layout, training):
    case = make_case(shape, layout=layout)
    dz = kink_free_grad(case, training, GRAD_LAYOUTS[layout], margin=1e-4)
    out = evaluate(case, "triton", training, dz)
    expected = evaluate(case, "torch", training, dz, dtype=torch.float64)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out["z"].is_contiguous(memory_format=memory_format)
    for name in ("grad x", "grad weight", "grad bn_weight", "grad bn_bias"):
        assert out[name].dtype == torch.float32, name
    assert_matches(out, expected, torch.float32)


LOW_PRECISION_SHAPES = [RESNEXT_SHAPES[0], RESNEXT_SHAPES[3], AWKWARD_SHAPES[2], AWKWARD_SHAPES[5]]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", LOW_PRECISION_SHAPES, ids=str)
def test_low_precision_within_pytorchs_own_error(shape, dtype, training):
    # BN parameters in x's dtype for half of the cases, fp32 for the other half.
    bn_dtype = dtype if LOW_PRECISION_SHAPES.index(shape) % 2 else torch.float32
    case = make_case(shape, dtype=dtype, layout="channels_last", bn_dtype=bn_dtype)
    dz = kink_free_grad(case, training, "strided", margin=0.05)
    out = evaluate(case, "triton", training, dz)
    baseline = evaluate(case, "torch", training, dz)
    expected = evaluate(case, "torch", training, dz, dtype=torch.float64)
    assert out["grad x"].dtype == out["grad weight"].dtype == dtype
    assert out["grad bn_weight"].dtype == out["grad bn_bias"].dtype == bn_dtype
    assert_matches(out, expected, dtype, baseline=baseline)


@pytest.mark.parametrize("segments", [False, True], ids=["one-merge", "merge-of-segments"])
def test_variance_stays_accurate_when_the_mean_dwarfs_the_spread(segments, monkeypatch):
    # |mean| / std of y about 1000 over three row tiles: merged per-tile deviations leave only the
    # effect of rounding y.
    if segments:  # what a large batch does: tiles merged in two segments, then the segments
        monkeypatch.setattr(triton_conv, "_STATS_MIN_TILES_PER_PROGRAM", 1)
        monkeypatch.setattr(triton_conv, "_STATS_SEGMENTS", 2)
    case = large_mean_case(Shape(2, 16, 16, 9, 9, groups=4))
    x, weight = case.x, case.weight
    _, mean, var = resnext_kernels.triton.batch_stats_forward(x, weight, case.bn_weight, case.bn_bias, 1e-5, 1, 1, 4)
    y = F.conv2d(x.double(), weight.double(), None, 1, 1, 1, 4)
    want_var, want_mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
    assert mean_over_std(y) > 300
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-4, atol=0)
    # z and the gradients inherit fp32's rounding of y ~ 1000: within a small multiple of PyTorch's.
    dz = kink_free_grad(case, True, "nchw", margin=1e-3)
    out, baseline = evaluate(case, "triton", True, dz), evaluate(case, "torch", True, dz)
    for name, want in evaluate(case, "torch", True, dz, dtype=torch.float64).items():
        error, base_error = max_error(out[name], want), max_error(baseline[name], want)
        assert error <= 3 * base_error + 1e-6 * want.abs().max(), f"{name}: {error:.3g} vs PyTorch's {base_error:.3g}"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [Shape(2, 8, 8, 5, 5, groups=4), Shape(2, 32, 32, 5, 5, groups=2)],
                         ids=["packed", "one-group-per-tile"])
def test_non_finite_values_propagate_as_in_pytorch(shape, training):
    # NaN and Inf in x, and NaN in dz: packed tiles must not leak inf * 0 = nan into other groups. The
    # NaNs in dz sit where no tap reaches into the padding: whether NaN times a padding zero reaches dw
    # is implementation-defined (PyTorch's CPU convolution leaves those products out, these kernels
    # and a literal reading of zero padding do not).
    case = make_case(shape)
    case.x[0, 1, 2, 3] = float("nan")
    case.x[1, 5, 0, 0] = float("inf")
    dz = torch.randn(2, shape.c_out, 5, 5, device=DEVICE)
    dz[0, 2, 1, 1] = float("nan")
    dz[1, 6, 3, 2] = float("nan")
    out = evaluate(case, "triton", training, dz)
    # PyTorch's CPU convolution, also on a GPU: cuDNN may pick an algorithm (Winograd, FFT) that mixes
    # values across taps, spreading NaN where a direct convolution does not.
    expected = evaluate(case, "torch", training, dz, device="cpu")
    for name, want in expected.items():
        assert torch.equal(out[name].isnan().cpu(), want.isnan()), name
        assert torch.equal(out[name].isinf().cpu(), want.isinf()), name
    assert out["z"].isnan().any() and out["grad weight"].isnan().any()


def test_split_counts_only_change_rounding(monkeypatch):
    # wgrad and the backward reduction split N*H*W over programs by the device's size: one split,
    # several, and more splits than pixel tiles (empty splits) must all give the same gradients.
    case = make_case(Shape(2, 16, 16, 9, 9, groups=4))
    dz = kink_free_grad(case, True, "nchw", margin=1e-4)
    expected = evaluate(case, "torch", True, dz, dtype=torch.float64)
    monkeypatch.setattr(triton_backward, "_WGRAD_MIN_SPLIT_PIXELS", 1)
    for programs in (1, 3, 64):
        monkeypatch.setattr(config, "parallel_programs", lambda device, programs=programs: programs)
        out = evaluate(case, "triton", True, dz)
        for name, want in expected.items():
            assert_close_to_reference(out[name], want, torch.float32, what=f"{name}, {programs} programs")


def test_only_requested_gradients_are_computed():
    case = make_case(Shape(2, 16, 16, 5, 5, groups=4, stride=2))
    weight = case.weight.detach().requires_grad_()
    z = resnext_kernels.grouped_conv_bn_relu(case.x, weight, case.bn_weight, case.bn_bias, None, None,
                                             stride=2, groups=4, training=True, impl="triton")
    dz = torch.randn_like(z)
    (got,) = torch.autograd.grad(z, weight, dz)
    x64, w64 = case.x.double(), weight.detach().double().requires_grad_()
    y = F.conv2d(x64, w64, None, 2, 1, 1, 4)
    z64 = torch.relu(F.batch_norm(y, None, None, case.bn_weight.double(), case.bn_bias.double(), True))
    (want,) = torch.autograd.grad(z64, w64, dz.double())
    assert_close_to_reference(got, want, torch.float32)


def test_two_runs_are_bitwise_identical():
    case = make_case(Shape(2, 32, 32, 9, 9, groups=8, stride=2), layout="channels_last")
    dz = grad_like(evaluate(case, "triton", True)["z"], "strided")
    first, second = (evaluate(case, "triton", True, dz) for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name


AUTOTUNED = {"conv": (triton_conv, "_conv_kernel"), "dgrad": (triton_backward, "_dgrad_kernel"),
             "wgrad": (triton_backward, "_wgrad_kernel")}


def two_configs_each(monkeypatch, bench):
    """Gives each autotuned kernel two configs (the interpreter has one: nothing to tune) -- a smaller
    tile first, then the usual one -- with ``bench(name, config)`` standing in for timing them."""
    for name, (module, attr) in AUTOTUNED.items():
        kernel = getattr(module, attr)
        usual = kernel.configs[-1]
        smaller = triton.Config({k: v // 2 for k, v in usual.kwargs.items()}, num_warps=4, num_stages=1)
        monkeypatch.setattr(kernel, "configs", [smaller, usual])
        monkeypatch.setattr(kernel, "_bench", lambda *args, config, name=name, **kwargs: bench(name, config))
        monkeypatch.setattr(kernel, "cache", {})


def test_deterministic_algorithms_run_the_last_config_untimed(monkeypatch):
    # A tile size orders the partial sums (statistics, wgrad's splits), and timing may choose another
    # one in the next process: deterministic mode never times.
    case = make_case(Shape(2, 32, 32, 9, 9, groups=8, stride=2), layout="channels_last")
    for module, attr in AUTOTUNED.values():  # what the last config alone computes (a GPU may tune more)
        kernel = getattr(module, attr)
        monkeypatch.setattr(kernel, "configs", kernel.configs[-1:])
        monkeypatch.setattr(kernel, "cache", {})
    dz = grad_like(evaluate(case, "triton", True)["z"], "strided")
    last_alone = evaluate(case, "triton", True, dz)

    def bench(name, config):
        raise AssertionError(f"{name} was timed")

    two_configs_each(monkeypatch, bench)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    deterministic = evaluate(case, "triton", True, dz)
    for name in last_alone:
        assert torch.equal(deterministic[name], last_alone[name]), name


def test_autotuning_keys_on_the_size_of_the_work(monkeypatch):
    # A first call on one image must not choose the tiles of training at a larger batch; an empty batch
    # launches nothing, so it chooses none.
    timed = []

    def bench(name, config):
        timed.append(name)
        return [1.0]

    two_configs_each(monkeypatch, bench)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    for n in (1, 8, 7, 0):
        case = make_case(Shape(n, 16, 16, 5, 5, groups=4))
        evaluate(case, "triton", False, dz=torch.randn(n, 16, 5, 5))
    # Both configs timed for N = 1 and N = 8; N = 7 (175 against 200 pixels) is the same size class.
    assert timed == 2 * ["conv", "conv", "dgrad", "dgrad", "wgrad", "wgrad"]


@pytest.mark.parametrize("training", [True, False], ids=["batch-stats", "folded"])
def test_gradcheck_of_the_backend_float64(training):
    # Called directly, so that the folded path's scale and shift are float64 leaves too.
    shape = Shape(2, 6, 6, 3, 4, groups=3, stride=2, dilation=2)
    case = make_case(shape, dtype=torch.float64)
    per_channel = (case.bn_weight, case.bn_bias) if training else (
        case.bn_weight * case.running_var.rsqrt(), case.bn_bias - case.running_mean * case.bn_weight)
    inputs = [t.detach().requires_grad_() for t in (case.x, case.weight, *per_channel)]
    if training:
        def fn(x, weight, gamma, beta):
            return resnext_kernels.triton.batch_stats_forward(x, weight, gamma, beta, 1e-5, 2, 2, 3)[0]
    else:
        def fn(x, weight, scale, shift):
            return resnext_kernels.triton.folded_forward(x, weight, scale, shift, 2, 2, 3)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_custom_ops_pass_opcheck():
    shape = Shape(2, 16, 16, 5, 6, groups=4, stride=2)
    case = make_case(shape, layout="channels_last")
    x, weight = case.x.detach().requires_grad_(), case.weight.detach().requires_grad_()
    gamma, beta = case.bn_weight.detach().requires_grad_(), case.bn_bias.detach().requires_grad_()
    torch.library.opcheck(ops.conv_bn_relu_train, (x, weight, gamma, beta, 1e-5, 2, 1, 4))
    torch.library.opcheck(ops.conv_bn_relu_train, (x, weight, None, None, 1e-5, 2, 1, 4))
    torch.library.opcheck(ops.conv_scale_shift_relu, (x, weight, gamma, beta, 2, 1, 4))
    y = ops.grouped_conv(case.x, case.weight, 2, 1, 4)
    torch.library.opcheck(ops.grouped_conv, (case.x, case.weight, 2, 1, 4))
    _, _, stats = ops.conv_bn_relu_train(case.x, case.weight, case.bn_weight, case.bn_bias, 1e-5, 2, 1, 4)
    dz = grad_like(y, "strided")
    for mean, var in ((stats[0], stats[1]), (None, None)):
        for need_dparams in (True, False):
            torch.library.opcheck(ops.conv_bn_relu_backward, (dz, case.x, case.weight, y, stats[2], stats[3], mean, var,
                                                              1e-5, 2, 1, 4, True, True, need_dparams))


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_compiled_block_has_no_graph_breaks(backend):
    block = resnext_kernels.ResNeXtBlock(64, 16, groups=4, base_width=16, impl="triton").to(DEVICE)
    x = torch.randn(2, 64, 5, 5, device=DEVICE, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    for training in (True, False):
        block.train(training)
        z = compiled(x)
        (grad,) = torch.autograd.grad(z.sum(), x)
        assert z.isfinite().all() and grad.isfinite().all()


def test_the_three_epilogues_share_one_autotuning_key(monkeypatch):
    # Autotuning keys on every tensor argument's dtype: the folded forward and the plain convolution
    # that its backward recomputes y with must present the same ones, or they may run different
    # configs, sum in different orders and disagree on the ReLU mask of a y near the kink.
    tensor_dtypes = set()
    kernel = triton_conv._conv_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                tensor_dtypes.add(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
                return kernel[grid](*args, **kwargs)
            return launch

        def __getattr__(self, name):
            return getattr(kernel, name)

    monkeypatch.setattr(triton_conv, "_conv_kernel", Recorder())
    case = make_case(Shape(2, 16, 16, 5, 5, groups=4), dtype=torch.bfloat16, bn_dtype=torch.float32)
    scale, shift = case.bn_weight, case.bn_bias
    triton_conv.folded_forward(case.x, case.weight, scale, shift, 1, 1, 4)
    triton_conv.conv(case.x, case.weight, 1, 1, 4)
    triton_conv.train_forward(case.x, case.weight, scale, shift, 1e-5, 1, 1, 4)
    assert len(tensor_dtypes) == 1, tensor_dtypes


def test_launch_grids_stay_within_cuda_limits(monkeypatch):
    # A GPU refuses grid axes 1 and 2 beyond 65535 (the interpreter has no limit): dgrad's stride^2
    # phase pairs, 299^2 here, go on axis 0. Grids recorded, kernels not run.
    grids = []

    class Recorder:
        best_config = None

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                grids.append(grid({"BLOCK_M": 64, "BLOCK_P": 64}) if callable(grid) else grid)
            return launch

    for name in ("_dgrad_kernel", "_wgrad_kernel"):
        monkeypatch.setattr(triton_backward, name, Recorder())
    case = make_case(Shape(1, 4, 4, 300, 300, groups=2, stride=299))
    y = triton_conv.conv(case.x, case.weight, 299, 1, 2)
    scale, shift = torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE)
    triton_backward.backward(torch.randn_like(y), case.x, case.weight, y, scale, shift, None, None, 1e-5, 299, 1, 2,
                             True, True, True)
    assert len(grids) == 2
    for grid in grids:
        assert grid[0] < 2**31 and all(axis <= 65535 for axis in grid[1:]), grid


@triton.jit
def _cast_to_bf16_kernel(src_ptr, dst_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(dst_ptr + offsets, config.cast(tl.load(src_ptr + offsets), tl.bfloat16))


def test_bf16_rounding_keeps_nan_and_rounds_to_nearest_even():
    bits = [0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0x3F808000, 0x3F818000, 0x3F80C000, 0x7F7FFFFF]
    src = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32).to(DEVICE)
    dst = torch.empty(len(bits), dtype=torch.bfloat16, device=DEVICE)
    _cast_to_bf16_kernel[(1,)](src, dst, BLOCK=len(bits))
    want = src.to(torch.bfloat16)  # PyTorch's conversion: NaN stays NaN, ties to even, overflow to Inf
    assert torch.equal(dst.isnan(), want.isnan()) and dst.isnan()[:4].all()
    assert torch.equal(dst[4:], want[4:])


def test_eps_survives_fp32_kernel_arguments():
    # A compiled kernel takes a Python float as fp32 (the interpreter keeps it exact): eps goes as its
    # fp32 rounding plus the rest, both fp32, whose sum keeps an fp64 BatchNorm's eps to 48 bits.
    for eps in (1e-5, 1e-3, 0.1, 3.0, 1e-30, 1e30):
        high, low = config.eps_arguments(eps)
        as_fp32 = [torch.tensor(v, dtype=torch.float32).item() for v in (high, low)]
        assert as_fp32[0] == high == torch.tensor(eps, dtype=torch.float32).item()
        assert abs(as_fp32[0] + as_fp32[1] - eps) <= 2.0**-46 * eps, eps
    assert config.eps_arguments(1e300) == (float("inf"), 0.0)  # fp32 BatchNorm adds inf too


def test_fp32_dot_precision_follows_cudnn():
    assert config.dot_precision(torch.float32) == "ieee"  # turned off by the _ieee_fp32 fixture
    torch.backends.cudnn.allow_tf32 = True
    assert config.dot_precision(torch.float32) == "tf32"
    assert config.dot_precision(torch.float64) == config.dot_precision(torch.bfloat16) == "ieee"


@pytest.mark.parametrize(("conv", "cudnn", "generic", "want"), [
    ("ieee", "none", "none", "ieee"),  # the RNNs' setting stays TF32: allow_tf32 cannot be read then
    ("tf32", "ieee", "ieee", "tf32"),
    ("none", "tf32", "ieee", "tf32"),
    ("none", "none", "tf32", "tf32"),
    ("none", "none", "none", "ieee"),
])
def test_fp32_dot_precision_follows_the_convolutions_own_setting(conv, cudnn, generic, want):
    backends = torch.backends
    saved = (backends.cudnn.conv.fp32_precision, backends.cudnn.rnn.fp32_precision, backends.cudnn.fp32_precision,
             backends.fp32_precision)
    try:
        backends.cudnn.rnn.fp32_precision = "tf32"
        backends.fp32_precision, backends.cudnn.fp32_precision, backends.cudnn.conv.fp32_precision = generic, cudnn, conv
        assert config.dot_precision(torch.float32) == want
    finally:
        (backends.cudnn.conv.fp32_precision, backends.cudnn.rnn.fp32_precision, backends.cudnn.fp32_precision,
         backends.fp32_precision) = saved


# Compiles the kernels for an H100 (sm_90) without one: what the interpreter cannot check -- that the
# code lowers (tl.dot shapes, dtypes, control flow; fp32 dots as TF32 and as IEEE, which the GPU's
# tests use), that every autotuning config of the GEMM kernels compiles (the autotuner skips configs
# that run out of resources, but another compile error ends the first call), also as a launch on
# aligned channels-last tensors specialises them, and that the unpipelined config every autotune list
# ends with fits in shared memory at the largest channel tiles, so autotuning always has a config.
_SM90_SCRIPT = r"""
import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from resnext_kernels.triton import backward, batch_norm_relu, config, conv

MAX_SHARED = 232448  # bytes of shared memory one H100 block may use
PER_CHANNEL = {"scale_ptr", "shift_ptr", "mean_ptr", "coef_ptr", "part_ptr", "gamma_ptr", "beta_ptr", "stats_ptr"}
DTYPES = [("bf16", tl.bfloat16, "fp32", tl.float32, "ieee"), ("fp32", tl.float32, "fp32", tl.float32, "tf32"),
          ("fp64", tl.float64, "fp64", tl.float64, "ieee")]


# (attrs, constants) much as a launch on 16-byte aligned channels-last tensors with pixel strides, pixel
# counts and channel counts that are multiples of 16 has them: Triton marks such pointers and ints
# divisible by 16 and makes ints equal to 1 (the channel strides, a contiguous weight's last) constants.
def aligned_channels_last(kernel):
    attrs, constants = {}, {}
    for i, name in enumerate(kernel.fn.arg_names):
        if name.endswith("_ptr") or re.fullmatch(r"s[a-vx-z][nhw]|C_IN|C_OUT|M", name):
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif re.fullmatch(r"s[a-vx-z]c|sww", name):
            constants[name] = 1
    return attrs, constants


def compile_for_sm90(kernel, data, acc, constexprs, config=None, attrs=None):
    fn = getattr(kernel, "fn", kernel) if config is not None else kernel
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + (acc if name in PER_CHANNEL else data)
        else:
            signature[name] = "fp32" if name.startswith("eps") else "i32"
    options = dict(num_warps=4, num_stages=1)
    if config is not None:
        constexprs = {**constexprs, **config.kwargs}
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    assert not missing, f"{fn.__name__}: no value for {missing} (it would compile as a runtime argument)"
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options=options)
    shared = compiled.metadata.shared
    print(fn.__name__, data, {k: v for k, v in constexprs.items() if isinstance(v, (int, str))}, shared)
    assert shared <= MAX_SHARED, f"{fn.__name__} ({data}) needs {shared} bytes of shared memory"


for data, data_tl, acc, acc_tl, precision in DTYPES:
    dot = dict(ACC=acc_tl, DOT_IN=data_tl, PRECISION=precision)
    widest = dict(BLOCK_N=config.MAX_CHANNEL_TILE, BLOCK_K=config.MAX_CHANNEL_TILE, K_ALIGN=16, EVEN_K=True)
    compile_for_sm90(conv._conv_kernel, data, acc, dict(STRIDE=2, DIL=1, FOLD_BN=False, STATS=True, **widest, **dot),
                     conv._CONV_CONFIGS[-1])
    compile_for_sm90(backward._dgrad_kernel, data, acc, dict(STRIDE=2, DIL=2, TAP_STEP=1, TRAIN=True, **widest, **dot),
                     backward._DGRAD_CONFIGS[-1])
    compile_for_sm90(backward._wgrad_kernel, data, acc,
                     dict(STRIDE=1, DIL=2, TRAIN=True, BLOCK_CO=backward.WGRAD_MAX_TILE,
                          BLOCK_CI=backward.WGRAD_MAX_TILE, K_ALIGN=16, EVEN_K=True, **dot),
                     backward._WGRAD_CONFIGS[-1])
    for final in (False, True):
        compile_for_sm90(conv._stats_kernel, acc, acc, dict(FINAL=final, HAS_GAMMA=True, HAS_BETA=False,
                                                            ACC=acc_tl, BLOCK_T=32, BLOCK_C=32))
    for residual in (False, True):
        compile_for_sm90(conv._bn_relu_kernel, data, acc,
                         dict(HAS_RESIDUAL=residual, ACC=acc_tl, BLOCK_P=64, BLOCK_C=64))
    for mask, output_mask in ((False, False), (True, False), (False, True)):
        compile_for_sm90(backward._reduce_kernel, data, acc, dict(TRAIN=True, MASK=mask, OUTPUT_MASK=output_mask,
                                                                  ACC=acc_tl, BLOCK_M=128, BLOCK_C=32))
    for mask in (False, True):
        compile_for_sm90(batch_norm_relu._input_grad_kernel, data, acc, dict(TRAIN=True, MASK=mask, ACC=acc_tl,
                                                                             BLOCK_M=64, BLOCK_C=64))
    compile_for_sm90(batch_norm_relu._moments_kernel, data, acc, dict(ACC=acc_tl, BLOCK_M=64, BLOCK_C=64))
    compile_for_sm90(backward._finalize_kernel, acc, acc, dict(TRAIN=True, ACC=acc_tl, BLOCK_T=32, BLOCK_C=32))
    compile_for_sm90(backward._sum_splits_kernel, data, acc, dict(ACC=acc_tl, BLOCK=1024))
# fp32 dots in IEEE precision, as the GPU's tests (cuDNN's TF32 off) run them: another lowering.
dot = dict(ACC=tl.float32, DOT_IN=tl.float32, PRECISION="ieee")
widest = dict(BLOCK_N=config.MAX_CHANNEL_TILE, BLOCK_K=config.MAX_CHANNEL_TILE, K_ALIGN=16, EVEN_K=True)
compile_for_sm90(conv._conv_kernel, "fp32", "fp32", dict(STRIDE=2, DIL=1, FOLD_BN=False, STATS=True, **widest, **dot),
                 conv._CONV_CONFIGS[-1])
compile_for_sm90(backward._dgrad_kernel, "fp32", "fp32", dict(STRIDE=2, DIL=2, TAP_STEP=1, TRAIN=True, **widest, **dot),
                 backward._DGRAD_CONFIGS[-1])
compile_for_sm90(backward._wgrad_kernel, "fp32", "fp32",
                 dict(STRIDE=1, DIL=2, TRAIN=True, BLOCK_CO=backward.WGRAD_MAX_TILE, BLOCK_CI=backward.WGRAD_MAX_TILE,
                      K_ALIGN=16, EVEN_K=True, **dot), backward._WGRAD_CONFIGS[-1])
# The inference epilogue and the folded backward, with the first (pipelined) configs, ResNeXt's tiles and
# masked K ranges.
dot = dict(ACC=tl.float32, DOT_IN=tl.bfloat16, PRECISION="ieee", K_ALIGN=1, EVEN_K=False)
compile_for_sm90(conv._conv_kernel, "bf16", "fp32", dict(STRIDE=1, DIL=1, FOLD_BN=True, STATS=False, BLOCK_N=16,
                                                         BLOCK_K=16, **dot), conv._CONV_CONFIGS[0])
compile_for_sm90(backward._dgrad_kernel, "bf16", "fp32", dict(STRIDE=2, DIL=1, TAP_STEP=2, TRAIN=False, BLOCK_N=16,
                                                              BLOCK_K=16, **dot), backward._DGRAD_CONFIGS[0])
compile_for_sm90(backward._wgrad_kernel, "bf16", "fp32", dict(STRIDE=2, DIL=1, TRAIN=False, BLOCK_CO=16,
                                                              BLOCK_CI=16, **dot), backward._WGRAD_CONFIGS[0])
# Every config, as the benchmarks autotune them: bf16 at ResNeXt-50's stage-1 tiles (4 channels per
# group, packed), launched on aligned channels-last tensors.
dot = dict(ACC=tl.float32, DOT_IN=tl.bfloat16, PRECISION="ieee", K_ALIGN=16, EVEN_K=True)
for kernel, configs, constexprs in (
        (conv._conv_kernel, conv._CONV_CONFIGS,
         dict(STRIDE=1, DIL=1, FOLD_BN=False, STATS=True, BLOCK_N=16, BLOCK_K=16, **dot)),
        (backward._dgrad_kernel, backward._DGRAD_CONFIGS,
         dict(STRIDE=1, DIL=1, TAP_STEP=1, TRAIN=True, BLOCK_N=16, BLOCK_K=16, **dot)),
        (backward._wgrad_kernel, backward._WGRAD_CONFIGS,
         dict(STRIDE=1, DIL=1, TRAIN=True, BLOCK_CO=16, BLOCK_CI=16, **dot))):
    attrs, constants = aligned_channels_last(kernel)
    for config_ in configs:
        compile_for_sm90(kernel, "bf16", "fp32", {**constexprs, **constants}, config_, attrs)
"""


# The GPU machines' image has this Triton, older than the one torch brings to CI.
GPU_IMAGE_TRITON = "3.6.0"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU run compiles the kernels for real")
@pytest.mark.parametrize("triton_version", ["installed", GPU_IMAGE_TRITON])
def test_kernels_compile_for_sm90_within_shared_memory(triton_version, tmp_path):
    python = sys.executable
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_version != "installed":  # a side environment: this one's packages, that Triton
        subprocess.run([python, "-m", "venv", "--system-site-packages", str(tmp_path / "env")], check=True)
        python = str(tmp_path / "env" / "bin" / "python")
        install = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", f"triton=={triton_version}"],
                                 capture_output=True, text=True, timeout=600)
        if install.returncode != 0:
            pytest.skip(f"triton=={triton_version} cannot be installed here: {install.stderr[-500:]}")
        env["PYTHONPATH"] = str(pathlib.Path(__file__).resolve().parents[1])
    script = f"import triton; assert {triton_version!r} in ('installed', triton.__version__)\n" + _SM90_SCRIPT
    result = subprocess.run([python, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_tile_layout_facts_hold_for_every_tile():
    # K_ALIGN and EVEN_K are promises to the compiler that the interpreter cannot check (it ignores
    # them), and groups_spanned sizes wgrad's grid: verify all three against every tile.
    for groups in (1, 2, 3, 8, 32):
        for n_per_group in (1, 2, 3, 4, 8, 16, 24, 32, 64, 128):
            for k_per_group in (1, 3, 4, 8, 16, 64):
                for max_tile in (config.MAX_CHANNEL_TILE, triton_backward.WGRAD_MAX_TILE):
                    n_channels = groups * n_per_group
                    block_n, block_k = config.gemm_channel_tiles(n_per_group, k_per_group, groups, max_tile)
                    k_align, even_k = config.k_range_layout(n_per_group, k_per_group, n_channels, block_n, block_k)
                    spanned = config.groups_spanned(block_n, n_per_group, groups)
                    for n0 in range(0, n_channels, block_n):
                        first, last = n0 // n_per_group, (min(n0 + block_n, n_channels) - 1) // n_per_group
                        k_lo, k_hi = first * k_per_group, (last + 1) * k_per_group
                        where = (groups, n_per_group, k_per_group, block_n, block_k, n0)
                        assert k_lo % k_align == 0, where
                        if even_k:  # unmasked loads: whole chunks, and wgrad's grid covers exactly the range
                            assert (k_hi - k_lo) % block_k == 0, where
                            assert spanned * k_per_group == k_hi - k_lo, where
                        assert last - first + 1 <= spanned, where
