"""impl="cuda": the hand-written CUDA kernels of resnext_kernels._C (sources in csrc/).

On CPU tensors, with RESNEXT_KERNELS_CUDA_EMULATE=1, the same kernels run through the host test
build (see emulation.py): the test suite's way to check their logic without a GPU.
"""

import functools

import torch

from .._extension import BUILD_HINT, LOAD_ERROR
from . import emulation
from .ops import register_namespace

_STALE_BUILD = register_namespace("resnext_kernels") if LOAD_ERROR is None else None
MIN_CAPABILITY = (8, 0)


def unavailable_reason(device):
    if device.type == "cpu" and emulation.enabled():
        return emulation.load() or register_namespace(emulation.NAMESPACE)
    if device.type != "cuda":
        return (f"impl='cuda' runs on CUDA tensors, got a tensor on {device} "
                "(RESNEXT_KERNELS_CUDA_EMULATE=1 runs the kernels' host test build on CPU tensors, for tests)")
    if LOAD_ERROR is not None:
        return (f"impl='cuda' needs the CUDA extension resnext_kernels._C, which was not built or failed to load "
                f"({LOAD_ERROR}). {BUILD_HINT}")
    if _STALE_BUILD is not None:
        return f"impl='cuda': {_STALE_BUILD}"
    # Without a GPU (fake CUDA tensors: tracing, export) there is no capability to ask for.
    if torch.cuda.is_available():
        return _too_old(device.index if device.index is not None else torch.cuda.current_device())
    return None


@functools.cache
def _too_old(device_index):
    capability = torch.cuda.get_device_capability(device_index)
    if capability < MIN_CAPABILITY:
        return (f"impl='cuda' needs a GPU of compute capability {'.'.join(map(str, MIN_CAPABILITY))} or newer "
                f"(its kernels use cp.async and bf16 mma.sync); {torch.cuda.get_device_name(device_index)} is "
                f"{'.'.join(map(str, capability))}")
    return None


def _ops(device):
    return getattr(torch.ops, emulation.NAMESPACE if device.type == "cpu" else "resnext_kernels")


def folded_forward(x, weight, scale, shift, stride, dilation, groups):
    """``relu(conv(x) * scale + shift)``, BatchNorm folded into per-channel scale and shift."""
    return _ops(x.device).conv_bn_relu_folded(x, weight, scale, shift, stride, dilation, groups)


def batch_stats_forward(x, weight, bn_weight, bn_bias, eps, stride, dilation, groups):
    """``(z, mean, var)``: BatchNorm with the batch's statistics (biased variance)."""
    z, _, stats = _ops(x.device).conv_bn_relu_train(x, weight, bn_weight, bn_bias, float(eps), stride, dilation,
                                                    groups)
    return z, stats[0], stats[1]


def batch_norm_relu_batch_stats(x, residual, bn_weight, bn_bias, eps):
    """``(z, mean, var)`` of ``relu(batch_norm(x) [+ residual])`` with the batch's statistics."""
    z, stats = _ops(x.device).batch_norm_relu_train(x, residual, bn_weight, bn_bias, float(eps))
    return z, stats[0], stats[1]


def batch_norm_relu_folded(x, residual, scale, shift):
    """``relu(x * scale + shift [+ residual])``."""
    return _ops(x.device).batch_norm_relu_folded(x, residual, scale, shift)
