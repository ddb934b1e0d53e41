// Every op schema of the extension, declared once. The nvcc build defines them in the namespace
// resnext_kernels, the host test build in resnext_kernels_emulated, so both can be loaded at once.
#pragma once

#include <torch/library.h>

namespace resnext_kernels {

inline void define_ops(torch::Library& m) {
  // relu(conv2d(x, weight, stride, padding = dilation, dilation, groups) * scale + shift); the output
  // keeps x's memory format.
  m.def("conv_bn_relu_folded(Tensor x, Tensor weight, Tensor scale, Tensor shift, int stride, int dilation, "
        "int groups) -> Tensor");
}

}  // namespace resnext_kernels
