"""batch_norm_relu (the bottleneck's bn1 + relu and bn3 + add + relu) against float64, for every backend
that can run here, and what is particular to its ops."""

import pytest
import torch
import torch.nn.functional as F

import resnext_kernels
from conftest import DEVICE, KERNEL_IMPLS
from helpers import (
    KINK_SHIFT,
    assert_close_to_reference,
    layout_as,
    values_at_the_relu_kink,
    with_odd_strides_on_size_one_dims,
)

IMPLS = ["torch"] + KERNEL_IMPLS
LOW_PRECISION = [torch.float16, torch.bfloat16]
# N, C, H, W: channels that fill the vector paths (multiples of 8, across channel tiles) and ones that
# do not, 1x1 and single-row images, N = 1.
SHAPES = [(2, 16, 5, 7), (3, 40, 3, 5), (1, 5, 4, 1), (4, 8, 1, 1), (2, 64, 6, 6), (1, 3, 2, 3)]


def make_inputs(shape, dtype, layout="nchw", residual=True):
    n, c, h, w = shape
    x = layout_as((torch.randn(shape, device=DEVICE) * 1.5 + 0.3).to(dtype), layout)
    r = layout_as(torch.randn(shape, device=DEVICE).to(dtype), layout) if residual else None
    bn_dtype = torch.float32 if dtype in LOW_PRECISION else dtype
    params = dict(bn_weight=(torch.rand(c, device=DEVICE) + 0.5).to(bn_dtype),
                  bn_bias=(torch.randn(c, device=DEVICE) * 0.5).to(bn_dtype),
                  running_mean=(torch.randn(c, device=DEVICE) * 0.2).to(bn_dtype),
                  running_var=(torch.rand(c, device=DEVICE) + 0.5).to(bn_dtype))
    return x, r, params


def run(x, r, params, dtype, impl, training, grad, grad_layout="nchw", momentum=0.1, eps=1e-5):
    """[z, running_mean, running_var, dx, dresidual, dgamma, dbeta] computed in ``dtype`` (BatchNorm
    tensors in fp32 for 16-bit inputs) from the given tensors' values."""
    bn_dtype = torch.float32 if dtype in LOW_PRECISION else dtype
    leaves = [None if t is None else t.detach().to(d).requires_grad_()
              for t, d in ((x, dtype), (r, dtype), (params["bn_weight"], bn_dtype), (params["bn_bias"], bn_dtype))]
    mean, var = params["running_mean"].to(bn_dtype).clone(), params["running_var"].to(bn_dtype).clone()
    z = resnext_kernels.batch_norm_relu(leaves[0], leaves[2], leaves[3], mean, var, leaves[1], training=training,
                                        momentum=momentum, eps=eps, impl=impl)
    z.backward(layout_as(grad.to(dtype), grad_layout))
    return [z, mean, var] + [None if t is None else t.grad for t in leaves]


def reference64(x, r, params, training, grad, momentum=0.1, eps=1e-5):
    to64 = lambda t: None if t is None else t.detach().double()  # noqa: E731
    return run(to64(x), to64(r), {k: to64(v) for k, v in params.items()}, torch.float64, "torch", training,
               grad.double(), momentum=momentum, eps=eps)


