// nvcc translation unit of the standalone BatchNorm + ReLU (the host test build includes the same header).
#include "kernels/batch_norm_relu.cuh"
