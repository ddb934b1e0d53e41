// nvcc translation unit of the backward kernels (the host test build includes the same header).
#include "kernels/conv_bn_relu_backward.cuh"
