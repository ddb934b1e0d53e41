"""Correctness self-check: every backend available on the device against a float64 evaluation."""

import torch
import torch.nn.functional as F

from .. import available_impls, backends, grouped_conv_bn_relu

# (N, C, H, W, groups, stride): ResNeXt-50 32x4d layers at a small batch and size.
CHECK_SHAPES = [(4, 128, 14, 14, 32, 1), (4, 256, 15, 15, 32, 2), (2, 1024, 7, 7, 32, 1)]


def _reference64(x, weight, gamma, beta, mean, var, stride, groups, training):
    y = F.conv2d(x.double(), weight.double(), None, stride, 1, 1, groups)
    return torch.relu(F.batch_norm(y, mean.double(), var.double(), gamma.double(), beta.double(), training))


def self_check(device, dtype=torch.float32):
    """Yields (impl, shape, mode, relative error, passed) for every backend, shape and mode."""
    tolerance = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}[dtype]
    for impl in available_impls(device):
        supports_training = backends.resolve(impl, device).SUPPORTS_BATCH_STATS
        for n, c, h, w, groups, stride in CHECK_SHAPES:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(n, c, h, w, generator=gen).to(device, dtype).contiguous(memory_format=torch.channels_last)
            weight = (torch.randn(c, c // groups, 3, 3, generator=gen) / (3 * (c // groups) ** 0.5)).to(device, dtype)
            gamma, beta = torch.rand(c, generator=gen).add(0.5).to(device), torch.randn(c, generator=gen).to(device)
            for training in (False, True) if supports_training else (False,):
                mean, var = torch.zeros(c, device=device), torch.ones(c, device=device)
                expected = _reference64(x, weight, gamma, beta, mean, var, stride, groups, training)
                z = grouped_conv_bn_relu(x, weight, gamma, beta, mean, var, stride=stride, groups=groups,
                                         training=training, impl=impl)
                error = ((z.double() - expected).norm() / expected.norm()).item()
                yield impl, f"{n}x{c}x{h}x{w} g{groups} s{stride}", "train" if training else "eval", error, error <= tolerance
