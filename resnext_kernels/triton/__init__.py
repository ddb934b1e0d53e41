"""impl="triton": fused grouped 3x3 convolution + BatchNorm + ReLU in Triton, forward and backward.

Modules: ``config`` (tile shapes, group packing, precision policy, autotuning), ``conv`` (forward
kernels; why training writes y rather than recomputing it), ``backward`` (BN + ReLU backward folded
into dgrad and wgrad), ``batch_norm_relu`` (the standalone BatchNorm + ReLU), ``ops`` (torch.library
registration and autograd). On CPU tensors the same kernels run in Triton's interpreter when
TRITON_INTERPRET=1 is set before this package is imported: a test instrument, not a CPU backend.
"""

import os

# Read once, like @triton.jit does when the kernels are decorated on import.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

try:
    from . import ops
except ModuleNotFoundError as error:
    if error.name is None or error.name.split(".")[0] != "triton":
        raise
    _IMPORT_ERROR = f"impl='triton' needs the triton package, which failed to import ({error})"
else:
    _IMPORT_ERROR = None


def unavailable_reason(device):
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if _INTERPRET:
            return None
        return ("impl='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before "
                "importing resnext_kernels (a test instrument; use a CUDA device for speed)")
    return f"impl='triton' runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got a tensor on {device}"


def batch_stats_forward(x, weight, bn_weight, bn_bias, eps, stride, dilation, groups):
    """``(z, mean, var)``: BatchNorm with the batch's statistics (biased variance)."""
    z, _, stats = ops.conv_bn_relu_train(x, weight, bn_weight, bn_bias, float(eps), stride, dilation, groups)
    return z, stats[0], stats[1]


def folded_forward(x, weight, scale, shift, stride, dilation, groups):
    """``relu(conv(x) * scale + shift)``, BatchNorm folded into per-channel scale and shift."""
    return ops.conv_scale_shift_relu(x, weight, scale, shift, stride, dilation, groups)


def batch_norm_relu_batch_stats(x, residual, bn_weight, bn_bias, eps):
    """``(z, mean, var)`` of ``relu(batch_norm(x) [+ residual])`` with the batch's statistics."""
    z, stats = ops.batch_norm_relu_train(x, residual, bn_weight, bn_bias, float(eps))
    return z, stats[0], stats[1]


def batch_norm_relu_folded(x, residual, scale, shift):
    """``relu(x * scale + shift [+ residual])``."""
    return ops.batch_norm_relu_folded(x, residual, scale, shift)
