"""Fake kernels and autograd for the extension's ops, registered from Python (schemas are in
csrc/op_schemas.h), for the nvcc build's namespace and the host test build's alike."""

import functools

import torch

from .._autograd import register as register_autograd
from .._autograd import register_batch_norm_relu
from ..functional import accumulate_dtype, output_memory_format


def _conv_output(x, weight, stride):
    h_out = (x.shape[2] - 1) // stride + 1
    w_out = (x.shape[3] - 1) // stride + 1
    return torch.empty((x.shape[0], weight.shape[0], h_out, w_out), dtype=x.dtype, device=x.device,
                       memory_format=output_memory_format(x))


def _defined(namespace, name):
    # A build older than this Python side lacks the newer schemas: register what it has.
    try:
        torch._C._dispatch_find_schema_or_throw(f"{namespace}::{name}", "")
    except RuntimeError:
        return False
    return True


@functools.cache
def register_namespace(namespace):
    ops = getattr(torch.ops, namespace)

    @torch.library.register_fake(f"{namespace}::conv_bn_relu_folded")
    def _(x, weight, scale, shift, stride, dilation, groups):
        return _conv_output(x, weight, stride)

    if not _defined(namespace, "grouped_conv"):
        return

    @torch.library.register_fake(f"{namespace}::grouped_conv")
    def _(x, weight, stride, dilation, groups):
        return _conv_output(x, weight, stride)

    @torch.library.register_fake(f"{namespace}::conv_bn_relu_train")
    def _(x, weight, bn_weight, bn_bias, eps, stride, dilation, groups):
        y = _conv_output(x, weight, stride)
        stats = torch.empty((4, weight.shape[0]), dtype=accumulate_dtype(x), device=x.device)
        return torch.empty_like(y), y, stats

    if not _defined(namespace, "conv_bn_relu_backward"):
        return

    @torch.library.register_fake(f"{namespace}::conv_bn_relu_backward")
    def _(grad_output, x, weight, y, scale, shift, mean, var, eps, stride, dilation, groups, need_dx, need_dw,
          need_dparams):
        dx = torch.empty_like(x, memory_format=output_memory_format(x)) if need_dx else x.new_empty((0,))
        dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dw else weight.new_empty((0,))
        dparams_shape = (2, weight.shape[0]) if need_dparams else (0,)
        return dx, dw, torch.empty(dparams_shape, dtype=accumulate_dtype(x), device=x.device)

    register_autograd(ops.conv_bn_relu_train.default, ops.conv_bn_relu_folded.default, ops.grouped_conv.default,
                      ops.conv_bn_relu_backward.default)

    if not _defined(namespace, "batch_norm_relu_train"):
        return

    @torch.library.register_fake(f"{namespace}::batch_norm_relu_train")
    def _(x, residual, bn_weight, bn_bias, eps):
        z = torch.empty_like(x, memory_format=output_memory_format(x))
        return z, torch.empty((4, x.shape[1]), dtype=accumulate_dtype(x), device=x.device)

    @torch.library.register_fake(f"{namespace}::batch_norm_relu_folded")
    def _(x, residual, scale, shift):
        return torch.empty_like(x, memory_format=output_memory_format(x))

    @torch.library.register_fake(f"{namespace}::batch_norm_relu_backward")
    def _(grad_output, x, output, scale, shift, mean, var, eps, relu_mask, need_dx, need_dparams):
        dx = torch.empty_like(x, memory_format=output_memory_format(x)) if need_dx else x.new_empty((0,))
        dparams_shape = (2, x.shape[1]) if need_dparams else (0,)
        g = torch.empty_like(x, memory_format=output_memory_format(x)) if output is not None else x.new_empty((0,))
        return dx, torch.empty(dparams_shape, dtype=accumulate_dtype(x), device=x.device), g

    register_batch_norm_relu(ops.batch_norm_relu_train.default, ops.batch_norm_relu_folded.default,
                             ops.batch_norm_relu_backward.default)
