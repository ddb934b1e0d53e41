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
#include <c10/cuda/CUDAException.h>
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

// Checks x and weight; returns the output's spatial size.
std::pair<int64_t, int64_t> check_conv(const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t dilation,
                                       int64_t groups) {
  TORCH_CHECK(x.dim() == 4, "resnext_kernels: x must be 4-D (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(stride >= 1 && dilation >= 1 && groups >= 1, "resnext_kernels: stride, dilation and groups must be >= 1");
  TORCH_CHECK(x.size(1) % groups == 0, "resnext_kernels: x's ", x.size(1), " channels are not divisible by groups=", groups);
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) / groups && weight.size(2) == 3 && weight.size(3) == 3 &&
                  weight.size(0) % groups == 0 && weight.size(0) > 0,
              "resnext_kernels: weight must have shape (C_out, C_in/groups, 3, 3), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "resnext_kernels: weight's dtype ", weight.scalar_type(),
              " differs from x's ", x.scalar_type());
  dtype_of(x);
  check_device(weight, "weight", x);
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, "resnext_kernels: x must have a non-empty spatial size, got ", x.sizes());
  // The kernels index the pixels of one image in 32 bits (whole tensors in 64).
  TORCH_CHECK(x.size(2) * x.size(3) < (int64_t(1) << 31), "resnext_kernels: images of more than 2^31 - 1 pixels (H x W) ",
              "are not supported, got ", x.sizes());
  return {(x.size(2) - 1) / stride + 1, (x.size(3) - 1) / stride + 1};
}

at::ScalarType acc_type_of(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_per_channel(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t c_out, bool exact_acc) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == c_out, "resnext_kernels: ", name, " must have shape (", c_out, ",), got ",
              t.sizes());
  if (exact_acc)
    TORCH_CHECK(t.scalar_type() == acc_type_of(x), "resnext_kernels: ", name, " must be ", acc_type_of(x), " for x in ",
                x.scalar_type(), ", got ", t.scalar_type());
  check_device(t, name, x);
}

