"""The kernels as torch.library custom ops (torch.ops.resnext_kernels.triton_*), with fake kernels and
autograd, so torch.compile traces them without graph breaks and opcheck holds.

The namespace is shared with the C++ extension's TORCH_LIBRARY(resnext_kernels); custom_op adds to it
as a fragment, which works whichever of the two registers first.
"""

from typing import Optional

import torch
from torch import Tensor

from .._autograd import register as register_autograd
from .._autograd import register_batch_norm_relu
from .. import outputs
from . import backward as _backward
from . import batch_norm_relu as _batch_norm_relu
from . import conv as _conv


def _dense(*per_channel):
    # The kernels index per-channel vectors without strides.
    return [None if t is None else t.contiguous() for t in per_channel]


@torch.library.custom_op("resnext_kernels::triton_conv_bn_relu_train", mutates_args=())
def conv_bn_relu_train(
    x: Tensor, weight: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float,
    stride: int, dilation: int, groups: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm with batch statistics: ``(z, y, stats)``, y the convolution output (kept for backward),
    stats rows (mean, biased var, scale, shift) in the accumulation dtype."""
    return _conv.train_forward(x, weight, *_dense(bn_weight, bn_bias), eps, stride, dilation, groups)


@conv_bn_relu_train.register_fake
def _(x, weight, bn_weight, bn_bias, eps, stride, dilation, groups):
    y = outputs.conv_output(x, weight, stride)
    return torch.empty_like(y), y, outputs.stats_buffer(x, weight.shape[0])


@torch.library.custom_op("resnext_kernels::triton_conv_scale_shift_relu", mutates_args=())
def conv_scale_shift_relu(
    x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, stride: int, dilation: int, groups: int,
) -> Tensor:
    """Inference, BatchNorm folded: ``relu(conv(x) * scale + shift)`` in one kernel."""
    return _conv.folded_forward(x, weight, *_dense(scale, shift), stride, dilation, groups)


@conv_scale_shift_relu.register_fake
def _(x, weight, scale, shift, stride, dilation, groups):
    return outputs.conv_output(x, weight, stride)


@torch.library.custom_op("resnext_kernels::triton_grouped_conv", mutates_args=())
def grouped_conv(x: Tensor, weight: Tensor, stride: int, dilation: int, groups: int) -> Tensor:
    """``conv2d(x, weight, None, stride, padding=dilation, dilation, groups)``; no autograd (used by
    backward)."""
    return _conv.conv(x, weight, stride, dilation, groups)


@grouped_conv.register_fake
def _(x, weight, stride, dilation, groups):
    return outputs.conv_output(x, weight, stride)


@torch.library.custom_op("resnext_kernels::triton_conv_bn_relu_backward", mutates_args=())
def conv_bn_relu_backward(
    dz: Tensor, x: Tensor, weight: Tensor, y: Tensor, scale: Tensor, shift: Tensor,
    mean: Optional[Tensor], var: Optional[Tensor], eps: float, stride: int, dilation: int, groups: int,
    need_dx: bool, need_dw: bool, need_dparams: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dw, dparams)`` of relu(bn(conv(x))); see backward.backward."""
    return _backward.backward(dz, x, weight, y, *_dense(scale, shift, mean, var), eps, stride, dilation, groups,
                              need_dx, need_dw, need_dparams)


@conv_bn_relu_backward.register_fake
def _(dz, x, weight, y, scale, shift, mean, var, eps, stride, dilation, groups, need_dx, need_dw, need_dparams):
    return outputs.conv_gradients(x, weight, need_dx, need_dw, need_dparams)


register_autograd(conv_bn_relu_train, conv_scale_shift_relu, grouped_conv, conv_bn_relu_backward)


@torch.library.custom_op("resnext_kernels::triton_batch_norm_relu_train", mutates_args=())
def batch_norm_relu_train(
    x: Tensor, residual: Optional[Tensor], bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float,
) -> tuple[Tensor, Tensor]:
    """The standalone BatchNorm + ReLU with batch statistics: ``(z, stats)``."""
    return _batch_norm_relu.train_forward(x, residual, *_dense(bn_weight, bn_bias), eps)


@batch_norm_relu_train.register_fake
def _(x, residual, bn_weight, bn_bias, eps):
    return outputs.like_x(x), outputs.stats_buffer(x, x.shape[1])


@torch.library.custom_op("resnext_kernels::triton_batch_norm_relu_folded", mutates_args=())
def batch_norm_relu_folded(x: Tensor, residual: Optional[Tensor], scale: Tensor, shift: Tensor) -> Tensor:
    """Inference: ``relu(x * scale + shift [+ residual])``."""
    return _batch_norm_relu.folded_forward(x, residual, *_dense(scale, shift))


@batch_norm_relu_folded.register_fake
def _(x, residual, scale, shift):
    return outputs.like_x(x)


@torch.library.custom_op("resnext_kernels::triton_batch_norm_relu_backward", mutates_args=())
def batch_norm_relu_backward(
    grad_output: Tensor, x: Tensor, output: Optional[Tensor], scale: Tensor, shift: Tensor, mean: Optional[Tensor],
    var: Optional[Tensor], eps: float, relu_mask: bool, need_dx: bool, need_dparams: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dparams, g)`` of the standalone BatchNorm + ReLU; see batch_norm_relu.backward."""
    return _batch_norm_relu.backward(grad_output, x, output, *_dense(scale, shift, mean, var), eps, relu_mask, need_dx,
                                     need_dparams)


@batch_norm_relu_backward.register_fake
def _(grad_output, x, output, scale, shift, mean, var, eps, relu_mask, need_dx, need_dparams):
    return outputs.batch_norm_gradients(x, output is not None, need_dx, need_dparams)


register_batch_norm_relu(batch_norm_relu_train, batch_norm_relu_folded, batch_norm_relu_backward)
