"""impl="torch": the reference. F.conv2d + F.batch_norm (+ the residual) + ReLU, i.e. cuDNN on a GPU."""

import torch
import torch.nn.functional as F

from .outputs import output_memory_format


def unavailable_reason(device):
    return None


def grouped_conv_bn_relu(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, dilation,
                         groups, training, momentum, eps):
    y = F.conv2d(x, weight, None, stride, dilation, dilation, groups)
    z = torch.relu(F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps))
    return _laid_out_as(z, x)


def batch_norm_relu(x, residual, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps):
    out = F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    if residual is not None:
        out = out + residual
    return _laid_out_as(torch.relu(out), x)


def _laid_out_as(z, x):
    # Under vmap no layout can be asked for or set, whichever input is batched.
    if functorch_transform_active():
        return z
    return z.contiguous(memory_format=output_memory_format(x))


def functorch_transform_active():
    """Whether a torch.func transform (jvp, grad, vmap...) is running. A private attribute, as PyTorch
    has no public way to ask, and one Dynamo does not trace: a compiled graph answers False."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None
