"""grouped_conv_bn_relu against float64, for every backend that can run here."""

import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F

import resnext_kernels
from conftest import DEVICE, KERNEL_IMPLS
from helpers import (
    KINK_SHIFT,
    LAYOUTS,
    LOW_PRECISION_FACTOR,
    SHAPES,
    Shape,
    assert_close_to_reference,
    forward_backward,
    large_mean_case,
    layout_as,
    make_case,
    max_error,
    reference64,
    values_at_the_relu_kink,
)

IMPLS = ["torch"] + KERNEL_IMPLS
LOW_PRECISION = [torch.float16, torch.bfloat16]


def run(case, impl, training, momentum=0.1, eps=1e-5, with_running=True):
    s = case.shape
    return resnext_kernels.grouped_conv_bn_relu(
        case.x, case.weight, case.bn_weight, case.bn_bias,
        case.running_mean if with_running else None, case.running_var if with_running else None,
        stride=s.stride, dilation=s.dilation, groups=s.groups, training=training, momentum=momentum, eps=eps,
        impl=impl,
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_and_running_stats_match_float64(impl, shape, training):
    case = make_case(shape)
    expected, expected_mean, expected_var = reference64(case, training, momentum=0.3)
    z = run(case, impl, training, momentum=0.3)
    assert z.dtype == case.x.dtype and z.shape == expected.shape
    assert_close_to_reference(z, expected, torch.float32)
    assert_close_to_reference(case.running_mean, expected_mean, torch.float32, what="running_mean")
    assert_close_to_reference(case.running_var, expected_var, torch.float32, what="running_var")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layouts_and_output_memory_format(impl, layout, training):
    case = make_case(Shape(2, 16, 16, 5, 6, groups=4), layout=layout)
    case.weight = layout_as(case.weight, layout)  # model.to(memory_format=...) lays out conv weights too
    expected, _, _ = reference64(case, training)
    z = run(case, impl, training)
    assert_close_to_reference(z, expected, torch.float32)
    if layout == "channels_last":
        assert z.is_contiguous(memory_format=torch.channels_last)
    else:
        assert z.is_contiguous()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("bn_fp32", [False, True], ids=["bn-same-dtype", "bn-fp32"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_low_precision_within_pytorchs_own_error(impl, dtype, bn_fp32, training):
    shape = Shape(2, 64, 64, 6, 5, groups=16)
    case = make_case(shape, dtype=dtype, layout="channels_last", bn_dtype=torch.float32 if bn_fp32 else dtype)
    expected, expected_mean, expected_var = reference64(case, training)
    baseline_case = make_case(shape)
    for name in ("x", "weight", "bn_weight", "bn_bias", "running_mean", "running_var"):
        setattr(baseline_case, name, getattr(case, name).clone())
    baseline = run(baseline_case, "torch", training)
    z = run(case, impl, training)
    assert z.dtype == dtype
    assert_close_to_reference(z, expected, dtype, baseline=None if impl == "torch" else baseline)
    for name, want in (("running_mean", expected_mean), ("running_var", expected_var)):
        assert_close_to_reference(getattr(case, name), want, dtype, what=name,
                                  baseline=None if impl == "torch" else getattr(baseline_case, name))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_eval_normalises_the_conv_output_as_stored(impl, dtype, layout):
    # Eval normalises y rounded to x's dtype, as the reference's convolution stores it, so the ReLU's
    # kink falls where the reference's does and where backward's mask, taken from the stored y, puts
    # it. Integer inputs make y exact in any summation order (|y| <= 36 * 255 * 6 < 65504: no fp16
    # overflow), and inputs constant over each image make it one value per (image, channel) away from
    # the border.
    # The running mean is image 0's value rounded to dtype and the BN scale 1, so the reference's
    # pre-ReLU value there is exactly 0; normalising the unrounded y instead gives y - round(y).
    if impl == "torch" and DEVICE.type == "cuda":
        pytest.skip("cuDNN may convolve by an inexact algorithm (Winograd, FFT): not exact on integers")
    n, c, size, groups = 2, 16, 5, 4
    x = torch.randint(128, 256, (n, c, 1, 1), device=DEVICE).expand(n, c, size, size).to(dtype)
    x = layout_as(x.contiguous(), layout).requires_grad_()
    weight = torch.randint(-6, 7, (c, c // groups, 3, 3), device=DEVICE).to(dtype)
    y = F.conv2d(x.detach().cpu().double(), weight.cpu().double(), padding=1, groups=groups).to(DEVICE)
    interior = y[0, :, 2, 2]
    assert (interior.to(dtype).double() != interior).sum() >= 4, "too few y need rounding: the test would pass anyway"
    running_mean = interior.to(dtype).float()
    ones = torch.ones(c, device=DEVICE)
    bn_bias = torch.zeros(c, device=DEVICE).requires_grad_()
    # var + eps = 1 exactly (eps > 0: PyTorch 2.11's batch_norm refuses 0), so the BN scale is 1.
    eps = 2.0**-10
    z = resnext_kernels.grouped_conv_bn_relu(x, weight, ones, bn_bias, running_mean, ones - eps, groups=groups,
                                             training=False, eps=eps, impl=impl)
    # The reference's batch_norm of the stored y is exact here, and rounded once to dtype.
    assert torch.equal(z, torch.relu(y.to(dtype).double() - running_mean.double()[:, None, None]).to(dtype))
    assert (z[0, :, 1:-1, 1:-1] == 0).all()
    # dbeta = sum of dz over the pixels backward's mask passes: exact in fp32 for small integer dz.
    dz = torch.randint(1, 5, z.shape, device=DEVICE).to(dtype)
    z.backward(dz)
    assert torch.equal(bn_bias.grad, (dz.float() * (z > 0)).sum((0, 2, 3)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("groups", [4, 2], ids=["4-per-group", "8-per-group"])
def test_relu_passes_no_gradient_where_the_output_rounds_to_zero(impl, layout, groups):
    # As torch.relu's backward, which tests z as stored: where y * scale + shift > 0 rounds to zero
    # in fp16, z = 0 and nothing passes. Each output channel copies one input channel through the
    # centre tap, so y = x exactly, and every gradient below is exact in fp32.
    if impl == "torch" and DEVICE.type == "cuda":
        pytest.skip("cuDNN may convolve by an inexact algorithm (Winograd, FFT)")
    n, c, size = 2, 16, 5
    x, k = values_at_the_relu_kink((n, c, size, size), layout)
    x.requires_grad_()
    weight = torch.zeros(c, c // groups, 3, 3, device=DEVICE)
    weight[torch.arange(c), torch.arange(c) % (c // groups), 1, 1] = 1
    weight = weight.half().requires_grad_()
    eps = 2.0**-10  # var + eps = 1: BN scale 1, shift KINK_SHIFT
    ones = torch.ones(c, device=DEVICE)
    bn_weight = ones.clone().requires_grad_()
    bn_bias = torch.full((c,), KINK_SHIFT, device=DEVICE).requires_grad_()
    z = resnext_kernels.grouped_conv_bn_relu(x, weight, bn_weight, bn_bias, torch.zeros(c, device=DEVICE),
                                             ones - eps, groups=groups, training=False, eps=eps, impl=impl)
    assert torch.equal(z > 0, k > 0)
    assert (k == 0).sum() >= 10, "too few values round to zero: the test would pass anyway"
    dz = layout_as(torch.randint(1, 5, z.shape, device=DEVICE).half(), layout)
    z.backward(dz)
    g = dz.double() * (k > 0)
    assert torch.equal(x.grad.double(), g)
    assert torch.equal(bn_bias.grad.double(), g.sum((0, 2, 3)))
    assert torch.equal(bn_weight.grad.double(), (g * x.double()).sum((0, 2, 3)))
    if impl != "torch":  # PyTorch's own fp16 weight gradient is inexact on some CPUs (seen with AVX-512)
        dw = torch.nn.grad.conv2d_weight(x.detach().double(), weight.shape, g, padding=1, groups=groups)
        assert torch.equal(weight.grad, dw.half())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES[:5], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradients_match_float64(impl, shape, training):
    case = make_case(shape, layout="channels_last")
    case.weight = layout_as(case.weight, "channels_last")  # as in a model converted to channels_last
    leaves = [t.detach().requires_grad_() for t in case.tensors()[:4]]
    case64 = make_case(shape)
    for name, t in zip(("x", "weight", "bn_weight", "bn_bias"), leaves):
        setattr(case64, name, t.detach().double().requires_grad_())
    for name in ("running_mean", "running_var"):
        setattr(case64, name, getattr(case, name).double().clone())
    case.x, case.weight, case.bn_weight, case.bn_bias = leaves
    z = run(case, impl, training)
    # A non-contiguous gradient: a strided view of a larger tensor.
    grad = layout_as(torch.randn_like(z, memory_format=torch.contiguous_format), "strided")
    z.backward(grad)
    expected = run(case64, "torch", training)
    expected.backward(grad.double())
    names = ("x", "weight", "bn_weight", "bn_bias")
    for name, leaf, leaf64 in zip(names, leaves, (case64.x, case64.weight, case64.bn_weight, case64.bn_bias)):
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, name
        assert_close_to_reference(leaf.grad, leaf64.grad, torch.float32, what=f"grad of {name}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_strided_batch_norm_tensors_give_what_contiguous_ones_give(impl, training):
    # BatchNorm's per-channel tensors as views with gaps (every other element of a longer vector),
    # the running stats updated through the views: the contiguous tensors' results (to rounding: even
    # PyTorch's CPU batch_norm takes another path for strided parameters).
    case = make_case(Shape(2, 8, 8, 5, 5, groups=2))
    grad = torch.randn(2, 8, 5, 5, device=DEVICE)
    results = []
    for layout in ("nchw", "strided"):
        x, weight = (t.detach().clone().requires_grad_() for t in (case.x, case.weight))
        bn_weight, bn_bias = (layout_as(t.clone(), layout).requires_grad_() for t in (case.bn_weight, case.bn_bias))
        mean, var = (layout_as(t.clone(), layout) for t in (case.running_mean, case.running_var))
        z = resnext_kernels.grouped_conv_bn_relu(x, weight, bn_weight, bn_bias, mean, var, groups=2,
                                                 training=training, impl=impl)
        z.backward(grad)
        results.append(dict(z=z, running_mean=mean, running_var=var, dx=x.grad, dw=weight.grad,
                            dgamma=bn_weight.grad, dbeta=bn_bias.grad))
    assert not results[1]["running_mean"].is_contiguous()
    for name, want in results[0].items():
        torch.testing.assert_close(results[1][name], want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradients_without_bn_parameter_gradients(impl, training):
    # Frozen BN affine (FrozenBatchNorm2d's buffers, or requires_grad=False): the backward then skips
    # the BN parameters' reductions where dy does not need them (eval); dx and dw must not change.
    case = make_case(Shape(2, 16, 16, 7, 6, groups=4), dtype=torch.bfloat16, layout="channels_last",
                     bn_dtype=torch.float32)
    grads = []
    for affine_grad in (True, False):
        x, weight = (t.detach().requires_grad_() for t in (case.x, case.weight))
        gamma, beta = (t.detach().requires_grad_(affine_grad) for t in (case.bn_weight, case.bn_bias))
        z = resnext_kernels.grouped_conv_bn_relu(x, weight, gamma, beta, case.running_mean.clone(),
                                                 case.running_var.clone(), groups=4, training=training, impl=impl)
        z.backward(torch.randn(z.shape, generator=torch.Generator(device=DEVICE).manual_seed(0), device=DEVICE
                               ).to(z.dtype))
        grads.append((x.grad, weight.grad))
        assert (gamma.grad is not None) == affine_grad
    assert all(map(torch.equal, *grads))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_gradcheck_float64(impl, training, affine):
    case = make_case(Shape(2, 4, 4, 3, 3, groups=2, stride=2), dtype=torch.float64)
    inputs = [case.x, case.weight] + ([case.bn_weight, case.bn_bias] if affine else [])
    inputs = [t.detach().requires_grad_() for t in inputs]

    def fn(x, weight, *bn):
        # Fresh running stats per call: gradcheck evaluates many times.
        bn = bn if affine else (None, None)
        return resnext_kernels.grouped_conv_bn_relu(
            x, weight, *bn, case.running_mean.clone(), case.running_var.clone(),
            stride=2, groups=2, training=training, impl=impl)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_double_backward_is_refused(impl, training):
    case = make_case(Shape(2, 8, 8, 4, 4, groups=2))
    x = case.x.requires_grad_()
    z = run(case, impl, training)
    (dx,) = torch.autograd.grad(z.sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        dx.sum().backward()


def _both_ops(impl, weight, bn_weight, bn_bias, mean, var, training):
    """x -> both public ops in a row, in float64 (2 x 8 channels, 2 groups)."""
    def fn(x):
        running = [None if t is None else t.clone() for t in (mean, var)]
        z = resnext_kernels.grouped_conv_bn_relu(x, weight, bn_weight, bn_bias, *running, groups=2,
                                                 training=training, impl=impl)
        return resnext_kernels.batch_norm_relu(z, bn_weight, bn_bias, *running, residual=x, training=training,
                                               impl=impl)
    return fn


_TRANSFORMS = {
    "jvp": lambda fn, x, t: torch.func.jvp(fn, (x,), (t,))[1],
    "forward_ad": lambda fn, x, t: _forward_ad_tangent(fn, x, t),
    "func.grad": lambda fn, x, t: torch.func.grad(lambda x: (fn(x) * t).sum())(x),
    "vmap": lambda fn, x, t: torch.func.vmap(fn)(torch.stack([x, t])),
}


def _forward_ad_tangent(fn, x, t):
    with torch.autograd.forward_ad.dual_level():
        return torch.autograd.forward_ad.unpack_dual(fn(torch.autograd.forward_ad.make_dual(x, t))).tangent


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("transform", list(_TRANSFORMS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_mode_ad_and_torch_func_take_the_reference(impl, transform, training, monkeypatch):
    # The kernels' ops have no forward-mode or functorch rules: their tangents were silently zero. "auto"
    # takes the reference there (stood in for by an "auto" that resolves to the kernel backend, as on a
    # GPU); the backend asked for by name refuses.
    case = make_case(Shape(2, 8, 8, 5, 4, groups=2), dtype=torch.float64)
    x, t = case.x, torch.randn_like(case.x)
    # vmap refuses to update unbatched running stats in place (PyTorch's own rule): none then.
    running = (None, None) if transform == "vmap" and training else (case.running_mean, case.running_var)
    args = (case.weight, case.bn_weight, case.bn_bias, *running, training)
    expected = _TRANSFORMS[transform](_both_ops("torch", *args), x, t)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        _TRANSFORMS[transform](_both_ops(impl, *args), x, t)
    resolve = resnext_kernels.backends.resolve
    monkeypatch.setattr(resnext_kernels.backends, "resolve",
                        lambda name, *a, **k: resolve(impl if name == "auto" else name, *a, **k))
    got = _TRANSFORMS[transform](_both_ops("auto", *args), x, t)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert got.abs().max() > 0.1
    with torch.autograd.forward_ad.dual_level():  # without a tangent on the inputs, the kernels run
        assert torch.equal(_both_ops(impl, *args)(x), _both_ops("auto", *args)(x))


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_a_tangent_on_the_running_stats_is_not_dropped(impl):
    # In eval the running statistics normalise: their tangents reach the output.
    case = make_case(Shape(2, 8, 8, 5, 4, groups=2), dtype=torch.float64)
    with torch.autograd.forward_ad.dual_level():
        mean = torch.autograd.forward_ad.make_dual(case.running_mean, torch.randn_like(case.running_mean))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            resnext_kernels.grouped_conv_bn_relu(case.x, case.weight, case.bn_weight, case.bn_bias, mean,
                                                 case.running_var, groups=2, training=False, impl=impl)


def test_the_reference_runs_under_vmap_whichever_input_is_batched():
    # What "auto" runs under vmap: no layout can be asked for there, even of an unbatched channels-last x.
    case = make_case(Shape(2, 8, 8, 5, 4, groups=2), dtype=torch.float64, layout="channels_last")

    def fn(weight):
        return resnext_kernels.grouped_conv_bn_relu(case.x, weight, case.bn_weight, case.bn_bias, case.running_mean,
                                                    case.running_var, groups=2, training=False, impl="torch")

    weights = torch.stack([case.weight, 2 * case.weight])
    torch.testing.assert_close(torch.func.vmap(fn)(weights), torch.stack([fn(w) for w in weights]))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in Triton's interpreter
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
# Dilation 9 on 19x20: banded halos (LARGE_DILATIONS), the Inf read by 9 output pixels, several tiles apart.
@pytest.mark.parametrize("shape", [Shape(2, 16, 16, 5, 5, groups=4), Shape(1, 16, 16, 19, 20, groups=4, dilation=9)],
                         ids=str)
def test_non_finite_input_gives_the_references_non_finite_pattern(impl, dtype, shape):
    # An Inf in x: z is +-Inf (or 0 after ReLU) where it is read, dw Inf or NaN (0 * Inf where ReLU
    # stops the gradient) in its group's taps. Tiles overhang the image, and the pixels beyond it must
    # contribute nothing, not 0 * Inf. A large BN shift keeps every finite z > 0, so the patterns do
    # not depend on rounding.
    case = make_case(shape, dtype=dtype, layout="channels_last", bn_dtype=torch.float32)
    with torch.no_grad():
        case.x[0, 5, shape.h // 2, shape.w // 2] = float("inf")
        case.bn_bias.fill_(10.0)
    grad = torch.randn(shape.n, shape.c_out, shape.h, shape.w, device=DEVICE, dtype=torch.float64)

    def evaluate(impl, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (case.x, case.weight)]
        z = resnext_kernels.grouped_conv_bn_relu(*leaves, case.bn_weight.to(dtype), case.bn_bias.to(dtype),
                                                 case.running_mean.to(dtype), case.running_var.to(dtype),
                                                 dilation=shape.dilation, groups=shape.groups, training=False,
                                                 impl=impl)
        z.backward(grad.to(dtype))
        return z, *(t.grad for t in leaves)

    for name, ours, ref in zip(("z", "dx", "dw"), evaluate(impl, dtype), evaluate("torch", torch.float64)):
        assert torch.equal(ours.isnan(), ref.isnan()), name
        assert torch.equal(ours.isinf(), ref.isinf()), name
    assert evaluate("torch", torch.float64)[2].isinf().any()


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_statistics_without_running_buffers(impl):
    case = make_case(Shape(2, 8, 8, 4, 4, groups=2))
    expected, _, _ = reference64(case, True, with_running=False)
    assert_close_to_reference(run(case, impl, True, with_running=False), expected, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_variance_of_a_large_mean_activation(impl):
    case = large_mean_case(Shape(2, 8, 8, 5, 5, groups=2))
    expected, expected_mean, expected_var = reference64(case, True, momentum=1.0)  # running = batch stats
    assert (expected_mean.abs() / expected_var.sqrt()).min() > 300
    copy = dataclasses.replace(case, running_mean=case.running_mean.clone(), running_var=case.running_var.clone())
    baseline = run(copy, "torch", True, momentum=1.0)
    z = run(case, impl, True, momentum=1.0)
    torch.testing.assert_close(case.running_mean.double(), expected_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(case.running_var.double(), expected_var, rtol=1e-4, atol=0)
    # z inherits fp32's rounding of y ~ 2000: within a small multiple of PyTorch's own error.
    error, base_error = max_error(z, expected), max_error(baseline, expected)
    assert error <= 3 * base_error + 1e-6 * expected.abs().max(), f"{error:.3g} vs PyTorch's {base_error:.3g}"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in Triton's interpreter
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype, layout", [(torch.float32, "nchw"), (torch.bfloat16, "nchw"),
                                           (torch.bfloat16, "channels_last")], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_and_inf_propagate_as_in_the_reference(impl, dtype, layout, training):
    # Small groups: kernels that pack several groups into one tile must not leak Inf * 0 = NaN
    # into a neighbouring group.
    case = make_case(Shape(2, 8, 8, 5, 5, groups=4), dtype=dtype, layout=layout)
    case.x[0, 1, 2, 3] = float("nan")
    case.x[1, 5, 0, 0] = float("inf")
    expected = run(case.on_cpu(), "torch", training)
    z = run(case, impl, training)
    assert torch.equal(z.isnan().cpu(), expected.isnan())
    assert z.isnan().any()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_empty_batch(impl, training, layout):
    # Batch statistics of nothing go to the reference (F.batch_norm's semantics); eval runs the kernels.
    case = make_case(Shape(0, 8, 8, 5, 5, groups=2, stride=2), layout=layout)
    mean, var = case.running_mean.clone(), case.running_var.clone()
    x, weight, bn_weight, bn_bias = (t.detach().requires_grad_() for t in case.tensors()[:4])
    z = resnext_kernels.grouped_conv_bn_relu(x, weight, bn_weight, bn_bias, case.running_mean, case.running_var,
                                             stride=2, groups=2, training=training, impl=impl)
    assert z.shape == (0, 8, 3, 3)
    z.sum().backward()
    assert x.grad.shape == x.shape
    for parameter in (weight, bn_weight, bn_bias):
        assert torch.equal(parameter.grad, torch.zeros_like(parameter))
    assert torch.equal(case.running_mean, mean) and torch.equal(case.running_var, var)


def _free_gpu_gib():
    return torch.cuda.mem_get_info(DEVICE)[0] / 2**30 if DEVICE.type == "cuda" else 0


@pytest.mark.skipif(DEVICE.type != "cuda" or not KERNEL_IMPLS, reason="needs a GPU: tensors of more than 2^31 elements")
def test_tensors_of_more_than_2_31_elements():
    # 64-bit offsets: x, z, dz and dx each hold 2^31 + 2^18 elements (4 GiB in bf16) of small images.
    # In eval mode z and dx of an image depend on that image alone: the first and last two images
    # against float64 computed on those images only. The backends run one after the other (about
    # 20 GiB each), so that the GPU check's parallel test shards never hold two of them at once.
    if _free_gpu_gib() < 24:
        pytest.skip(f"needs 24 GiB of free GPU memory, {_free_gpu_gib():.0f} GiB free")
    n, c, size, groups = 8193, 16, 128, 4  # 8193 * 16 * 128 * 128 = 2^31 + 2^18
    x = torch.empty(n, c, size, size, device=DEVICE, dtype=torch.bfloat16, memory_format=torch.channels_last)
    x.normal_().requires_grad_()
    weight = (torch.randn(c, c // groups, 3, 3, device=DEVICE) / 6).to(torch.bfloat16)
    bn = (torch.rand(c, device=DEVICE) + 0.5, torch.randn(c, device=DEVICE) * 0.1,
          torch.randn(c, device=DEVICE) * 0.1, torch.rand(c, device=DEVICE) + 0.5)

    def layer(x, impl):
        bn_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        gamma, beta, mean, var = (t.to(bn_dtype) for t in bn)
        return resnext_kernels.grouped_conv_bn_relu(x, weight.to(x.dtype), gamma, beta, mean, var, groups=groups,
                                                    training=False, impl=impl)

    for impl in KERNEL_IMPLS:
        z = layer(x, impl)
        dz = torch.empty_like(z).normal_()
        (dx,) = torch.autograd.grad(z, x, dz)
        for images in (slice(0, 2), slice(n - 2, n)):
            references = {}
            for dtype in (torch.float64, torch.bfloat16):  # the reference, and PyTorch's own bf16 error
                part = x.detach()[images].to(dtype).requires_grad_()
                z_ref = layer(part, "torch")
                references[dtype] = (z_ref, torch.autograd.grad(z_ref, part, dz[images].to(dtype))[0])
            for k, (name, ours) in enumerate((("z", z[images]), ("dx", dx[images]))):
                assert_close_to_reference(ours, references[torch.float64][k], torch.bfloat16,
                                          baseline=references[torch.bfloat16][k],
                                          what=f"impl={impl}: {name} of images {images}")
        del z, dz, dx
        torch.cuda.empty_cache()


def _check_periodic_batch_in_training(impl, n, size, c=16, groups=4, period=3, momentum=0.1):
    """Training forward and backward of ``impl`` in bf16 on a channels-last batch whose images (and
    gradient) repeat every ``period`` images: the batch statistics, and every image's z and dx, are
    then those of one period, and dw, dgamma, dbeta n / period times one period's. So float64 on one
    period checks the first and the last images and every reduction over the whole batch, however
    large (the last images' offsets are the largest; a wrong one would read images that differ)."""
    assert n % period == 0
    copies = n // period
    generator = torch.Generator().manual_seed(n)

    def values(*shape, scale=1.0):  # bf16 values: the references start from the same rounded inputs
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).bfloat16().double().to(DEVICE)

    base_x, base_dz = values(period, c, size, size), values(period, c, size, size)
    weight = values(c, c // groups, 3, 3, scale=1 / 6)
    gamma = (torch.rand(c, generator=generator, dtype=torch.float64) + 0.5).to(DEVICE)
    beta = values(c, scale=0.1)

    def period_step(dtype):  # one period in dtype, its sums scaled to the whole batch
        bn_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        leaves = [t.to(d).requires_grad_() for t, d in
                  ((base_x, dtype), (weight, dtype), (gamma, bn_dtype), (beta, bn_dtype))]
        z = resnext_kernels.grouped_conv_bn_relu(*leaves, None, None, groups=groups, training=True, impl="torch")
        dx, dw, dgamma, dbeta = torch.autograd.grad(z, leaves, base_dz.to(dtype))
        return dict(z=z, dx=dx, dw=dw.double() * copies, dgamma=dgamma.double() * copies,
                    dbeta=dbeta.double() * copies)

    expected, baseline = period_step(torch.float64), period_step(torch.bfloat16)
    x = torch.empty(n, c, size, size, device=DEVICE, dtype=torch.bfloat16, memory_format=torch.channels_last)
    dz = torch.empty_like(x)
    for i in range(period):
        x[i::period] = base_x[i]
        dz[i::period] = base_dz[i]
    leaves = [x.requires_grad_(), weight.bfloat16().requires_grad_(), gamma.float().requires_grad_(),
              beta.float().requires_grad_()]
    running_mean = torch.zeros(c, device=DEVICE)
    running_var = torch.ones(c, device=DEVICE)
    z = resnext_kernels.grouped_conv_bn_relu(*leaves, running_mean, running_var, groups=groups, training=True,
                                             momentum=momentum, impl=impl)
    dx, dw, dgamma, dbeta = torch.autograd.grad(z, leaves, dz)
    del dz
    for images in (slice(0, period), slice(n - period, n)):
        for name, ours in (("z", z[images]), ("dx", dx[images])):
            assert_close_to_reference(ours, expected[name], torch.bfloat16, baseline=baseline[name],
                                      what=f"impl={impl}: {name} of images {images}")
    for name, ours in (("dw", dw), ("dgamma", dgamma), ("dbeta", dbeta)):
        assert_close_to_reference(ours, expected[name], torch.bfloat16, baseline=baseline[name],
                                  what=f"impl={impl}: {name}")
    # The running statistics: within a few times the error of the float64 statistics of y rounded to
    # bf16 (as PyTorch's bf16 convolution stores it, and as the kernels take their statistics).
    pixels = n * size * size

    def running(y):
        unbiased = y.var((0, 2, 3), unbiased=False) * pixels / (pixels - 1)
        return momentum * y.mean((0, 2, 3)), (1 - momentum) + momentum * unbiased

    want = running(torch.nn.functional.conv2d(base_x, weight, None, 1, 1, 1, groups))
    rounded = running(torch.nn.functional.conv2d(base_x.bfloat16(), weight.bfloat16(), None, 1, 1, 1, groups).double())
    for name, ours, a, b in zip(("running_mean", "running_var"), (running_mean, running_var), want, rounded):
        error, bound = max_error(ours, a), LOW_PRECISION_FACTOR * max_error(b, a) + 1e-6
        assert error <= bound, f"impl={impl}: {name} error {error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_periodic_batch_in_training(impl):
    # The check below at a size every machine runs: it must hold for any n, not only for 2^31 elements.
    _check_periodic_batch_in_training(impl, n=6, size=5)


def _channels_far_apart(*tensors_and_dims):
    """Views of one storage holding the values of tensors of at most 3 channels and 64 elements per
    channel, their channel dims (given with each) stepping 2^30 elements: channel offsets pass 2^31,
    as in a large NCHW image. The views start 64 elements apart and only their elements are written,
    so on the CPU the storage costs address space, not memory."""
    first = tensors_and_dims[0][0]
    storage = torch.empty(2**31 + 64 * len(tensors_and_dims), dtype=first.dtype, device=first.device)
    views = []
    for k, (t, dim) in enumerate(tensors_and_dims):
        strides = list(t.contiguous().stride())
        strides[dim] = 2**30
        views.append(storage.as_strided(t.shape, strides, 64 * k).copy_(t))
    return views


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channel_offsets_beyond_32_bits(impl, groups, training):
    # x, the weight and the gradient each with channels 2^30 elements apart (3 channels: offsets up
    # to 2^31): the same results, bit for bit, as from contiguous copies.
    case = make_case(Shape(1, 3, 3, 2, 3, groups=groups), dtype=torch.float16, bn_dtype=torch.float32)
    grad = torch.randn(1, 3, 2, 3, device=DEVICE).half()

    def step(x, weight, grad):
        leaves = [t.detach().requires_grad_() for t in (x, weight, case.bn_weight, case.bn_bias)]
        mean, var = case.running_mean.clone(), case.running_var.clone()
        z = resnext_kernels.grouped_conv_bn_relu(*leaves, mean, var, groups=groups, training=training, impl=impl)
        return (z, mean, var, *torch.autograd.grad(z, leaves, grad))

    expected = step(case.x, case.weight, grad)
    try:
        got = step(*_channels_far_apart((case.x, 1), (case.weight, 0), (grad, 1)))
        for name, a, e in zip(("z", "running_mean", "running_var", "dx", "dw", "dgamma", "dbeta"), got, expected):
            assert torch.equal(a, e), name
    finally:
        if DEVICE.type == "cuda":  # the 4 GiB storage: not kept cached while the other test shards need memory
            torch.cuda.empty_cache()


@pytest.mark.skipif(DEVICE.type != "cuda" or not KERNEL_IMPLS, reason="needs a GPU: tensors of more than 2^31 elements")
def test_training_on_tensors_of_more_than_2_31_elements():
    # 64-bit offsets in the training kernels: batch statistics, normalisation, the backward's reductions,
    # dgrad and wgrad over x, y, z, dz and dx of 2^31 + 2^18 elements each (4 GiB in bf16). One backend
    # at a time (about 22 GiB), as above.
    if _free_gpu_gib() < 28:
        pytest.skip(f"needs 28 GiB of free GPU memory, {_free_gpu_gib():.0f} GiB free")
    for impl in KERNEL_IMPLS:
        _check_periodic_batch_in_training(impl, n=8193, size=128)  # 8193 * 16 * 128 * 128 = 2^31 + 2^18
        torch.cuda.empty_cache()


@pytest.mark.skipif(DEVICE.type != "cuda" or not KERNEL_IMPLS, reason="needs a GPU: CUDA graphs")
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_training_step_replays_in_a_cuda_graph(impl):
    # CUDA graphs (torch.compile's "reduce-overhead", hand-made captures) record the ops' launches: no
    # host sync, no memory outside PyTorch's allocator, every launch on the current stream. A captured
    # training forward + backward, replayed on new x, matches eager calls bitwise (the kernels are
    # deterministic), running statistics included.
    case = make_case(Shape(4, 16, 16, 9, 9, groups=4), dtype=torch.bfloat16, layout="channels_last",
                     bn_dtype=torch.float32)
    x = case.x.detach().requires_grad_()
    params = [t.detach().requires_grad_() for t in (case.weight, case.bn_weight, case.bn_bias)]
    dz = torch.randn(4, 16, 9, 9, device=DEVICE).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    running = (case.running_mean, case.running_var)

    def step(running_mean, running_var):
        z = resnext_kernels.grouped_conv_bn_relu(x, *params, running_mean, running_var, groups=4, training=True,
                                                 impl=impl)
        return (z, *torch.autograd.grad(z, [x, *params], dz))

    side = torch.cuda.Stream(DEVICE)
    side.wait_stream(torch.cuda.current_stream(DEVICE))
    with torch.cuda.stream(side):
        for _ in range(2):  # compiles and autotunes outside the capture
            step(*running)
    torch.cuda.current_stream(DEVICE).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(*running)
    for _ in range(2):
        with torch.no_grad():
            x.copy_(torch.randn_like(x))
        expected_running = [t.clone() for t in running]
        graph.replay()
        expected = step(*expected_running)
        for name, got, want in zip(("z", "dx", "dw", "dgamma", "dbeta"), captured, expected):
            assert torch.equal(got, want), name
        assert all(map(torch.equal, running, expected_running))


def clone_case(case):
    clone = make_case(case.shape)
    for name in ("x", "weight", "bn_weight", "bn_bias", "running_mean", "running_var"):
        setattr(clone, name, getattr(case, name).clone())
    return clone


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_runs_conv_low_and_batch_norm_in_fp32(impl, dtype):
    if DEVICE.type == "cpu" and dtype == torch.float16:
        pytest.skip("CPU autocast is bfloat16-only in this test")
    case = make_case(Shape(2, 32, 32, 5, 5, groups=8))
    # What autocast computes, in float64: the conv's inputs rounded to the autocast dtype.
    rounded = clone_case(case)
    rounded.x, rounded.weight = case.x.to(dtype), case.weight.to(dtype)
    expected, expected_mean, _ = reference64(rounded, True)
    baseline_case = clone_case(case)
    with torch.autocast(DEVICE.type, dtype=dtype):
        z = run(case, impl, True)
        baseline = run(baseline_case, "torch", True)
    assert z.dtype == baseline.dtype == dtype
    assert case.running_mean.dtype == torch.float32
    assert_close_to_reference(z, expected, dtype, baseline=None if impl == "torch" else baseline)
    assert_close_to_reference(case.running_mean, expected_mean, dtype, what="running_mean",
                              baseline=None if impl == "torch" else baseline_case.running_mean)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_takes_the_low_precision_output_of_a_previous_layer(impl, x_dtype):
    # Under autocast x comes from a previous convolution in bf16 while the weight stays fp32; as
    # autocast casts any floating input but fp64, an fp16 x runs in bf16 too.
    case = make_case(Shape(2, 32, 32, 5, 5, groups=8))

    def step(impl, x, weight, bn_dtype=torch.float32):
        x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
        bn = [t.to(bn_dtype) for t in case.tensors()[2:]]
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bn_dtype != torch.float64):
            z = resnext_kernels.grouped_conv_bn_relu(x, weight, *bn, groups=8, training=True, impl=impl)
        z.to(bn_dtype).sum().backward()
        return z, x.grad, weight.grad

    x = case.x.to(x_dtype)
    z, dx, dw = step(impl, x, case.weight)
    assert z.dtype == torch.bfloat16 and dx.dtype == x_dtype and dw.dtype == torch.float32
    # float64 of what autocast computes: the convolution's inputs rounded to bf16.
    rounded = [t.to(torch.bfloat16).double() for t in (x, case.weight)]
    expected = step("torch", *rounded, bn_dtype=torch.float64)
    baseline = step("torch", x, case.weight)
    # PyTorch's own gradients are the baseline: where rounding moves a value across the ReLU's kink,
    # they differ from float64's by a whole dz, beyond any fixed bound.
    checked = 1 if impl == "torch" else 3
    for name, a, b, e in zip(("z", "dx", "dw")[:checked], (z, dx, dw), baseline, expected):
        assert_close_to_reference(a, e, torch.bfloat16, baseline=None if impl == "torch" else b, what=name)


def _random_shapes(count, seed=20261128):
    """Shapes nobody picked: group counts, unequal in/out group widths (1 to 32 channels), strides,
    dilations and spatial sizes (1 to 20) drawn from a fixed seed, so a failure replays."""
    rng = random.Random(seed)
    shapes = []
    while len(shapes) < count:
        groups = rng.choice([1, 2, 3, 4, 8, 16])
        cin_pg, cout_pg = rng.choice([1, 2, 3, 4, 5, 8, 12, 16, 24, 32]), rng.choice([1, 2, 3, 4, 5, 8, 12, 16, 24, 32])
        if groups * max(cin_pg, cout_pg) <= 128:
            shapes.append(Shape(rng.randint(1, 3), groups * cin_pg, groups * cout_pg, rng.randint(1, 20),
                                rng.randint(1, 20), groups=groups, stride=rng.choice([1, 2]),
                                dilation=rng.choice([1, 1, 2, 3])))
    return shapes


RANDOM_SHAPES = _random_shapes(16)


def _check_against_float64(shape, dtype, impl, training, layout, grad_layout):
    """Forward (running statistics included) and every gradient of a fresh case of ``shape``, computed in
    ``dtype`` by ``impl``, against float64: fp32/fp64 within a fixed bound, 16-bit within a multiple of
    PyTorch's own error in that dtype. Returns the results, named as RESULTS."""
    case64 = make_case(shape, dtype=torch.float64)
    h_out, w_out = (shape.h - 1) // shape.stride + 1, (shape.w - 1) // shape.stride + 1
    grad64 = torch.randn(shape.n, shape.c_out, h_out, w_out, device=DEVICE, dtype=torch.float64)
    args = (training, layout, grad64, grad_layout)
    expected = forward_backward(case64, torch.float64, "torch", *args)
    ours = forward_backward(case64, dtype, impl, *args)
    baseline = forward_backward(case64, dtype, "torch", *args) if dtype in LOW_PRECISION else None
    for k, (name, a, e) in enumerate(zip(RESULTS, ours, expected, strict=True)):
        assert_close_to_reference(a, e, dtype, baseline=baseline[k] if baseline else None,
                                  what=f"{name} ({'train' if training else 'eval'})")
    return ours


RESULTS = ("z", "running_mean", "running_var", "dx", "dw", "dgamma", "dbeta")


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("shape", RANDOM_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_random_shapes_match_float64(impl, shape, dtype):
    # Training and eval, and the layouts of x and of the gradient, alternate over the shapes. bf16
    # runs the tensor-core paths wherever the group widths allow, within PyTorch's own bf16 error;
    # fp32 the FMA paths.
    index = RANDOM_SHAPES.index(shape)
    training, layout, grad_layout = index % 2 == 0, LAYOUTS[index % 3], LAYOUTS[index // 3 % 3]
    ours = _check_against_float64(shape, dtype, impl, training, layout, grad_layout)
    for name, a in zip(RESULTS, ours):
        assert a.dtype == (dtype if name in ("z", "dx", "dw") else torch.float32), name


# Dilations larger than a kernel tile's own span: the CUDA kernels then stage only the three bands of
# rows and columns the taps read (csrc/kernels/tensor_core_tiles.cuh), forward, dgrad and wgrad alike;
# at stride 3 with a dilation it does not divide, dgrad's bands start unevenly apart.
LARGE_DILATIONS = [Shape(1, 4, 4, 40, 3, groups=2, dilation=30), Shape(1, 16, 16, 19, 20, groups=2, dilation=13),
                   Shape(2, 6, 6, 23, 9, groups=3, stride=2, dilation=11),
                   Shape(1, 4, 8, 31, 5, groups=4, stride=3, dilation=14)]


# Triton's kernels have no banded path: fp32 only, which keeps the compiles a GPU run pays for few.
@pytest.mark.parametrize("impl, dtype", [(impl, dtype) for impl in KERNEL_IMPLS
                                         for dtype in (torch.float32, torch.bfloat16, torch.float64)
                                         if impl == "cuda" or dtype == torch.float32], ids=str)
@pytest.mark.parametrize("shape", LARGE_DILATIONS, ids=str)
def test_large_dilations_match_float64(impl, dtype, shape):
    layout = LAYOUTS[LARGE_DILATIONS.index(shape) % 3]
    for training in (True, False):
        _check_against_float64(shape, dtype, impl, training, layout, "channels_last")


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("stride, dilation", [(1, 2**32 + 1), (2**32 + 3, 1), (7, 6), (2, 2**31)])
def test_stride_and_dilation_beyond_the_image(impl, stride, dilation):
    # The kernels take 32-bit values: a stride or dilation at least the image's longer side (here 6)
    # must act as that side, never wrap (2^32 + 1 would become 1).
    shape = Shape(2, 8, 8, 5, 6, groups=4, stride=stride, dilation=dilation)
    for training in (True, False):
        _check_against_float64(shape, torch.float32, impl, training, "nchw", "nchw")
