"""Fake kernels and autograd for the extension's ops, registered from Python (schemas are in
csrc/op_schemas.h), for the nvcc build's namespace and the host test build's alike."""

import functools

import torch

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
    def _(grad_output, x, weight, y, scale, shift, mean, var, eps, stride, dilation, groups, need_dx, need_dw):
        dx = torch.empty_like(x, memory_format=output_memory_format(x)) if need_dx else x.new_empty((0,))
        dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dw else weight.new_empty((0,))
        return dx, dw, torch.empty((2, weight.shape[0]), dtype=accumulate_dtype(x), device=x.device)

    def train_setup(ctx, inputs, output):
        x, weight, bn_weight, bn_bias, eps, stride, dilation, groups = inputs
        _, y, stats = output
        ctx.mark_non_differentiable(y, stats)
        ctx.save_for_backward(x, weight, y, stats)
        ctx.args = (eps, stride, dilation, groups)
        ctx.param_dtypes = tuple(None if t is None else t.dtype for t in (bn_weight, bn_bias))

    def train_backward(ctx, dz, _dy, _dstats):
        x, weight, y, stats = ctx.saved_tensors
        eps, stride, dilation, groups = ctx.args
        need = ctx.needs_input_grad
        dx, dw, dparams = ops.conv_bn_relu_backward(dz, x, weight, y, stats[2], stats[3], stats[0], stats[1], eps,
                                                    stride, dilation, groups, need[0], need[1])
        dgamma, dbeta = (d.to(dtype) if dtype is not None and needed else None
                         for d, dtype, needed in zip(dparams, ctx.param_dtypes, need[2:4]))
        return dx if need[0] else None, dw if need[1] else None, dgamma, dbeta, None, None, None, None

    torch.library.register_autograd(f"{namespace}::conv_bn_relu_train", train_backward, setup_context=train_setup)

    def folded_setup(ctx, inputs, output):
        x, weight, scale, shift, stride, dilation, groups = inputs
        ctx.save_for_backward(x, weight, scale, shift)
        ctx.args = (stride, dilation, groups)

    def folded_backward(ctx, dz):
        x, weight, scale, shift = ctx.saved_tensors
        stride, dilation, groups = ctx.args
        need = ctx.needs_input_grad
        # The inference kernel keeps no y: recompute it (one read of x, one write of y).
        y = ops.grouped_conv(x, weight, stride, dilation, groups)
        dx, dw, dparams = ops.conv_bn_relu_backward(dz, x, weight, y, scale, shift, None, None, 0.0, stride, dilation,
                                                    groups, need[0], need[1])
        return (dx if need[0] else None, dw if need[1] else None,
                dparams[0].to(scale.dtype) if need[2] else None, dparams[1].to(shift.dtype) if need[3] else None,
                None, None, None)

    torch.library.register_autograd(f"{namespace}::conv_bn_relu_folded", folded_backward, setup_context=folded_setup)
