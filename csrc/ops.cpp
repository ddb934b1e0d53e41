// The thin binding between the dispatcher and the torch-free kernels: checks inputs with clear
// messages, allocates outputs, fills the params struct, launches on the current stream and checks
// the launch. Compiled into the nvcc build (CUDA dispatch key) and, with RESNEXT_KERNELS_EMULATE,
// into the host test build (CPU dispatch key, kernels run by csrc/emulate/).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels/params.h"

#ifdef RESNEXT_KERNELS_EMULATE
#define RK_NAMESPACE resnext_kernels_emulated
#define RK_DISPATCH_KEY CPU
#define RK_DEVICE_NAME "CPU (host test build)"
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define RK_NAMESPACE resnext_kernels
#define RK_DISPATCH_KEY CUDA
#define RK_DEVICE_NAME "CUDA"
#endif

namespace resnext_kernels {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "resnext_kernels: x must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  }
}

void check_device(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "resnext_kernels: ", name, " is on ", t.device(), " but x is on ", x.device());
}

void* stream_of(const at::Tensor& x) {
#ifdef RESNEXT_KERNELS_EMULATE
  return nullptr;
#else
  return c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
#endif
}

at::Tensor conv_bn_relu_folded(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                               const at::Tensor& shift, int64_t stride, int64_t dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4, "resnext_kernels: x must be 4-D (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(stride >= 1 && dilation >= 1 && groups >= 1, "resnext_kernels: stride, dilation and groups must be >= 1");
  TORCH_CHECK(x.size(1) % groups == 0, "resnext_kernels: x's ", x.size(1), " channels are not divisible by groups=", groups);
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) / groups && weight.size(2) == 3 && weight.size(3) == 3 &&
                  weight.size(0) % groups == 0 && weight.size(0) > 0,
              "resnext_kernels: weight must have shape (C_out, C_in/groups, 3, 3), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "resnext_kernels: weight's dtype ", weight.scalar_type(),
              " differs from x's ", x.scalar_type());
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t c_out = weight.size(0);
  for (const auto& [t, name] : {std::pair{&scale, "scale"}, std::pair{&shift, "shift"}}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == c_out, "resnext_kernels: ", name, " must have shape (", c_out, ",), got ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == acc_type, "resnext_kernels: ", name, " must be ", acc_type, " for x in ",
                x.scalar_type(), ", got ", t->scalar_type());
    check_device(*t, name, x);
  }
  check_device(weight, "weight", x);
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, "resnext_kernels: x must have a non-empty spatial size, got ", x.sizes());

  const int64_t h_out = (x.size(2) - 1) / stride + 1, w_out = (x.size(3) - 1) / stride + 1;
  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  at::Tensor out = at::empty({x.size(0), c_out, h_out, w_out},
                             x.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                     : at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;

#ifndef RESNEXT_KERNELS_EMULATE
  TORCH_CHECK(x.is_cuda(), "resnext_kernels: x must be a CUDA tensor, got one on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
#endif
  const at::Tensor weight_c = weight.contiguous(), scale_c = scale.contiguous(), shift_c = shift.contiguous();
  ConvBnReluParams p{};
  p.x = x.data_ptr();
  p.weight = weight_c.data_ptr();
  p.scale = scale_c.data_ptr();
  p.shift = shift_c.data_ptr();
  p.out = out.data_ptr();
  p.dtype = dtype_of(x);
  p.n = x.size(0);
  p.c_in = x.size(1);
  p.h = x.size(2);
  p.w = x.size(3);
  p.c_out = c_out;
  p.h_out = h_out;
  p.w_out = w_out;
  for (int i = 0; i < 4; ++i) {
    p.x_stride[i] = x.stride(i);
    p.out_stride[i] = out.stride(i);
  }
  p.stride = int(stride);
  p.dilation = int(dilation);
  p.groups = int(groups);
  const char* error = launch_conv_bn_relu_folded(p, stream_of(x));
  TORCH_CHECK(error == nullptr, "resnext_kernels: conv_bn_relu_folded launch failed on ", RK_DEVICE_NAME, ": ", error);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(RK_NAMESPACE, RK_DISPATCH_KEY, m) { m.impl("conv_bn_relu_folded", &conv_bn_relu_folded); }

}  // namespace resnext_kernels
