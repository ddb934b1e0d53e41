// Host test build: the kernels of csrc/kernels/, compiled by the host compiler through
// cuda_emulation.h (included by platform.cuh when RESNEXT_KERNELS_EMULATE is defined).
#include "../kernels/conv_bn_relu_folded.cuh"
#include "../kernels/batch_norm_train.cuh"
#include "../kernels/conv_bn_relu_backward.cuh"
#include "../kernels/batch_norm_relu.cuh"
