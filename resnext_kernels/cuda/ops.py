"""Fake kernels and autograd for the extension's ops, registered from Python (schemas are in
csrc/op_schemas.h), for the nvcc build's namespace and the host test build's alike."""

import functools
import inspect

import torch

from .._autograd import register as register_autograd
from .._autograd import register_batch_norm_relu
from .. import outputs


def conv_bn_relu_folded(x, weight, scale, shift, stride, dilation, groups):
    return outputs.conv_output(x, weight, stride)


def grouped_conv(x, weight, stride, dilation, groups):
    return outputs.conv_output(x, weight, stride)


def conv_bn_relu_train(x, weight, bn_weight, bn_bias, eps, stride, dilation, groups):
    y = outputs.conv_output(x, weight, stride)
    return torch.empty_like(y), y, outputs.stats_buffer(x, weight.shape[0])


def conv_bn_relu_backward(grad_output, x, weight, y, scale, shift, mean, var, eps, stride, dilation, groups,
                          need_dx, need_dw, need_dparams):
    return outputs.conv_gradients(x, weight, need_dx, need_dw, need_dparams)


def batch_norm_relu_train(x, residual, bn_weight, bn_bias, eps):
    return outputs.like_x(x), outputs.stats_buffer(x, x.shape[1])


def batch_norm_relu_folded(x, residual, scale, shift):
    return outputs.like_x(x)


def batch_norm_relu_backward(grad_output, x, output, scale, shift, mean, var, eps, relu_mask, need_dx, need_dparams):
    return outputs.batch_norm_gradients(x, output is not None, need_dx, need_dparams)


# Every op of csrc/op_schemas.h with its fake kernel, whose parameters are the schema's arguments.
FAKES = {fake.__name__: fake for fake in (conv_bn_relu_folded, grouped_conv, conv_bn_relu_train, conv_bn_relu_backward,
                                          batch_norm_relu_train, batch_norm_relu_folded, batch_norm_relu_backward)}


def _argument_names(namespace, name):
    """The arguments of ``namespace::name`` as built, or None when the build lacks the op."""
    try:
        torch._C._dispatch_find_schema_or_throw(f"{namespace}::{name}", "")
    except RuntimeError:
        return None
    return [argument.name for argument in getattr(getattr(torch.ops, namespace), name).default._schema.arguments]


@functools.cache
def register_namespace(namespace):
    """Registers fake kernels and autograd for ``namespace``'s ops: None, or why the build cannot
    serve (built from older sources, it lacks ops or has them with other arguments)."""
    stale = [name for name, fake in FAKES.items()
             if _argument_names(namespace, name) != list(inspect.signature(fake).parameters)]
    if stale:
        return (f"the built extension lacks the ops {', '.join(stale)} as this Python side calls them: it was "
                f"built from older sources; rebuild it (pip install --no-build-isolation -e .)")
    for name, fake in FAKES.items():
        torch.library.register_fake(f"{namespace}::{name}")(fake)
    ops = getattr(torch.ops, namespace)
    register_autograd(ops.conv_bn_relu_train.default, ops.conv_bn_relu_folded.default, ops.grouped_conv.default,
                      ops.conv_bn_relu_backward.default)
    register_batch_norm_relu(ops.batch_norm_relu_train.default, ops.batch_norm_relu_folded.default,
                             ops.batch_norm_relu_backward.default)
    return None
