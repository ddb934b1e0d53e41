"""Fused grouped 3x3 convolution + BatchNorm + ReLU for ResNeXt, and the bottleneck's other BatchNorm + ReLU
(+ residual) as one pass: Triton and CUDA kernels behind each op."""

from .backends import available_impls
from .functional import IMPLS, batch_norm_relu, grouped_conv_bn_relu
from .models import (
    resnet50,
    resnet101,
    resnext29_8x64d,
    resnext29_16x64d,
    resnext50_32x4d,
    resnext101_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
)
from .modules import ResNeXtBlock, convert

__version__ = "0.1.0"

__all__ = [
    "IMPLS",
    "ResNeXtBlock",
    "available_impls",
    "batch_norm_relu",
    "convert",
    "grouped_conv_bn_relu",
    "resnet50",
    "resnet101",
    "resnext29_8x64d",
    "resnext29_16x64d",
    "resnext50_32x4d",
    "resnext101_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
]