NAMES = ["z", "running_mean", "running_var", "dx", "dresidual", "dgamma", "dbeta"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_running_stats_and_gradients_match_float64(impl, shape, residual, training):
    if training and shape[0] * shape[2] * shape[3] == 1:
        pytest.skip("one value per channel")
    x, r, params = make_inputs(shape, torch.float32, residual=residual)
    grad = torch.randn(shape, device=DEVICE)
    expected = reference64(x, r, params, training, grad, momentum=0.3)
    got = run(x, r, params, torch.float32, impl, training, grad, momentum=0.3)
    for name, a, e in zip(NAMES, got, expected):
        if e is None:
            assert a is None, name
            continue
        assert_close_to_reference(a, e, torch.float32, what=name)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("wanted", [("x", "residual"), ("residual",), ("x",), ("bn_weight", "residual")],
                         ids="+".join)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_each_subset_of_gradients(impl, wanted, layout, training):
    """Every path of the backward with a residual: the reductions test z and write the residual's
    gradient where they run (training, or parameter gradients wanted); folded without them (a frozen
    BatchNorm) torch masks dz first; the residual's gradient alone runs no kernel."""
    shape = (2, 16, 5, 3)
    x, r, params = make_inputs(shape, torch.float32, layout)
    grad = layout_as(torch.randn(shape, device=DEVICE), layout)

    def gradients(impl, dtype):
        inputs = {"x": x, "residual": r, "bn_weight": params["bn_weight"], "bn_bias": params["bn_bias"]}
        inputs = {k: v.detach().to(dtype).requires_grad_(k in wanted) for k, v in inputs.items()}
        mean, var = params["running_mean"].to(dtype).clone(), params["running_var"].to(dtype).clone()
        z = resnext_kernels.batch_norm_relu(inputs["x"], inputs["bn_weight"], inputs["bn_bias"], mean, var,
                                            inputs["residual"], training=training, impl=impl)
        return torch.autograd.grad(z, [inputs[k] for k in wanted], grad.to(dtype))

    for name, a, e in zip(wanted, gradients(impl, torch.float32), gradients("torch", torch.float64), strict=True):
        assert_close_to_reference(a, e, torch.float32, what=name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layouts_of_inputs_and_gradient(impl, layout, training):
    # x, the residual and the incoming gradient in one layout each, the output in x's memory format.
    shape = (2, 24, 5, 6)
    x, r, params = make_inputs(shape, torch.float32, layout)
    r = layout_as(r, {"nchw": "channels_last", "channels_last": "strided", "strided": "nchw"}[layout])
    grad = torch.randn(shape, device=DEVICE)
    grad_layout = "strided" if layout != "strided" else "channels_last"
    expected = reference64(x, r, params, training, grad)
    got = run(x, r, params, torch.float32, impl, training, grad, grad_layout)
    for name, a, e in zip(NAMES, got, expected):
        assert_close_to_reference(a, e, torch.float32, what=name)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert got[0].is_contiguous(memory_format=memory_format)  # z
    assert got[3].is_contiguous(memory_format=memory_format)  # dx, in x's format as PyTorch's


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("shape, layout", [((2, 8, 5, 1), "nchw"), ((2, 8, 5, 1), "channels_last"),
                                           ((1, 8, 1, 3), "nchw"), ((3, 1, 2, 4), "channels_last")], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_strides_of_size_one_dims_are_ignored(impl, shape, layout, training):
    x, r, params = make_inputs(shape, torch.float32, layout)
    x, r = with_odd_strides_on_size_one_dims(x), with_odd_strides_on_size_one_dims(r)
    grad = with_odd_strides_on_size_one_dims(layout_as(torch.randn(shape, device=DEVICE), layout))
    expected = reference64(x, r, params, training, grad)
    got = run(x, r, params, torch.float32, impl, training, grad, layout)
    for name, a, e in zip(NAMES, got, expected):
        assert_close_to_reference(a, e, torch.float32, what=name)
    # The fake kernels' strides: the output format's own.
    memory_format = torch.channels_last if layout == "channels_last" and shape[1] > 1 else torch.contiguous_format
    own = torch.empty(shape, memory_format=memory_format).stride()
    assert got[0].stride() == own and got[3].stride() == own  # z, dx


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_low_precision_within_pytorchs_own_error(impl, dtype, layout, residual, training):
    shape = (3, 32, 7, 5)
    x, r, params = make_inputs(shape, dtype, layout, residual)
    grad = torch.randn(shape, device=DEVICE).to(dtype)
    expected = reference64(x, r, params, training, grad)
    # The gradient in the inputs' layout: channels-last 16-bit takes the kernels' 16-byte paths.
    baseline = run(x, r, params, dtype, "torch", training, grad, layout)
    got = run(x, r, params, dtype, impl, training, grad, layout)
    for name, a, b in zip(NAMES, got, baseline):
        assert (a is None and b is None) or a.dtype == b.dtype, name
    # PyTorch's own gradients are the baseline: where rounding moves a value across the ReLU's kink,
    # they differ from float64's by a whole dz, beyond any fixed bound.
    checked = 3 if impl == "torch" else len(NAMES)
    for name, a, b, e in zip(NAMES[:checked], got, baseline, expected):
        if e is not None:
            assert_close_to_reference(a, e, dtype, baseline=None if impl == "torch" else b, what=name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", [(3, 32, 7, 5), (3, 12, 5, 3), (2, 20, 4, 5)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_low_precision_channels_last_off_the_vector_paths(impl, dtype, shape, training):
    # Channels-last 16-bit tensors take 16-byte (8-channel) paths only where every tensor allows them:
    # channel counts that are not multiples of 8, a strided gradient and a strided residual must not.
    x, r, params = make_inputs(shape, dtype, "channels_last")
    r = layout_as(r, "strided")
    grad = torch.randn(shape, device=DEVICE).to(dtype)
    expected = reference64(x, r, params, training, grad)
    baseline = run(x, r, params, dtype, "torch", training, grad, "strided")
    got = run(x, r, params, dtype, impl, training, grad, "strided")
    checked = 3 if impl == "torch" else len(NAMES)
    for name, a, b, e in zip(NAMES[:checked], got, baseline, expected):
        assert_close_to_reference(a, e, dtype, baseline=None if impl == "torch" else b, what=name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_batch_norm_output_is_rounded_before_the_residual_is_added(impl, dtype, layout):
    # As `out = bn(x); out += residual` stores out in x's dtype before adding. With scale 1 and a
    # shift of fine steps, bn(x) = x + shift is exact in fp32 but needs rounding to dtype, and so does
    # the sum: rounding once instead of twice differs on some elements, and every backend must match
    # the unfused reference bitwise.
    n, c, h, w = 2, 16, 6, 5
    step = torch.finfo(dtype).eps  # the spacing of dtype in [1, 2)
    x = layout_as((1 + torch.randint(0, int(1 / step), (n, c, h, w), device=DEVICE) * step).to(dtype), layout)
    r = layout_as((torch.randint(-8, 8, (n, c, h, w), device=DEVICE) * step).to(dtype), layout)
    shift = torch.randint(1, 8, (c,), device=DEVICE) * (step / 8)
    eps = 2.0**-10  # var + eps = 1: scale 1 exactly
    ones = torch.ones(c, device=DEVICE)
    args = (x, ones, shift, torch.zeros(c, device=DEVICE), ones - eps, r)
    z = resnext_kernels.batch_norm_relu(*args, training=False, eps=eps, impl=impl)
    once = torch.relu(x.double() + shift.double()[:, None, None] + r.double()).to(dtype)
    twice = torch.relu((x.double() + shift.double()[:, None, None]).to(dtype).double() + r.double()).to(dtype)
    assert not torch.equal(once, twice), "no element rounds differently once and twice: the test would pass anyway"
    assert torch.equal(z, twice)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_relu_passes_no_gradient_where_the_output_rounds_to_zero(impl, layout):
    # As torch.relu's backward, which tests z as stored: where x * scale + shift > 0 rounds to zero
    # in fp16, z = 0 and nothing passes (the mask recomputed from x; with a residual it is read from
    # z). Every gradient below is exact in fp32.
    shape = (2, 16, 5, 3)
    x, k = values_at_the_relu_kink(shape, layout)
    x.requires_grad_()
    c, eps = shape[1], 2.0**-10  # var + eps = 1: BN scale 1, shift KINK_SHIFT
    ones = torch.ones(c, device=DEVICE)
    bn_weight = ones.clone().requires_grad_()
    bn_bias = torch.full((c,), KINK_SHIFT, device=DEVICE).requires_grad_()
    z = resnext_kernels.batch_norm_relu(x, bn_weight, bn_bias, torch.zeros(c, device=DEVICE), ones - eps,
                                        training=False, eps=eps, impl=impl)
    assert torch.equal(z > 0, k > 0)
    assert (k == 0).sum() >= 10, "too few values round to zero: the test would pass anyway"
    dz = layout_as(torch.randint(1, 5, shape, device=DEVICE).half(), layout)
    z.backward(dz)
    g = dz.double() * (k > 0)
    assert torch.equal(x.grad.double(), g)
    assert torch.equal(bn_bias.grad.double(), g.sum((0, 2, 3)))
    assert torch.equal(bn_weight.grad.double(), (g * x.double()).sum((0, 2, 3)))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_non_finite_values_propagate_as_in_pytorch(impl, residual, training):
    # As torch.relu's backward, a NaN output passes its gradient: without a residual the kernels' mask
    # (from x) decides, with one the reductions' (from z).
    shape = (2, 16, 4, 5)
    x, r, params = make_inputs(shape, torch.float32, residual=residual)
    x[0, 3, 1, 2] = float("nan")
    x[1, 5, 0, 0] = float("inf")
    if residual:
        r[1, 9, 2, 3] = float("nan")
    grad = torch.randn(shape, device=DEVICE)
    grad[0, 11, 3, 4] = float("nan")
    expected = run(x, r, params, torch.float32, "torch", training, grad)
    got = run(x, r, params, torch.float32, impl, training, grad)
    for name, a, e in zip(NAMES, got, expected):
        if e is None:
            continue
        if name.startswith("running"):
            # A channel holding Inf has mean Inf to PyTorch, NaN to the kernels' shifted moments
            # (Inf - Inf): non-finite either way, as its normalised values are.
            assert torch.equal(a.isfinite(), e.isfinite()), name
            continue
        assert torch.equal(a.isnan(), e.isnan()), name
        assert torch.equal(a.isinf(), e.isinf()), name
    assert got[0].isnan().any() and any(t.isnan().any() for t in got[3:] if t is not None)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_statistics_over_many_blocks_stay_accurate_when_the_mean_dwarfs_the_spread(impl):
    # Enough pixels for several levels of partial statistics (blocks, then slabs of them), and a mean
    # 1000 times the standard deviation, where E[x^2] - E[x]^2 in fp32 would lose every digit.
    shape = (3, 8, 160, 160)
    x = torch.randn(shape, device=DEVICE) + 1000.0
    ones, zeros = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    mean, var = zeros.clone(), ones.clone()
    resnext_kernels.batch_norm_relu(x, ones, zeros, mean, var, training=True, momentum=1.0, impl=impl)
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean((0, 2, 3)), rtol=0, atol=1e-3)
    torch.testing.assert_close(var.double(), x64.var((0, 2, 3)), rtol=1e-4, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_strided_batch_norm_parameters_give_what_contiguous_ones_give(impl, training):
    # bn_weight and bn_bias as views with gaps: the contiguous tensors' results (to rounding: even
    # PyTorch's CPU batch_norm takes another path for strided parameters).
    x, r, params = make_inputs((2, 8, 5, 5), torch.float32)
    grad = torch.randn(2, 8, 5, 5, device=DEVICE)
    want = run(x, r, params, torch.float32, impl, training, grad)
    strided = dict(params, **{k: layout_as(params[k], "strided") for k in ("bn_weight", "bn_bias")})
    assert not strided["bn_weight"].is_contiguous()
    got = run(x, r, strided, torch.float32, impl, training, grad)
    for name, have, expected in zip(NAMES, got, want, strict=True):
        torch.testing.assert_close(have, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_two_runs_are_bitwise_identical(impl, dtype):
    shape = (4, 32, 13, 11)
    x, r, params = make_inputs(shape, dtype, "channels_last")
    grad = torch.randn(shape, device=DEVICE).to(dtype)
    first = run(x, r, params, dtype, impl, True, grad)
    second = run(x, r, params, dtype, impl, True, grad)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def _ops(impl):
    if impl == "triton":
        from resnext_kernels.triton import ops

        return ops.batch_norm_relu_train, ops.batch_norm_relu_folded, ops.batch_norm_relu_backward
    namespace = getattr(torch.ops, "resnext_kernels" if DEVICE.type == "cuda" else "resnext_kernels_emulated")
    return (namespace.batch_norm_relu_train.default, namespace.batch_norm_relu_folded.default,
            namespace.batch_norm_relu_backward.default)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ops_pass_opcheck(impl, dtype):
    train_op, folded_op, backward_op = _ops(impl)
    shape = (2, 16, 3, 5)
    for layout in ("nchw", "channels_last"):
        x, r, params = make_inputs(shape, dtype, layout)
        gamma = params["bn_weight"].detach().requires_grad_()
        beta = params["bn_bias"].detach().requires_grad_()
        x, r = x.detach().requires_grad_(), r.detach().requires_grad_()
        for residual in (r, None):
            torch.library.opcheck(train_op, (x, residual, gamma, beta, 1e-5))
            torch.library.opcheck(folded_op, (x, residual, gamma, beta))
        torch.library.opcheck(train_op, (x, None, None, None, 1e-5))
        z, stats = train_op(x.detach(), r.detach(), gamma.detach(), beta.detach(), 1e-5)
        dz = layout_as(torch.randn(shape, device=DEVICE).to(dtype), "strided")
        for mean_var in ((stats[0], stats[1]), (None, None)):
            for output, relu_mask in ((None, True), (z, True), (None, False)):
                for need in ((True, True), (True, False), (False, True), (False, False)):
                    torch.library.opcheck(backward_op, (dz, x.detach(), output, stats[2], stats[3], *mean_var, 1e-5,
                                                        relu_mask, *need))


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_compiles_without_graph_breaks(impl):
    shape = (2, 16, 4, 5)
    x, r, params = make_inputs(shape, torch.float32)
    x.requires_grad_()

    def fn(x, r, training):
        return resnext_kernels.batch_norm_relu(x, params["bn_weight"], params["bn_bias"], params["running_mean"],
                                               params["running_var"], r, training=training, impl=impl)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for training in (True, False):
        for residual in (r, None):
            z = compiled(x, residual, training)
            (grad,) = torch.autograd.grad(z.sum(), x)
            assert z.isfinite().all() and grad.isfinite().all()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(residual=torch.zeros(2, 8, 3, 3)), "residual must have x's shape"),
        (dict(residual=torch.zeros(2, 8, 3, 4, dtype=torch.float64)), "residual's dtype"),
        (dict(residual="r"), "residual must be a Tensor"),
        (dict(bn_weight=torch.ones(7)), r"bn_weight must have shape \(8,\)"),
        (dict(running_var=None), "running_mean and running_var must both be"),
        (dict(x=torch.zeros(2, 8, 3)), "x must be 4-D"),
        (dict(x=torch.zeros(2, 8, 3, 4, dtype=torch.int32)), "x must be float16"),
        (dict(training=1), "training must be a bool"),
        (dict(impl="cudnn"), "impl must be one of"),
    ],
)
def test_bad_inputs_raise_value_error(change, message):
    args = dict(x=torch.randn(2, 8, 3, 4), bn_weight=torch.ones(8), bn_bias=torch.zeros(8),
                running_mean=torch.zeros(8), running_var=torch.ones(8), residual=torch.randn(2, 8, 3, 4),
                training=True, impl="torch")
    args.update(change)
    with pytest.raises(ValueError, match=message):
        resnext_kernels.batch_norm_relu(**args)


def test_training_with_one_value_per_channel_is_refused_like_batch_norm():
    x, ones = torch.randn(1, 4, 1, 1), torch.ones(4)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        resnext_kernels.batch_norm_relu(x, ones, ones, None, None, training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        F.batch_norm(x, None, None, ones, ones, True)


@pytest.mark.skipif(DEVICE.type != "cpu" or "cuda" not in KERNEL_IMPLS, reason="needs the host test build")
@pytest.mark.parametrize("dtype, layout", [(torch.bfloat16, "channels_last"), (torch.float32, "nchw")], ids=str)
def test_cuda_results_do_not_depend_on_the_schedule_of_threads(dtype, layout, monkeypatch):
    # As tests/test_cuda.py's test of the convolution: a race between warps of a block (the moments'
    # and reductions' shared-memory merges) shows as a difference between the schedules.
    shape = (3, 40, 9, 7)
    for residual in (False, True):
        x, r, params = make_inputs(shape, dtype, layout, residual)
        grad = torch.randn(shape, device=DEVICE).to(dtype)
        for training in (True, False):
            runs = []
            for schedule in ("lockstep", "warp-serial", "warp-serial-ascending"):
                monkeypatch.setenv("RESNEXT_KERNELS_EMULATE_SCHEDULE", schedule)
                runs.append(run(x, r, params, dtype, "cuda", training, grad, layout))
            for name, first, *others in zip(NAMES, *runs):
                assert all((first is None and other is None) or torch.equal(first, other) for other in others), \
                    f"{residual=} {training=}: {name}"


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_images_beyond_32_bit_pixel_indexing_are_refused(impl):
    # A 46341 x 46341 image (2^31 + 84 681 pixels), as an expanded view with no memory behind it.
    x = torch.randn(1, 8, 1, 1, device=DEVICE).expand(1, 8, 46341, 46341)
    ones = torch.ones(8, device=DEVICE)
    with pytest.raises(NotImplementedError, match=r"images of more than 2\^31 - 1 pixels"):
        resnext_kernels.batch_norm_relu(x, ones, ones, ones, ones, training=False, impl=impl)
    if impl == "cuda":  # the op itself checks what the kernels assume, for callers bypassing the Python API
        with pytest.raises(RuntimeError, match=r"images of more than 2\^31 - 1 pixels"):
            _ops(impl)[1](x, None, ones, ones)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_gives_empty_results_and_leaves_running_stats(impl, training):
    x, r, params = make_inputs((0, 8, 3, 4), torch.float32)
    grad = torch.randn(0, 8, 3, 4, device=DEVICE)
    z, mean, var, dx, dr, dgamma, dbeta = run(x, r, params, torch.float32, impl, training, grad)
    assert z.shape == dx.shape == dr.shape == (0, 8, 3, 4)
    assert torch.equal(mean, params["running_mean"]) and torch.equal(var, params["running_var"])
    assert torch.equal(dgamma, torch.zeros(8, device=DEVICE)) and torch.equal(dbeta, torch.zeros(8, device=DEVICE))
