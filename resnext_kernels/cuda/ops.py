"""Fake kernels and autograd for the extension's ops, registered from Python (schemas are in
csrc/op_schemas.h), for the nvcc build's namespace and the host test build's alike."""

import functools

import torch

from ..functional import output_memory_format


@functools.cache
def register_namespace(namespace):
    @torch.library.register_fake(f"{namespace}::conv_bn_relu_folded")
    def _(x, weight, scale, shift, stride, dilation, groups):
        h_out = (x.shape[2] - 1) // stride + 1
        w_out = (x.shape[3] - 1) // stride + 1
        return torch.empty((x.shape[0], weight.shape[0], h_out, w_out), dtype=x.dtype, device=x.device,
                           memory_format=output_memory_format(x))
