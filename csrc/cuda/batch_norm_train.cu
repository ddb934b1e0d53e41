// nvcc translation unit of the training forward's pass 2 (the host test build includes the same header).
#include "kernels/batch_norm_train.cuh"
