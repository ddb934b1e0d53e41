"""Correctness self-check: every backend available on the device against a float64 evaluation, for both
fused ops' forwards."""

import torch
import torch.nn.functional as F

from .. import available_impls, batch_norm_relu, grouped_conv_bn_relu

# (N, C, H, W, groups, stride): ResNeXt-50 32x4d layers at a small batch and size.
CHECK_SHAPES = [(4, 128, 14, 14, 32, 1), (4, 256, 15, 15, 32, 2), (2, 1024, 7, 7, 32, 1)]
# (N, C, H, W, residual): batch_norm_relu as a block's bn1 and bn3 run it.
BATCH_NORM_CHECK_SHAPES = [(4, 128, 15, 15, False), (2, 512, 7, 7, True)]


def _reference64(x, weight, gamma, beta, mean, var, stride, groups, training):
    y = F.conv2d(x.double(), weight.double(), None, stride, 1, 1, groups)
    return torch.relu(F.batch_norm(y, mean.double(), var.double(), gamma.double(), beta.double(), training))


def self_check(device, dtype=torch.float32):
    """Yields (impl, shape, mode, relative error, passed) for every backend, shape and mode."""
    tolerance = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}[dtype]
    for impl in available_impls(device):
        for n, c, h, w, groups, stride in CHECK_SHAPES:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(n, c, h, w, generator=gen).to(device, dtype).contiguous(memory_format=torch.channels_last)
            weight = (torch.randn(c, c // groups, 3, 3, generator=gen) / (3 * (c // groups) ** 0.5)).to(device, dtype)
            weight = weight.contiguous(memory_format=torch.channels_last)  # as the benchmarks lay it out
            gamma, beta = torch.rand(c, generator=gen).add(0.5).to(device), torch.randn(c, generator=gen).to(device)
            for training in (False, True):
                mean, var = torch.zeros(c, device=device), torch.ones(c, device=device)
                expected = _reference64(x, weight, gamma, beta, mean, var, stride, groups, training)
                z = grouped_conv_bn_relu(x, weight, gamma, beta, mean, var, stride=stride, groups=groups,
                                         training=training, impl=impl)
                error = ((z.double() - expected).norm() / expected.norm()).item()
                yield impl, f"{n}x{c}x{h}x{w} g{groups} s{stride}", "train" if training else "eval", error, error <= tolerance
        for n, c, h, w, with_residual in BATCH_NORM_CHECK_SHAPES:
            gen = torch.Generator().manual_seed(0)
            x, residual = (torch.randn(n, c, h, w, generator=gen).to(device, dtype).contiguous(
                memory_format=torch.channels_last) for _ in range(2))
            residual = residual if with_residual else None
            gamma, beta = torch.rand(c, generator=gen).add(0.5).to(device), torch.randn(c, generator=gen).to(device)
            for training in (False, True):
                mean, var = torch.zeros(c, device=device), torch.ones(c, device=device)
                expected = F.batch_norm(x.double(), mean.double(), var.double(), gamma.double(), beta.double(), training)
                expected = torch.relu(expected if residual is None else expected + residual.double())
                z = batch_norm_relu(x, gamma, beta, mean, var, residual, training=training, impl=impl)
                error = ((z.double() - expected).norm() / expected.norm()).item()
                shape = f"bn {n}x{c}x{h}x{w}" + (" +res" if with_residual else "")
                yield impl, shape, "train" if training else "eval", error, error <= tolerance
