"""A small run of every CUDA kernel, for compute-sanitizer (memcheck, racecheck) in gpu_check.sh."""

import torch

import resnext_kernels


def main():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for (n, c, h, w, groups, stride) in ((2, 64, 9, 7, 16, 1), (1, 128, 7, 7, 32, 2), (2, 32, 5, 5, 1, 1)):
            x = torch.randn(n, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
            weight = torch.randn(c, c // groups, 3, 3, device="cuda", dtype=dtype)
            gamma, beta = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda")
            mean, var = torch.randn(c, device="cuda"), torch.rand(c, device="cuda") + 0.5
            with torch.no_grad():
                resnext_kernels.grouped_conv_bn_relu(x, weight, gamma, beta, mean, var, stride=stride, groups=groups,
                                                     training=False, impl="cuda")
    torch.cuda.synchronize()
    print("sanitizer case done")


if __name__ == "__main__":
    main()
