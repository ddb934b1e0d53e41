"""The public ops, ``grouped_conv_bn_relu`` and ``batch_norm_relu``: input checks, autocast, backend
choice, BatchNorm bookkeeping.

Kernel backends (Triton, CUDA) only see validated inputs and implement differentiable primitives;
everything BatchNorm-specific that is not per-element work lives here once:

* ``batch_stats_forward(x, weight, bn_weight, bn_bias, eps, stride, dilation, groups)``
  -> ``(z, mean, var)`` with the biased batch variance, in ``accumulate_dtype(x.dtype)``;
* ``folded_forward(x, weight, scale, shift, stride, dilation, groups)`` -> ``z``, BN folded into a
  per-channel scale and shift in ``accumulate_dtype(x.dtype)`` (fp32, or fp64 for fp64 inputs);
* ``batch_norm_relu_batch_stats(x, residual, bn_weight, bn_bias, eps)`` -> ``(z, mean, var)`` and
  ``batch_norm_relu_folded(x, residual, scale, shift)`` -> ``z``, the same for the standalone op."""

import numbers

import torch
from torch.autograd import forward_ad

from . import backends
from .outputs import accumulate_dtype, output_memory_format, output_size

IMPLS = ("auto", "torch", "triton", "cuda")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def grouped_conv_bn_relu(
    x,
    weight,
    bn_weight,
    bn_bias,
    running_mean,
    running_var,
    *,
    stride=1,
    dilation=1,
    groups,
    training,
    momentum=0.1,
    eps=1e-5,
    impl="auto",
):
    """``relu(batch_norm(conv2d(x, weight, None, stride, padding=dilation, dilation, groups)))``.

    BatchNorm follows ``F.batch_norm`` exactly: with ``training=True`` the batch statistics
    normalise (biased variance) and, when the running buffers are given, are blended into them in
    place (unbiased variance) with factor ``momentum``; with ``training=False`` the running
    statistics normalise. Differentiable in ``x``, ``weight``, ``bn_weight`` and ``bn_bias``. The
    output has ``x``'s dtype and memory format.

    ``impl``: ``"torch"`` (reference: cuDNN on GPU), ``"triton"``, ``"cuda"`` or ``"auto"`` (the
    fastest backend available for ``x``'s device).
    """
    if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor):
        # As PyTorch's autocast does for conv2d + batch_norm: the convolution in the autocast dtype
        # (so an fp32 weight meets the low-precision x of a previous layer), BatchNorm's parameters
        # and statistics as they are.
        x, weight = x.to(autocast_conv_dtype(x)), weight.to(autocast_conv_dtype(weight))
    _check_inputs(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, dilation, groups,
                  training, momentum, eps, impl)
    # A stride or dilation of at least the image's longer side acts as that side: one output pixel per
    # row and column, every tap but the centre in the padding. The kernels take them as 32-bit ints.
    longest = max(x.shape[2], x.shape[3])
    kernel_stride, kernel_dilation = min(stride, longest), min(dilation, longest)
    backend = _resolve(impl, x, (x, weight, bn_weight, bn_bias, running_mean, running_var),
                       image_pixels=x.shape[2] * x.shape[3], image_side=longest)
    args = (x, weight, bn_weight, bn_bias, running_mean, running_var, stride, dilation, groups,
            bool(training), float(momentum), float(eps))
    if backend is backends.reference or (x.shape[0] == 0 and training):
        # The reference also owns batch statistics of an empty batch: F.batch_norm leaves the running
        # stats alone there.
        return backends.reference.grouped_conv_bn_relu(*args)
    return _fused(backend, *args[:6], kernel_stride, kernel_dilation, *args[8:])


def _fused(backend, x, weight, bn_weight, bn_bias, running_mean, running_var, stride, dilation,
           groups, training, momentum, eps):
    return _batch_norm(
        x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps,
        lambda: backend.batch_stats_forward(x, weight, bn_weight, bn_bias, eps, stride, dilation, groups),
        lambda scale, shift: backend.folded_forward(x, weight, scale, shift, stride, dilation, groups),
    )