bool is_channels_last(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

at::Tensor empty_like_format(const at::Tensor& x, at::IntArrayRef sizes) {
  return at::empty(sizes, x.options().memory_format(is_channels_last(x) ? at::MemoryFormat::ChannelsLast
                                                                         : at::MemoryFormat::Contiguous));
}

// The current device's multiprocessors (kernels size their blocks by it); 0 in the host test build.
int sm_count() {
#ifdef RESNEXT_KERNELS_EMULATE
  return 0;
#else
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
#endif
}

// Checks that x is on this build's device and makes that device current for the scope's lifetime.
class DeviceScope {
 public:
#ifdef RESNEXT_KERNELS_EMULATE
  explicit DeviceScope(const at::Tensor&) {}
#else
  explicit DeviceScope(const at::Tensor& x) : guard_(checked_device(x)) {}

 private:
  static at::Device checked_device(const at::Tensor& x) {
    TORCH_CHECK(x.is_cuda(), "resnext_kernels: x must be a CUDA tensor, got one on ", x.device());
    return x.device();
  }
  c10::cuda::CUDAGuard guard_;
#endif
};

void check_launch(const char* error, const char* what) {
  TORCH_CHECK(error == nullptr, "resnext_kernels: ", what, " launch failed on ", RK_DEVICE_NAME, ": ", error);
}

// The forward params shared by inference and training pass 1.
ConvBnReluParams conv_params(const at::Tensor& x, const at::Tensor& weight_c, const at::Tensor& out, int64_t stride,
                             int64_t dilation, int64_t groups) {
  ConvBnReluParams p{};
  p.x = x.data_ptr();
  p.weight = weight_c.data_ptr();
  p.out = out.data_ptr();
  p.dtype = dtype_of(x);
  p.n = x.size(0);
  p.c_in = x.size(1);
  p.h = x.size(2);
  p.w = x.size(3);
  p.c_out = weight_c.size(0);
  p.h_out = out.size(2);
  p.w_out = out.size(3);
  for (int i = 0; i < 4; ++i) {
    p.x_stride[i] = x.stride(i);
    p.out_stride[i] = out.stride(i);
  }
  p.stride = int(stride);
  p.dilation = int(dilation);
  p.groups = int(groups);
  p.sm_count = sm_count();
  return p;
}

at::Tensor conv_bn_relu_folded(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                               const at::Tensor& shift, int64_t stride, int64_t dilation, int64_t groups) {
  const auto [h_out, w_out] = check_conv(x, weight, stride, dilation, groups);
  const int64_t c_out = weight.size(0);
  check_per_channel(scale, "scale", x, c_out, true);
  check_per_channel(shift, "shift", x, c_out, true);
  at::Tensor out = empty_like_format(x, {x.size(0), c_out, h_out, w_out});
  if (out.numel() == 0) return out;
  const DeviceScope scope(x);
  const at::Tensor weight_c = weight.contiguous(), scale_c = scale.contiguous(), shift_c = shift.contiguous();
  ConvBnReluParams p = conv_params(x, weight_c, out, stride, dilation, groups);
  p.scale = scale_c.data_ptr();
  p.shift = shift_c.data_ptr();
  const char* error = launch_conv_bn_relu_folded(p, stream_of(x));
  check_launch(error, "conv_bn_relu_folded");
  return out;
}

// y = conv2d(x, weight) in x's dtype and memory format; with `partials`, pass 1's statistics too.
at::Tensor conv_pass1(const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t dilation, int64_t groups,
                      at::Tensor* partials) {
  const auto [h_out, w_out] = check_conv(x, weight, stride, dilation, groups);
  at::Tensor y = empty_like_format(x, {x.size(0), weight.size(0), h_out, w_out});
  if (y.numel() == 0) return y;
  const at::Tensor weight_c = weight.contiguous();
  ConvBnReluParams p = conv_params(x, weight_c, y, stride, dilation, groups);
  if (partials != nullptr) {
    const int64_t blocks = conv_stats_blocks(p);
    *partials = at::empty({3, blocks, weight.size(0)}, x.options().dtype(acc_type_of(x)));
    p.partials = partials->data_ptr();
  }
  const char* error = launch_conv_stats(p, stream_of(x));
  check_launch(error, "convolution");
  return y;
}

at::Tensor grouped_conv(const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t dilation, int64_t groups) {
  const DeviceScope scope(x);
  return conv_pass1(x, weight, stride, dilation, groups, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_train(const at::Tensor& x, const at::Tensor& weight,
                                                                  const std::optional<at::Tensor>& bn_weight,
                                                                  const std::optional<at::Tensor>& bn_bias, double eps,
                                                                  int64_t stride, int64_t dilation, int64_t groups) {
  check_conv(x, weight, stride, dilation, groups);
  const int64_t c_out = weight.size(0);
  const auto acc = acc_type_of(x);
  at::Tensor gamma, beta;
  if (bn_weight.has_value()) {
    check_per_channel(*bn_weight, "bn_weight", x, c_out, false);
    gamma = bn_weight->to(acc).contiguous();
  }
  if (bn_bias.has_value()) {
    check_per_channel(*bn_bias, "bn_bias", x, c_out, false);
    beta = bn_bias->to(acc).contiguous();
  }
  const DeviceScope scope(x);
  at::Tensor partials;
  at::Tensor y = conv_pass1(x, weight, stride, dilation, groups, &partials);
  at::Tensor z = at::empty_like(y);
  at::Tensor stats = at::empty({4, c_out}, x.options().dtype(acc));
  TORCH_CHECK(y.numel() > 0, "resnext_kernels: batch statistics need a non-empty batch, got x of shape ", x.sizes());
  BatchNormTrainParams p{};
  p.partials = partials.data_ptr();
  p.blocks = partials.size(1);
  p.gamma = gamma.defined() ? gamma.data_ptr() : nullptr;
  p.beta = beta.defined() ? beta.data_ptr() : nullptr;
  p.eps = eps;
  p.stats = stats.data_ptr();
  p.y = y.data_ptr();
  p.z = z.data_ptr();
  p.dtype = dtype_of(x);
  p.numel = y.numel();
  p.c = c_out;
  p.hw = y.size(2) * y.size(3);
  p.channels_last = is_channels_last(y);
  const int64_t slabs = batch_norm_train_slabs(p.blocks);
  at::Tensor merged = slabs > 0 ? at::empty({3, slabs, c_out}, stats.options()) : at::Tensor();
  p.slabs = slabs > 0 ? merged.data_ptr() : nullptr;
  const char* error = launch_batch_norm_train(p, stream_of(x));
  check_launch(error, "batch norm");
  return {z, y, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_backward(
    const at::Tensor& dz, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& y, const at::Tensor& scale,
    const at::Tensor& shift, const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var, double eps,
    int64_t stride, int64_t dilation, int64_t groups, bool need_dx, bool need_dw, bool need_dparams) {
  const auto [h_out, w_out] = check_conv(x, weight, stride, dilation, groups);
  const int64_t c_out = weight.size(0);
  const std::vector<int64_t> out_sizes{x.size(0), c_out, h_out, w_out};
  for (const auto& [t, name] : {std::pair{&dz, "grad_output"}, std::pair{&y, "y"}}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef(out_sizes), "resnext_kernels: ", name, " must have shape ",
                at::IntArrayRef(out_sizes), ", got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "resnext_kernels: ", name, " must be ", x.scalar_type(), ", got ",
                t->scalar_type());
    check_device(*t, name, x);
  }
  check_per_channel(scale, "scale", x, c_out, true);
  check_per_channel(shift, "shift", x, c_out, true);
  TORCH_CHECK(mean.has_value() == var.has_value(), "resnext_kernels: mean and var must both be given or both be None");
  at::Tensor mean_c, var_c;
  if (mean.has_value()) {
    check_per_channel(*mean, "mean", x, c_out, true);
    check_per_channel(*var, "var", x, c_out, true);
    mean_c = mean->contiguous();
    var_c = var->contiguous();
  }
  const auto acc = acc_type_of(x);
  at::Tensor dx = need_dx ? empty_like_format(x, x.sizes()) : at::empty({0}, x.options());
  at::Tensor dw = need_dw ? at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous))
                          : at::empty({0}, weight.options());
  at::Tensor dparams = need_dparams ? at::empty({2, c_out}, x.options().dtype(acc)) : at::empty({0}, x.options().dtype(acc));
  if (x.size(0) == 0) {
    dx.zero_();
    dw.zero_();
    dparams.zero_();
    return {dx, dw, dparams};
  }
  const DeviceScope scope(x);
  const at::Tensor weight_c = weight.contiguous(), scale_c = scale.contiguous(), shift_c = shift.contiguous();
  ConvBnReluBackwardParams p{};
  p.x = x.data_ptr();
  p.weight = weight_c.data_ptr();
  p.y = y.data_ptr();
  p.dz = dz.data_ptr();
  p.scale = scale_c.data_ptr();
  p.shift = shift_c.data_ptr();
  p.mean = mean_c.defined() ? mean_c.data_ptr() : nullptr;
  p.var = var_c.defined() ? var_c.data_ptr() : nullptr;
  p.eps = eps;
  p.dx = need_dx ? dx.data_ptr() : nullptr;
  p.dw = need_dw ? dw.data_ptr() : nullptr;
  p.dparams = need_dparams ? dparams.data_ptr() : nullptr;
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
    p.y_stride[i] = y.stride(i);
    p.dz_stride[i] = dz.stride(i);
    p.dx_stride[i] = need_dx ? dx.stride(i) : 0;
  }
  p.stride = int(stride);
  p.dilation = int(dilation);
  p.groups = int(groups);
  p.sm_count = sm_count();
  at::Tensor workspace = at::empty({backward_workspace_elements(p)}, x.options().dtype(acc));
  p.workspace = workspace.data_ptr();
  const char* error = launch_conv_bn_relu_backward(p, stream_of(x));
  check_launch(error, "conv_bn_relu_backward");
  return {dx, dw, dparams};
}

}  // namespace

TORCH_LIBRARY_IMPL(RK_NAMESPACE, RK_DISPATCH_KEY, m) {
  m.impl("conv_bn_relu_folded", &conv_bn_relu_folded);
  m.impl("grouped_conv", &grouped_conv);
  m.impl("conv_bn_relu_train", &conv_bn_relu_train);
  m.impl("conv_bn_relu_backward", &conv_bn_relu_backward);
}

}  // namespace resnext_kernels
