"""The tensors the ops return, uninitialised, as both kernel backends and their fake kernels allocate
them: one place for output shapes, dtypes and memory formats."""

import torch


def output_memory_format(x):
    """channels_last when ``x`` is laid out channels-last (and not also plainly contiguous)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def accumulate_dtype(dtype):
    """The dtype kernels accumulate and keep per-channel BN values in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_size(size, stride):
    # padding = dilation keeps a 3x3 convolution "same" whatever the dilation; then the stride.
    return (size - 1) // stride + 1


def conv_output(x, weight, stride):
    """(N, C_out, H_out, W_out) in x's dtype and memory format."""
    n, _, h, w = x.shape
    shape = (n, weight.shape[0], output_size(h, stride), output_size(w, stride))
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


def like_x(x, wanted=True):
    """A tensor like ``x`` in its output memory format, or an empty (0,) one when not ``wanted``."""
    return torch.empty_like(x, memory_format=output_memory_format(x)) if wanted else x.new_empty((0,))


def stats_buffer(x, channels):
    """Batch statistics: rows mean, biased variance, scale, shift."""
    return torch.empty((4, channels), dtype=accumulate_dtype(x.dtype), device=x.device)


def _parameter_gradients(x, channels, wanted):
    """Rows (dgamma, dbeta), or (dscale, dshift) when folded; (0,) when not ``wanted``."""
    return torch.empty((2, channels) if wanted else (0,), dtype=accumulate_dtype(x.dtype), device=x.device)


def conv_gradients(x, weight, need_dx, need_dw, need_dparams):
    """``(dx, dw, dparams)`` of the fused conv's backward; dw contiguous."""
    dw = torch.empty(weight.shape if need_dw else (0,), dtype=weight.dtype, device=weight.device)
    return like_x(x, need_dx), dw, _parameter_gradients(x, weight.shape[0], need_dparams)


def batch_norm_gradients(x, masked, need_dx, need_dparams):
    """``(dx, dparams, g)`` of the standalone BatchNorm + ReLU's backward (``masked``: with g)."""
    return like_x(x, need_dx), _parameter_gradients(x, x.shape[1], need_dparams), like_x(x, masked)