def _batch_norm(x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, batch_stats, folded):
    """BatchNorm's choice between the batch statistics (``batch_stats()`` -> (z, mean, var), then the
    running-stats update) and the running ones (``folded(scale, shift)`` -> z); z in x's memory format."""
    memory_format = output_memory_format(x)
    with torch.autocast(x.device.type, enabled=False):
        if training:
            z, mean, var = batch_stats()
            if running_mean is not None:
                count = z.numel() // z.shape[1]
                _update_running_stats(running_mean, running_var, mean, var, count, momentum)
        else:
            scale, shift = fold_batch_norm(bn_weight, bn_bias, running_mean, running_var, eps,
                                           accumulate_dtype(x.dtype))
            z = folded(scale, shift)
    return z.contiguous(memory_format=memory_format)


def batch_norm_relu(
    x,
    bn_weight,
    bn_bias,
    running_mean,
    running_var,
    residual=None,
    *,
    training,
    momentum=0.1,
    eps=1e-5,
    impl="auto",
):
    """``relu(batch_norm(x) + residual)``, or ``relu(batch_norm(x))`` without a residual: the
    bottleneck's bn1 + relu and bn3 + add + relu. In activation-sized transfers, forward + backward,
    3 + 5 where eager PyTorch's separate batch_norm, add and ReLU move 5 + 8 (with the residual 4 + 7
    against 8 + 8).

    ``batch_norm`` is ``F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training,
    momentum, eps)`` exactly as in grouped_conv_bn_relu; its output is rounded to x's dtype before the
    residual is added, as the unfused ``out = bn(x); out += residual`` stores it. ``residual`` has x's
    shape and dtype (any layout). Differentiable in ``x``, ``residual``, ``bn_weight`` and
    ``bn_bias``. The output has ``x``'s dtype and memory format. Under autocast nothing is cast, as
    for PyTorch's batch_norm.
    """
    _check_batch_norm_relu_inputs(x, bn_weight, bn_bias, running_mean, running_var, residual, training,
                                  momentum, eps, impl)
    backend = _resolve(impl, x, (x, residual, bn_weight, bn_bias, running_mean, running_var),
                       image_pixels=x.shape[2] * x.shape[3])
    training, momentum, eps = bool(training), float(momentum), float(eps)
    if backend is backends.reference or (x.shape[0] == 0 and training):
        return backends.reference.batch_norm_relu(x, residual, bn_weight, bn_bias, running_mean, running_var,
                                                  training, momentum, eps)
    return _batch_norm(
        x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps,
        lambda: backend.batch_norm_relu_batch_stats(x, residual, bn_weight, bn_bias, eps),
        lambda scale, shift: backend.batch_norm_relu_folded(x, residual, scale, shift),
    )


def _resolve(impl, x, inputs, **image):
    """backends.resolve's choice, except where the kernels' ops have no rule: forward-mode AD
    (torch.func.jvp, torch.autograd.forward_ad; their tangents would be dropped) and torch.func's
    transforms. There "auto" takes the reference and a named kernel backend raises."""
    backend = backends.resolve(impl, x.device, **image)
    if backend is not backends.reference and _transformed(inputs):
        if impl != "auto":
            raise NotImplementedError(f"impl={impl!r} has no forward-mode AD (torch.func.jvp, "
                                      "torch.autograd.forward_ad) and no torch.func transforms (grad, vmap); "
                                      "impl='torch' runs them")
        return backends.reference
    return backend


def _transformed(tensors):
    # Forward-AD levels are private too. Neither check sees through torch.compile (see README).
    if torch.compiler.is_compiling():
        return False
    if backends.reference.functorch_transform_active():
        return True
    return forward_ad._current_level >= 0 and any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def autocast_conv_dtype(t):
    """The dtype a convolution of tensor ``t`` runs in: autocast's where autocast is on for ``t``'s
    device and casts ``t`` (any floating dtype but float64), else ``t``'s own."""
    if not t.is_floating_point() or t.dtype == torch.float64:
        return t.dtype
    # Autocast is not asked about devices it does not know, such as meta, where asking raises. Dynamo
    # (torch 2.11) cannot trace is_autocast_available; a compiled graph's tensors are on real devices.
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(t.device.type):
        return t.dtype
    return torch.get_autocast_dtype(t.device.type) if torch.is_autocast_enabled(t.device.type) else t.dtype


