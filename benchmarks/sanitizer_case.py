"""A small run of every CUDA kernel, for compute-sanitizer (memcheck, racecheck, synccheck) in gpu_check.sh:
inference, training forward and backward (NCHW and channels-last gradients: the scalar and 16-byte
dy paths), every dtype, small and large groups, several channel chunks per tile (the tensor-core
kernels' cp.async copies of the next chunk), stride 2 (8x8 dgrad tiles, one pixel phase per warp),
dilations beyond a tile's span (halos staged in bands, unevenly apart in dgrad at stride 2); the
standalone BatchNorm + ReLU with and without a residual (scalar and 16-byte paths); on a GPU, a bf16
case just large enough that tensor-core blocks compute two tiles each, weights staged once; and, unless
--small, one ResNeXt stage-1 sized bf16 case."""

import sys

import torch

import resnext_kernels


def run(n, c, h, w, groups, stride, dilation, dtype, training, device):
    x = torch.randn(n, c, h, w, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, c // groups, 3, 3, device=device, dtype=dtype) / (3 * (c // groups) ** 0.5)
    if dtype != torch.float32:  # the tensor-core kernels' weight staging, on a channels-last model's weights
        weight = weight.contiguous(memory_format=torch.channels_last)
    gamma, beta = torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)
    mean, var = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
    leaves = [t.requires_grad_() for t in (x, weight, gamma, beta)]
    z = resnext_kernels.grouped_conv_bn_relu(*leaves, mean, var, stride=stride, dilation=dilation, groups=groups,
                                             training=training, impl="cuda")
    for memory_format in (torch.contiguous_format, torch.channels_last):
        grads = torch.autograd.grad(z, leaves, torch.randn_like(z, memory_format=memory_format), retain_graph=True)
        assert all(g is not None for g in grads)


def run_batch_norm_relu(n, c, h, w, dtype, training, device):
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(n, c, h, w, device=device, dtype=dtype).contiguous(memory_format=memory_format)
        residual = torch.randn_like(x)
        gamma, beta = torch.rand(c, device=device) + 0.5, torch.randn(c, device=device)
        mean, var = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
        leaves = [t.requires_grad_() for t in (x, residual, gamma, beta)]
        for r in (None, residual):
            z = resnext_kernels.batch_norm_relu(x, gamma, beta, mean, var, r, training=training, impl="cuda")
            grads = torch.autograd.grad(z, [t for t in leaves if t is not residual or r is not None],
                                        torch.randn_like(z))
            assert all(g is not None for g in grads)
        if not training:  # frozen BatchNorm: no reductions to run, so torch masks dz before the dx pass
            z = resnext_kernels.batch_norm_relu(x, gamma.detach(), beta.detach(), mean, var, residual, training=False,
                                                impl="cuda")
            assert all(g is not None for g in torch.autograd.grad(z, [x, residual], torch.randn_like(z)))


def main(device="cuda", large=True):
    """``device="cpu", large=False``: the same run through the host test build (tests/test_cuda.py)."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape in ((2, 64, 9, 7, 16, 1, 1), (1, 128, 9, 9, 32, 2, 1), (2, 32, 5, 5, 1, 1, 1), (1, 96, 6, 5, 1, 1, 1),
                      (1, 32, 19, 20, 4, 1, 13), (1, 32, 23, 9, 4, 2, 11)):
            for training in (False, True):
                run(*shape, dtype, training, device)
        for training in (False, True):
            run_batch_norm_relu(2, 40, 5, 7, dtype, training, device)
    if device == "cuda":  # 1 024 tiles x channel tiles on 132 SMs x 4 slots (the host test build always runs 8)
        run(16, 128, 28, 28, 32, 1, 1, torch.bfloat16, True, device)
    if large:
        run(32, 128, 56, 56, 32, 1, 1, torch.bfloat16, True, device)
        run_batch_norm_relu(32, 128, 56, 56, torch.bfloat16, True, device)  # statistics merged in slabs
    if device == "cuda":
        torch.cuda.synchronize()
    print("sanitizer case done")


if __name__ == "__main__":
    main(large="--small" not in sys.argv[1:])
