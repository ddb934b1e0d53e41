// nvcc translation unit of the inference kernel (the host test build includes the same header).
#include "kernels/conv_bn_relu_folded.cuh"