def fold_batch_norm(bn_weight, bn_bias, mean, var, eps, dtype):
    """Per-channel ``(scale, shift)`` in ``dtype`` with ``bn(y) = y * scale + shift``; differentiable."""
    scale = torch.rsqrt(var.to(dtype) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(dtype)
    shift = -mean.to(dtype) * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(dtype)
    return scale, shift


@torch.no_grad()
def _update_running_stats(running_mean, running_var, mean, var, count, momentum):
    # F.batch_norm's rule, in the statistics' precision: running = (1 - momentum) * running +
    # momentum * batch, with the unbiased variance stored.
    unbiased = var * (count / (count - 1))
    running_mean.copy_(running_mean.to(mean.dtype) * (1 - momentum) + mean * momentum)
    running_var.copy_(running_var.to(var.dtype) * (1 - momentum) + unbiased * momentum)


def _type_name(value):
    # numpy.bool's __name__ is "bool": a message saying "must be a bool, got bool" would explain nothing.
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {_type_name(value)}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_inputs(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, dilation, groups,
                  training, momentum, eps, impl):
    _check_common(x, training, momentum, eps, impl)
    _positive_int(stride, "stride")
    _positive_int(dilation, "dilation")
    _positive_int(groups, "groups")

    n, c_in, h, w = x.shape
    if c_in < 1:
        raise ValueError(f"x must have at least one channel, got shape {tuple(x.shape)}")
    if c_in % groups:
        raise ValueError(f"x's {c_in} channels are not divisible by groups={groups}")

    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a Tensor, got {_type_name(weight)}")
    c_out = weight.shape[0] if weight.dim() == 4 else -1
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (c_in // groups, 3, 3) or c_out % groups or c_out == 0:
        raise ValueError(
            f"weight must have shape (C_out, C_in/groups, 3, 3) = (k*{groups}, {c_in // groups}, 3, 3), "
            f"got {tuple(weight.shape)}"
        )
    # The device first: under autocast a weight on another device is cast by that device's rule.
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight's dtype {weight.dtype} differs from x's {x.dtype}")

    _check_batch_norm_args(x, c_out, bn_weight, bn_bias, running_mean, running_var, training)
    if training:
        per_channel = n * output_size(h, stride) * output_size(w, stride)
        _check_values_per_channel(per_channel, x)


def _check_batch_norm_args(x, channels, bn_weight, bn_bias, running_mean, running_var, training):
    bn_tensors = {"bn_weight": bn_weight, "bn_bias": bn_bias, "running_mean": running_mean,
                  "running_var": running_var}
    allowed = {x.dtype, torch.float32} if x.dtype in (torch.float16, torch.bfloat16) else {x.dtype}
    bn_dtypes = set()
    for name, t in bn_tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a Tensor or None, got {_type_name(t)}")
        if tuple(t.shape) != (channels,):
            raise ValueError(f"{name} must have shape ({channels},), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if t.dtype not in allowed:
            raise ValueError(f"{name} has dtype {t.dtype}; with x in {x.dtype} it must be one of "
                             f"{sorted(map(str, allowed))}")
        bn_dtypes.add(t.dtype)
    if len(bn_dtypes) > 1:
        raise ValueError(f"bn_weight, bn_bias, running_mean and running_var must share one dtype, got "
                         f"{sorted(map(str, bn_dtypes))}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be Tensors or both be None")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")


def _check_values_per_channel(per_channel, x):
    if per_channel == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)} "
            f"(one output value per channel)"
        )


def check_impl(impl):
    """``impl`` when it names a backend (or "auto"); else ValueError."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}; got {impl!r}")
    return impl


def _check_common(x, training, momentum, eps, impl):
    check_impl(impl)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a Tensor, got {_type_name(x)}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if not isinstance(training, bool):
        raise ValueError(f"training must be a bool, got {_type_name(training)}")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise ValueError(f"momentum must be a number, got {_type_name(momentum)}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    if training and eps == 0:
        # As F.batch_norm: a constant channel's batch variance is 0, and 1 / sqrt(0) is no normalisation.
        raise ValueError("eps must be positive when training, got 0")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"x must have a non-empty spatial size, got shape {tuple(x.shape)}")


def _check_batch_norm_relu_inputs(x, bn_weight, bn_bias, running_mean, running_var, residual, training,
                                  momentum, eps, impl):
    _check_common(x, training, momentum, eps, impl)
    if x.shape[1] < 1:
        raise ValueError(f"x must have at least one channel, got shape {tuple(x.shape)}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise ValueError(f"residual must be a Tensor or None, got {_type_name(residual)}")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise ValueError(f"residual's dtype {residual.dtype} differs from x's {x.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    _check_batch_norm_args(x, x.shape[1], bn_weight, bn_bias, running_mean, running_var, training)
    if training:
        _check_values_per_channel(x.numel() // x.shape[1], x)
