"""Inputs and float64 references shared by the test files."""

import dataclasses

import torch
import torch.nn.functional as F

import resnext_kernels
from conftest import DEVICE


@dataclasses.dataclass(frozen=True)
class Shape:
    n: int
    c_in: int
    c_out: int
    h: int
    w: int
    groups: int
    stride: int = 1
    dilation: int = 1

    def __str__(self):
        return (f"n{self.n}-c{self.c_in}to{self.c_out}-{self.h}x{self.w}-g{self.groups}"
                f"-s{self.stride}-d{self.dilation}")


# ResNeXt-like layers scaled down, and the awkward ones: odd and 1x1 spatial sizes, N=1,
# 1..64 channels per group, unequal in/out group widths, dense and depthwise, dilation, stride 2.
SHAPES = [
    Shape(2, 32, 32, 6, 6, groups=8),               # 4 channels per group, packed
    Shape(2, 64, 64, 7, 5, groups=4, stride=2),     # 16 per group, stage entry on odd sizes
    Shape(1, 6, 9, 13, 1, groups=3),                # 2 in / 3 out per group, W = 1
    Shape(3, 8, 8, 1, 1, groups=8),                 # depthwise, 1x1 spatial
    Shape(2, 16, 16, 5, 7, groups=1, dilation=2),   # dense, dilated
    Shape(1, 128, 128, 3, 3, groups=2, stride=2),   # 64 per group
    Shape(2, 24, 24, 4, 3, groups=8, stride=3, dilation=2),
]

LAYOUTS = ["nchw", "channels_last", "strided"]


def layout_as(t, layout):
    """``t``'s values in the given layout; "strided" is a non-contiguous view with gaps."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide.normal_()
        view = wide[..., ::2]
        view.copy_(t)
        return view
    return t.contiguous()


def with_odd_strides_on_size_one_dims(t):
    """``t`` (same storage, same values) with its size-1 dims' strides set to values no layout gives
    them: PyTorch counts a tensor contiguous whatever those strides are, so kernels must not use them."""
    return t.as_strided(t.shape, [5 if size == 1 else stride for size, stride in zip(t.shape, t.stride())])


# BatchNorm shift putting fp16 values at the ReLU's kink (values_at_the_relu_kink).
KINK_SHIFT = -(2.0**-10) + 2.0**-27


def values_at_the_relu_kink(shape, layout):
    """fp16 x = 2^-10 + k 2^-20 (k = -8 .. 8 at random, returned too) in ``layout``. With BatchNorm
    scale 1 and shift KINK_SHIFT, x * scale + shift = k 2^-20 + 2^-27 exactly in fp32: positive for
    k = 0, yet zero once stored in fp16 (below 2^-25), so torch.relu's backward passes nothing there."""
    k = torch.randint(-8, 9, shape, device=DEVICE)
    return layout_as((2.0**-10 + k * 2.0**-20).to(torch.float16), layout), k


@dataclasses.dataclass
class Case:
    x: torch.Tensor
    weight: torch.Tensor
    bn_weight: torch.Tensor
    bn_bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    shape: Shape

    def tensors(self):
        return (self.x, self.weight, self.bn_weight, self.bn_bias, self.running_mean, self.running_var)

    def on_cpu(self):
        """A copy on the CPU, for references whose NaN and Inf must fall as a direct convolution puts
        them: on a GPU, cuDNN may pick an algorithm (Winograd, FFT) that mixes values across taps."""
        x, weight, bn_weight, bn_bias, running_mean, running_var = (t.detach().cpu().clone() for t in self.tensors())
        return Case(x, weight, bn_weight, bn_bias, running_mean, running_var, self.shape)


def make_case(shape, dtype=torch.float32, layout="nchw", bn_dtype=None, device=DEVICE, mean_shift=0.0):
    """Fresh random inputs (never zeros); BN tensors in ``bn_dtype`` (default: ``dtype``)."""
    bn_dtype = dtype if bn_dtype is None else bn_dtype
    cpg = shape.c_in // shape.groups
    x = torch.randn(shape.n, shape.c_in, shape.h, shape.w, device=device) + mean_shift
    weight = torch.randn(shape.c_out, cpg, 3, 3, device=device) / (3 * cpg**0.5)
    bn_weight = torch.rand(shape.c_out, device=device) + 0.5
    bn_bias = torch.randn(shape.c_out, device=device) * 0.5
    running_mean = torch.randn(shape.c_out, device=device) * 0.2
    running_var = torch.rand(shape.c_out, device=device) + 0.5
    return Case(layout_as(x.to(dtype), layout), weight.to(dtype), bn_weight.to(bn_dtype), bn_bias.to(bn_dtype),
                running_mean.to(bn_dtype), running_var.to(bn_dtype), shape)


