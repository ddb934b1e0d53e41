"""Fake kernels and autograd for the extension's ops, registered from Python (schemas are in
csrc/op_schemas.h), for the nvcc build's namespace and the host test build's alike."""

import functools

import torch

from .._autograd import register as register_autograd
from .._autograd import register_batch_norm_relu
from .. import outputs


# Every op of csrc/op_schemas.h, which a build older than this Python side may lack.
OP_NAMES = ("conv_bn_relu_folded", "grouped_conv", "conv_bn_relu_train", "conv_bn_relu_backward",
            "batch_norm_relu_train", "batch_norm_relu_folded", "batch_norm_relu_backward")


def _defined(namespace, name):
    try:
        torch._C._dispatch_find_schema_or_throw(f"{namespace}::{name}", "")
    except RuntimeError:
        return False
    return True


@functools.cache
def register_namespace(namespace):
    """Registers fake kernels and autograd for ``namespace``'s ops: None, or why the build cannot
    serve (it lacks some of the ops: built from older sources)."""
    missing = [name for name in OP_NAMES if not _defined(namespace, name)]
    if missing:
        return (f"the built extension lacks the ops {', '.join(missing)}: it was built from older sources than "
                f"this Python side; rebuild it (pip install --no-build-isolation -e .)")
    ops = getattr(torch.ops, namespace)

    @torch.library.register_fake(f"{namespace}::conv_bn_relu_folded")
    def _(x, weight, scale, shift, stride, dilation, groups):
        return outputs.conv_output(x, weight, stride)

    @torch.library.register_fake(f"{namespace}::grouped_conv")
    def _(x, weight, stride, dilation, groups):
        return outputs.conv_output(x, weight, stride)

    @torch.library.register_fake(f"{namespace}::conv_bn_relu_train")
    def _(x, weight, bn_weight, bn_bias, eps, stride, dilation, groups):
        y = outputs.conv_output(x, weight, stride)
        return torch.empty_like(y), y, outputs.stats_buffer(x, weight.shape[0])

    @torch.library.register_fake(f"{namespace}::conv_bn_relu_backward")
    def _(grad_output, x, weight, y, scale, shift, mean, var, eps, stride, dilation, groups, need_dx, need_dw,
          need_dparams):
        return outputs.conv_gradients(x, weight, need_dx, need_dw, need_dparams)

    register_autograd(ops.conv_bn_relu_train.default, ops.conv_bn_relu_folded.default, ops.grouped_conv.default,
                      ops.conv_bn_relu_backward.default)

    @torch.library.register_fake(f"{namespace}::batch_norm_relu_train")
    def _(x, residual, bn_weight, bn_bias, eps):
        return outputs.like_x(x), outputs.stats_buffer(x, x.shape[1])

    @torch.library.register_fake(f"{namespace}::batch_norm_relu_folded")
    def _(x, residual, scale, shift):
        return outputs.like_x(x)

    @torch.library.register_fake(f"{namespace}::batch_norm_relu_backward")
    def _(grad_output, x, output, scale, shift, mean, var, eps, relu_mask, need_dx, need_dparams):
        return outputs.batch_norm_gradients(x, output is not None, need_dx, need_dparams)

    register_batch_norm_relu(ops.batch_norm_relu_train.default, ops.batch_norm_relu_folded.default,
                             ops.batch_norm_relu_backward.default)
    return None
