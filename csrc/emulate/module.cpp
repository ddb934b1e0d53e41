// Host test build: declares the extension's op schemas in the namespace resnext_kernels_emulated
// (ops.cpp, compiled with RESNEXT_KERNELS_EMULATE, registers their CPU implementations), plus test
// hooks: a kernel reading out of bounds, for the AddressSanitizer build, and kernels misusing warp
// operations, which the compatibility layer must refuse.
#include <ATen/ATen.h>

#include "../kernels/params.h"
#include "../op_schemas.h"
#include "cuda_emulation.h"

namespace {

// Runs the inference kernel on a contiguous float32 x as if it held one more image than it does:
// an out-of-bounds read inside a kernel, which the AddressSanitizer build must report.
at::Tensor read_past_the_end(const at::Tensor& x, const at::Tensor& weight, int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.scalar_type() == at::kFloat, "read_past_the_end: contiguous float x");
  const at::Tensor w = weight.contiguous(), scale = at::ones({w.size(0)}, x.options()), shift = at::zeros_like(scale);
  at::Tensor out = at::empty({x.size(0) + 1, w.size(0), x.size(2), x.size(3)}, x.options());
  resnext_kernels::ConvBnReluParams p{};
  p.x = x.data_ptr();
  p.weight = w.data_ptr();
  p.scale = scale.data_ptr();
  p.shift = shift.data_ptr();
  p.out = out.data_ptr();
  p.dtype = resnext_kernels::DType::kFloat32;
  p.n = x.size(0) + 1;
  p.c_in = x.size(1);
  p.h = p.h_out = x.size(2);
  p.w = p.w_out = x.size(3);
  p.c_out = w.size(0);
  for (int i = 0; i < 4; ++i) {
    p.x_stride[i] = x.stride(i);
    p.out_stride[i] = out.stride(i);
    p.weight_stride[i] = w.stride(i);
  }
  p.stride = p.dilation = 1;
  p.groups = int(groups);
  resnext_kernels::launch_conv_bn_relu_folded(p, nullptr);
  return out;
}

// Undefined on a GPU (a hang, or another operation's values): 0, a full-mask vote after the odd lanes
// have returned; 1, half the warp voting while the other half shuffles.
__global__ void misused_warp_operation(int kind) {
  const int lane = int(threadIdx.x) % 32;
  if (kind == 0 && lane % 2) return;
  if (kind == 1 && lane < 16)
    __shfl_sync(0xffffffffu, lane, 0);
  else
    __any_sync(0xffffffffu, lane);
}

void misuse_warp_operation(int64_t kind) {
  RK_LAUNCH(misused_warp_operation, dim3(1), dim3(32), 0, nullptr, int(kind));
}

}  // namespace

TORCH_LIBRARY(resnext_kernels_emulated, m) {
  resnext_kernels::define_ops(m);
  m.def("read_past_the_end(Tensor x, Tensor weight, int groups) -> Tensor");
  m.def("misuse_warp_operation(int kind) -> ()", &misuse_warp_operation);  // no tensors: every dispatch key
}

TORCH_LIBRARY_IMPL(resnext_kernels_emulated, CPU, m) { m.impl("read_past_the_end", &read_past_the_end); }