def large_mean_case(shape, dtype=torch.float32):
    """A case whose convolution output has |mean| / std of about a thousand on every channel, where a
    naive fp32 E[y^2] - E[y]^2 gets no digit of the variance right: x shifted by 1000 and only the
    centre tap non-zero, so that every output pixel, borders included, sees the same shift (with all
    taps, the border pixels' fewer taps spread y as widely as its mean)."""
    case = make_case(shape, dtype=dtype, mean_shift=1000.0)
    with torch.no_grad():
        centre = case.weight[:, :, 1, 1].clone().uniform_(0.5, 1.5)
        case.weight.zero_()
        case.weight[:, :, 1, 1] = centre
    return case


def mean_over_std(y):
    """The smallest |mean| / std over y's channels."""
    var, mean = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    return (mean.abs() / var.sqrt()).min().item()


def reference64(case, training, momentum=0.1, eps=1e-5, with_running=True):
    """float64 evaluation of relu(batch_norm(conv2d(x))) on copies of the case's tensors.

    Returns (z, running_mean, running_var), the running stats updated as F.batch_norm would."""
    s = case.shape
    f64 = [t.detach().double().clone() for t in case.tensors()]
    x, weight, bn_weight, bn_bias, running_mean, running_var = f64
    if not with_running:
        running_mean = running_var = None
    y = F.conv2d(x, weight, None, s.stride, s.dilation, s.dilation, s.groups)
    z = torch.relu(F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps))
    return z, running_mean, running_var


def max_error(actual, expected):
    """Largest absolute difference, NaN where either has a NaN the other lacks."""
    actual, expected = actual.double(), expected.double()
    if not torch.equal(actual.isnan(), expected.isnan()):
        return float("nan")
    finite = ~expected.isnan()
    return (actual[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0


# Bound on the max error vs float64 for the reference itself, relative to the output's scale.
REFERENCE_TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}
# A kernel in low precision may err by at most this multiple of PyTorch's own error in that
# precision, plus a floor of a few units in the last place of the output's own dtype (fp32 for the
# statistics and BatchNorm gradients of 16-bit inputs) for outputs near zero.
LOW_PRECISION_FACTOR = 3.0
FLOOR_ULPS = 4


def assert_close_to_reference(actual, expected, dtype, baseline=None, what="output"):
    """``actual`` (computed in ``dtype``) against the float64 ``expected``.

    fp32/fp64: a fixed bound relative to the output's scale. fp16/bf16 with ``baseline`` (PyTorch's
    own low-precision result): at most LOW_PRECISION_FACTOR times the baseline's error."""
    scale = max(expected.abs().max().item(), 1.0)
    error = max_error(actual, expected)
    assert error == error, f"{what}: NaN where the float64 reference has none (or the reverse)"
    if baseline is not None and dtype in (torch.float16, torch.bfloat16):
        base_error = max_error(baseline, expected)
        bound = LOW_PRECISION_FACTOR * base_error + FLOOR_ULPS * torch.finfo(actual.dtype).eps * scale
        assert error <= bound, f"{what}: error {error:.3g} > {bound:.3g} ({LOW_PRECISION_FACTOR}x PyTorch's {base_error:.3g})"
    else:
        bound = REFERENCE_TOLERANCE[dtype] * scale
        assert error <= bound, f"{what}: error {error:.3g} > {bound:.3g} vs float64"


def forward_backward(case64, dtype, impl, training, layout, grad64, grad_layout):
    """[z, running_mean, running_var, dx, dw, dgamma, dbeta] of case64's values computed in ``dtype``
    (BatchNorm tensors in fp32 for 16-bit inputs, as in mixed-precision training), x and the gradient
    in the given layouts (the weight in x's, as model.to(memory_format=...) leaves it)."""
    bn_dtype = dtype if dtype == torch.float64 else torch.float32
    x, weight = (layout_as(t.to(dtype), layout) for t in (case64.x, case64.weight))
    leaves = [t.detach().requires_grad_() for t in (x, weight, case64.bn_weight.to(bn_dtype),
                                                      case64.bn_bias.to(bn_dtype))]
    mean, var = case64.running_mean.to(bn_dtype).clone(), case64.running_var.to(bn_dtype).clone()
    s = case64.shape
    z = resnext_kernels.grouped_conv_bn_relu(*leaves, mean, var, stride=s.stride, dilation=s.dilation,
                                             groups=s.groups, training=training, impl=impl)
    z.backward(layout_as(grad64.to(dtype), grad_layout))
    return [z, mean, var] + [t.grad for t in leaves]
