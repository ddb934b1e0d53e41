// What the binding hands the kernels: raw pointers, sizes and strides. Torch-free, so the same
// kernels build with nvcc and with the host test build (csrc/emulate/).
#pragma once

#include <cstdint>

namespace resnext_kernels {

enum class DType : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

// y = conv2d(x, weight, stride, padding = dilation, dilation, groups) with a 3x3 kernel;
// out = relu(y * scale + shift) per output channel.
struct ConvBnReluParams {
  const void* x;
  const void* weight;  // (c_out, c_in / groups, 3, 3), contiguous
  const void* scale;   // (c_out,), float32, or float64 for float64 inputs
  const void* shift;
  void* out;
  DType dtype;
  int64_t n, c_in, h, w;
  int64_t c_out, h_out, w_out;
  int64_t x_stride[4];    // in elements, for (n, c, h, w)
  int64_t out_stride[4];
  int stride, dilation, groups;
};

// Launches on `stream` (a cudaStream_t); returns nullptr or the launch error's description.
const char* launch_conv_bn_relu_folded(const ConvBnReluParams& params, void* stream);

}  // namespace resnext_kernels
