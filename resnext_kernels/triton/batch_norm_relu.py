"""The standalone BatchNorm + ReLU, z = relu(batch_norm(x) [+ residual]): kernels and launchers.

Training: per (row tile, channel) partial statistics of x (_moments_kernel, the same (shift, offset,
m2) form the convolution's statistics epilogue writes), merged by conv.merge_stats, then one
normalise (+ residual) + ReLU pass (conv.normalize_relu). Inference: that pass alone. Backward: the
reductions and coefficients of backward.coefficients, then _input_grad_kernel writes dy, the gradient
of the BatchNorm's input, where the fused convolution computes it on the fly.
"""

import torch
import triton
import triton.language as tl

from ..outputs import accumulate_dtype, batch_norm_gradients, like_x, output_memory_format, stats_buffer
from . import config
from .backward import _dy_tile, coefficients
from .conv import device_guard, merge_stats, normalize_relu, tile_moments

_BLOCK_M = 64
_BLOCK_C = 64


@triton.jit
def _moments_kernel(x_ptr, part_ptr, P, HW, C, PART_ROWS, s_n, s_c, s_hw,
                    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # 64-bit offsets: an NCHW image alone may pass 2^31 elements.
    pid_m = tl.program_id(0).to(tl.int64)
    offs_p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    ok = (offs_p < P)[:, None] & c_ok[None, :]
    offs = ((offs_p // HW) * s_n + (offs_p % HW) * s_hw)[:, None] + offs_c.to(tl.int64)[None, :] * s_c
    x = tl.where(ok, tl.load(x_ptr + offs, mask=ok, other=0.0).to(ACC), 0.0)
    count = tl.minimum(P - pid_m * BLOCK_M, BLOCK_M).to(ACC)
    tile_shift, offset, m2 = tile_moments(x, ok, count)  # as the convolution's statistics epilogue
    part = part_ptr + pid_m * C + offs_c
    tl.store(part, tile_shift, mask=c_ok)
    tl.store(part + PART_ROWS * C, offset, mask=c_ok)
    tl.store(part + 2 * PART_ROWS * C, m2, mask=c_ok)


@triton.jit
def _input_grad_kernel(dz_ptr, y_ptr, dx_ptr, scale_ptr, shift_ptr, mean_ptr, coef_ptr, P, HW, W, C,
                       sdn, sdc, sdh, sdw, syn, syc, syh, syw, s_n, s_c, s_hw,
                       TRAIN: tl.constexpr, MASK: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    ok = (offs_p < P)[:, None] & c_ok[None, :]
    n = offs_p // HW
    h = (offs_p % HW) // W
    w = offs_p % W
    wide_c = offs_c.to(tl.int64)[None, :]  # 64-bit offsets, as in _moments_kernel
    dz_ptrs = dz_ptr + (n * sdn + h * sdh + w * sdw)[:, None] + wide_c * sdc
    y_ptrs = y_ptr + (n * syn + h * syh + w * syw)[:, None] + wide_c * syc
    dy = _dy_tile(dz_ptrs, y_ptrs, ok, offs_c, c_ok, scale_ptr, shift_ptr, mean_ptr, coef_ptr, C, TRAIN, ACC, MASK)
    dx_ptrs = dx_ptr + (n * s_n + (offs_p % HW) * s_hw)[:, None] + wide_c * s_c
    tl.store(dx_ptrs, config.cast(dy, dx_ptr.dtype.element_ty), mask=ok)


def _in_output_format(x, residual):
    """``x`` and ``residual`` (or None) dense in the output's memory format with that format's own
    strides: the kernels step over pixels by the W stride, and PyTorch counts a tensor contiguous
    whatever the strides of its size-1 dims."""
    memory_format = output_memory_format(x)

    def dense(t):
        t = t.contiguous(memory_format=memory_format)
        n, c, h, w = (max(size, 1) for size in t.shape)
        strides = (h * w * c, 1, w * c, c) if memory_format == torch.channels_last else (c * h * w, h * w, w, 1)
        return t if t.stride() == strides else t.as_strided(t.shape, strides)

    return dense(x), None if residual is None else dense(residual)


def train_forward(x, residual, bn_weight, bn_bias, eps):
    """``(z, stats)``: z = relu(batch_norm(x) [+ residual]) with the batch's statistics, stats as
    outputs.stats_buffer's rows."""
    x, residual = _in_output_format(x, residual)
    n, c, h, w = x.shape
    m = n * h * w
    part_rows = triton.cdiv(m, _BLOCK_M)
    part = torch.empty((3, part_rows, c), dtype=accumulate_dtype(x.dtype), device=x.device)
    stats = stats_buffer(x, c)
    z = like_x(x)
    with device_guard(x):
        _moments_kernel[(part_rows, triton.cdiv(c, _BLOCK_C))](
            x, part, m, h * w, c, part_rows, x.stride(0), x.stride(1), x.stride(3),
            ACC=config.tl_acc_dtype(x.dtype), BLOCK_M=_BLOCK_M, BLOCK_C=_BLOCK_C,
        )
        merge_stats(part, part_rows, m, _BLOCK_M, stats, bn_weight, bn_bias, eps)
        normalize_relu(x, residual, z, stats[2], stats[3])
    return z, stats


def folded_forward(x, residual, scale, shift):
    """relu(x * scale + shift [+ residual])."""
    x, residual = _in_output_format(x, residual)
    z = like_x(x)
    if z.numel():
        with device_guard(x):
            normalize_relu(x, residual, z, scale, shift)
    return z


def backward(dz, x, output, scale, shift, mean, var, eps, relu_mask, need_dx, need_dparams):
    """``(dx, dparams, g)`` of relu(batch_norm(x) [+ residual]), dx and dparams as backward.backward's
    (without dw). ``relu_mask``: dz is z's gradient, masked where z (recomputed from x; no residual)
    or, given ``output`` (z, with a residual), z itself is <= 0: g is then the masked gradient, written
    by the reductions (which then always run) and read by the dx pass. Otherwise dz is g = dz * 1[not z <= 0]
    already. g is empty without ``output``."""
    if output is not None and not relu_mask:
        raise ValueError("output (the ReLU mask's source) needs relu_mask=True")
    dx, dparams, g = batch_norm_gradients(x, output is not None, need_dx, need_dparams)
    if x.numel() == 0:
        return dx, dparams.zero_(), g
    n, c, h, w = x.shape
    train = mean is not None
    with device_guard(x):
        coef = coefficients(dz, x, scale, shift, mean, var, eps, dparams if need_dparams else None,
                            relu_mask and output is None, output, g)
        grad = g if output is not None else dz
        if need_dx:
            _input_grad_kernel[(triton.cdiv(n * h * w, _BLOCK_M), triton.cdiv(c, _BLOCK_C))](
                grad, x, dx, scale, shift, mean if train else scale, coef, n * h * w, h * w, w, c,
                *grad.stride(), *x.stride(), dx.stride(0), dx.stride(1), dx.stride(3),
                TRAIN=train, MASK=relu_mask and output is None, ACC=config.tl_acc_dtype(x.dtype),
                BLOCK_M=_BLOCK_M, BLOCK_C=_BLOCK_C,
            )
    return dx, dparams, g
