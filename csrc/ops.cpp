// The thin binding between the dispatcher and the torch-free kernels: checks inputs with clear
// messages, allocates outputs, fills the params struct, launches on the current stream and checks
// the launch. Compiled into the nvcc build (CUDA dispatch key) and, with RESNEXT_KERNELS_EMULATE,
// into the host test build (CPU dispatch key, kernels run by csrc/emulate/).

#include <algorithm>
#include <limits>

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
  // The kernels take them as 32-bit ints (resnext_kernels.grouped_conv_bn_relu clamps stride and
  // dilation to the image's longer side, where larger values change nothing).
  TORCH_CHECK(stride < (int64_t(1) << 31) && dilation < (int64_t(1) << 31) && groups < (int64_t(1) << 31),
              "resnext_kernels: stride, dilation and groups must be < 2^31, got ", stride, ", ", dilation, ", ", groups);
  TORCH_CHECK(x.size(1) > 0, "resnext_kernels: x must have at least one channel, got ", x.sizes());
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
  // And a row or column index with a tap's reach, from -dilation to side - 1 + dilation.
  TORCH_CHECK(std::max(x.size(2), x.size(3)) + 2 * dilation < (int64_t(1) << 31),
              "resnext_kernels: an image side plus twice the dilation must be < 2^31, got x of shape ", x.sizes(),
              " and dilation ", dilation);
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

// Memory the kernels write: on a GPU, PyTorch's caching allocator hands back whatever earlier kernels
// left there. The host test build fills it with NaN instead (a fresh CPU allocation would read as
// zeros), so that an element a kernel fails to write shows up in the tests.
at::Tensor unwritten(at::Tensor t) {
#ifdef RESNEXT_KERNELS_EMULATE
  t.fill_(std::numeric_limits<double>::quiet_NaN());
#endif
  return t;
}

at::Tensor empty_like_format(const at::Tensor& x, at::IntArrayRef sizes) {
  const auto format = is_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  return unwritten(at::empty(sizes, x.options().memory_format(format)));
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
ConvBnReluParams conv_params(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out, int64_t stride,
                             int64_t dilation, int64_t groups) {
  ConvBnReluParams p{};
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.out = out.data_ptr();
  p.dtype = dtype_of(x);
  p.n = x.size(0);
  p.c_in = x.size(1);
  p.h = x.size(2);
  p.w = x.size(3);
  p.c_out = weight.size(0);
  p.h_out = out.size(2);
  p.w_out = out.size(3);
  for (int i = 0; i < 4; ++i) {
    p.x_stride[i] = x.stride(i);
    p.out_stride[i] = out.stride(i);
    p.weight_stride[i] = weight.stride(i);
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
  const at::Tensor scale_c = scale.contiguous(), shift_c = shift.contiguous();
  ConvBnReluParams p = conv_params(x, weight, out, stride, dilation, groups);
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
  ConvBnReluParams p = conv_params(x, weight, y, stride, dilation, groups);
  if (partials != nullptr) {
    const int64_t blocks = conv_stats_blocks(p);
    *partials = unwritten(at::empty({3, blocks, weight.size(0)}, x.options().dtype(acc_type_of(x))));
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

// gamma and beta in the accumulation type, checked; undefined where absent.
std::pair<at::Tensor, at::Tensor> batch_norm_affine(const std::optional<at::Tensor>& bn_weight,
                                                    const std::optional<at::Tensor>& bn_bias, const at::Tensor& x,
                                                    int64_t channels) {
  at::Tensor gamma, beta;
  if (bn_weight.has_value()) {
    check_per_channel(*bn_weight, "bn_weight", x, channels, false);
    gamma = bn_weight->to(acc_type_of(x)).contiguous();
  }
  if (bn_bias.has_value()) {
    check_per_channel(*bn_bias, "bn_bias", x, channels, false);
    beta = bn_bias->to(acc_type_of(x)).contiguous();
  }
  return {gamma, beta};
}

// Params of the normalisation: z from y (and the residual), all dense in z's memory format.
BatchNormReluParams normalize_params(const at::Tensor& y, const at::Tensor& residual, const at::Tensor& z) {
  BatchNormReluParams p{};
  p.y = y.data_ptr();
  p.residual = residual.defined() ? residual.data_ptr() : nullptr;
  p.z = z.data_ptr();
  p.dtype = dtype_of(y);
  p.numel = z.numel();
  p.c = z.size(1);
  p.hw = z.size(2) * z.size(3);
  p.channels_last = is_channels_last(z);
  return p;
}

// Training pass 2: merges pass 1's partial statistics of y into the statistics it returns (rows
// mean, biased var, scale, shift), then z = relu(y * scale + shift [+ residual]).
at::Tensor merge_and_normalize(const at::Tensor& y, const at::Tensor& residual, const at::Tensor& z,
                               const at::Tensor& partials, const std::pair<at::Tensor, at::Tensor>& affine,
                               double eps) {
  at::Tensor stats = unwritten(at::empty({4, z.size(1)}, y.options().dtype(acc_type_of(y))));
  BatchNormReluParams p = normalize_params(y, residual, z);
  p.partials = partials.data_ptr();
  p.blocks = partials.size(1);
  p.gamma = affine.first.defined() ? affine.first.data_ptr() : nullptr;
  p.beta = affine.second.defined() ? affine.second.data_ptr() : nullptr;
  p.eps = eps;
  p.stats = stats.data_ptr();
  const int64_t slabs = batch_norm_train_slabs(p.blocks);
  at::Tensor merged = slabs > 0 ? unwritten(at::empty({3, slabs, z.size(1)}, stats.options())) : at::Tensor();
  p.slabs = slabs > 0 ? merged.data_ptr() : nullptr;
  check_launch(launch_batch_norm_train(p, stream_of(y)), "batch norm");
  return stats;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_train(const at::Tensor& x, const at::Tensor& weight,
                                                                  const std::optional<at::Tensor>& bn_weight,
                                                                  const std::optional<at::Tensor>& bn_bias, double eps,
                                                                  int64_t stride, int64_t dilation, int64_t groups) {
  check_conv(x, weight, stride, dilation, groups);
  const auto affine = batch_norm_affine(bn_weight, bn_bias, x, weight.size(0));
  const DeviceScope scope(x);
  at::Tensor partials;
  at::Tensor y = conv_pass1(x, weight, stride, dilation, groups, &partials);
  TORCH_CHECK(y.numel() > 0, "resnext_kernels: batch statistics need a non-empty batch, got x of shape ", x.sizes());
  at::Tensor z = unwritten(at::empty_like(y));
  at::Tensor stats = merge_and_normalize(y, at::Tensor(), z, partials, affine, eps);
  return {z, y, stats};
}

// The per-channel inputs of a BatchNorm + ReLU backward, checked, contiguous.
struct BackwardPerChannel {
  at::Tensor scale, shift, mean, var;  // mean and var undefined when folded
};

BackwardPerChannel backward_per_channel(const at::Tensor& scale, const at::Tensor& shift,
                                        const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var,
                                        const at::Tensor& x, int64_t channels) {
  check_per_channel(scale, "scale", x, channels, true);
  check_per_channel(shift, "shift", x, channels, true);
  TORCH_CHECK(mean.has_value() == var.has_value(), "resnext_kernels: mean and var must both be given or both be None");
  BackwardPerChannel pc{scale.contiguous(), shift.contiguous(), at::Tensor(), at::Tensor()};
  if (mean.has_value()) {
    check_per_channel(*mean, "mean", x, channels, true);
    check_per_channel(*var, "var", x, channels, true);
    pc.mean = mean->contiguous();
    pc.var = var->contiguous();
  }
  return pc;
}

// The BatchNorm part of the backward params: y (the BatchNorm's input), dz, the per-channel tensors
// and dparams (null when not wanted).
void set_batch_norm_backward(ConvBnReluBackwardParams& p, const at::Tensor& y, const at::Tensor& dz,
                             const BackwardPerChannel& pc, double eps, at::Tensor& dparams, bool need_dparams) {
  p.y = y.data_ptr();
  p.dz = dz.data_ptr();
  p.scale = pc.scale.data_ptr();
  p.shift = pc.shift.data_ptr();
  p.mean = pc.mean.defined() ? pc.mean.data_ptr() : nullptr;
  p.var = pc.var.defined() ? pc.var.data_ptr() : nullptr;
  p.eps = eps;
  p.dparams = need_dparams ? dparams.data_ptr() : nullptr;
  p.dtype = dtype_of(y);
  p.n = y.size(0);
  p.c_out = y.size(1);
  p.h_out = y.size(2);
  p.w_out = y.size(3);
  for (int i = 0; i < 4; ++i) {
    p.y_stride[i] = y.stride(i);
    p.dz_stride[i] = dz.stride(i);
  }
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
  const BackwardPerChannel per_channel = backward_per_channel(scale, shift, mean, var, x, c_out);
  const auto acc = acc_type_of(x);
  at::Tensor dx = need_dx ? empty_like_format(x, x.sizes()) : at::empty({0}, x.options());
  const auto dw_options = weight.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dw = need_dw ? unwritten(at::empty(weight.sizes(), dw_options)) : at::empty({0}, weight.options());
  at::Tensor dparams = need_dparams ? unwritten(at::empty({2, c_out}, x.options().dtype(acc)))
                                    : at::empty({0}, x.options().dtype(acc));
  if (x.size(0) == 0) {
    dx.zero_();
    dw.zero_();
    dparams.zero_();
    return {dx, dw, dparams};
  }
  const DeviceScope scope(x);
  ConvBnReluBackwardParams p{};
  set_batch_norm_backward(p, y, dz, per_channel, eps, dparams, need_dparams);
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.dx = need_dx ? dx.data_ptr() : nullptr;
  p.dw = need_dw ? dw.data_ptr() : nullptr;
  p.c_in = x.size(1);
  p.h = x.size(2);
  p.w = x.size(3);
  for (int i = 0; i < 4; ++i) {
    p.x_stride[i] = x.stride(i);
    p.dx_stride[i] = need_dx ? dx.stride(i) : 0;
    p.weight_stride[i] = weight.stride(i);
  }
  p.stride = int(stride);
  p.dilation = int(dilation);
  p.groups = int(groups);
  p.sm_count = sm_count();
  at::Tensor workspace = unwritten(at::empty({backward_workspace_elements(p)}, x.options().dtype(acc)));
  p.workspace = workspace.data_ptr();
  const char* error = launch_conv_bn_relu_backward(p, stream_of(x));
  check_launch(error, "conv_bn_relu_backward");
  return {dx, dw, dparams};
}

// The standalone BatchNorm + ReLU: x and the residual dense in z's memory format.
at::Tensor dense_like_output(const at::Tensor& t, const at::Tensor& x) {
  return t.contiguous(is_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// x, and `other` (the residual or grad_output) of x's shape, dtype and device.
void check_batch_norm_input(const at::Tensor& x, const std::optional<at::Tensor>& other, const char* name) {
  TORCH_CHECK(x.dim() == 4, "resnext_kernels: x must be 4-D (N, C, H, W), got ", x.sizes());
  dtype_of(x);
  // As check_conv: the reductions index one image's pixels in 32 bits.
  TORCH_CHECK(x.size(2) * x.size(3) < (int64_t(1) << 31), "resnext_kernels: images of more than 2^31 - 1 pixels ",
              "(H x W) are not supported, got ", x.sizes());
  if (other.has_value()) {
    TORCH_CHECK(other->sizes() == x.sizes(), "resnext_kernels: ", name, " must have x's shape ", x.sizes(), ", got ",
                other->sizes());
    TORCH_CHECK(other->scalar_type() == x.scalar_type(), "resnext_kernels: ", name, " must be ", x.scalar_type(),
                ", got ", other->scalar_type());
    check_device(*other, name, x);
  }
}

std::tuple<at::Tensor, at::Tensor> batch_norm_relu_train(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                         const std::optional<at::Tensor>& bn_weight,
                                                         const std::optional<at::Tensor>& bn_bias, double eps) {
  check_batch_norm_input(x, residual, "residual");
  const int64_t c = x.size(1);
  const auto affine = batch_norm_affine(bn_weight, bn_bias, x, c);
  TORCH_CHECK(x.numel() > 0, "resnext_kernels: batch statistics need a non-empty batch, got x of shape ", x.sizes());
  const DeviceScope scope(x);
  const at::Tensor x_c = dense_like_output(x, x);
  const at::Tensor residual_c = residual.has_value() ? dense_like_output(*residual, x) : at::Tensor();
  at::Tensor z = empty_like_format(x, x.sizes());
  BatchNormStatsParams stats_params{};
  stats_params.x = x_c.data_ptr();
  stats_params.dtype = dtype_of(x);
  stats_params.n = x.size(0);
  stats_params.c = c;
  stats_params.hw = x.size(2) * x.size(3);
  stats_params.channels_last = is_channels_last(x_c);
  at::Tensor partials =
      unwritten(at::empty({3, batch_norm_stats_blocks(stats_params), c}, x.options().dtype(acc_type_of(x))));
  stats_params.partials = partials.data_ptr();
  check_launch(launch_batch_norm_stats(stats_params, stream_of(x)), "batch norm statistics");
  at::Tensor stats = merge_and_normalize(x_c, residual_c, z, partials, affine, eps);
  return {z, stats};
}

at::Tensor batch_norm_relu_folded(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                  const at::Tensor& scale, const at::Tensor& shift) {
  check_batch_norm_input(x, residual, "residual");
  check_per_channel(scale, "scale", x, x.size(1), true);
  check_per_channel(shift, "shift", x, x.size(1), true);
  const DeviceScope scope(x);
  const at::Tensor x_c = dense_like_output(x, x);
  at::Tensor z = empty_like_format(x, x.sizes());
  if (z.numel() == 0) return z;
  const at::Tensor residual_c = residual.has_value() ? dense_like_output(*residual, x) : at::Tensor();
  const at::Tensor scale_c = scale.contiguous(), shift_c = shift.contiguous();
  const BatchNormReluParams p = normalize_params(x_c, residual_c, z);
  check_launch(launch_normalize_relu(p, scale_c.data_ptr(), shift_c.data_ptr(), stream_of(x)), "batch norm");
  return z;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward(
    const at::Tensor& dz, const at::Tensor& x, const std::optional<at::Tensor>& output, const at::Tensor& scale,
    const at::Tensor& shift, const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var, double eps,
    bool relu_mask, bool need_dx, bool need_dparams) {
  check_batch_norm_input(x, dz, "grad_output");
  check_batch_norm_input(x, output, "output");
  TORCH_CHECK(relu_mask || !output.has_value(), "resnext_kernels: output (the ReLU mask's source) needs relu_mask=True");
  const int64_t c = x.size(1);
  const BackwardPerChannel per_channel = backward_per_channel(scale, shift, mean, var, x, c);
  const auto acc = acc_type_of(x);
  at::Tensor dx = need_dx ? empty_like_format(x, x.sizes()) : at::empty({0}, x.options());
  at::Tensor dparams =
      need_dparams ? unwritten(at::empty({2, c}, x.options().dtype(acc))) : at::empty({0}, x.options().dtype(acc));
  at::Tensor g = output.has_value() ? empty_like_format(x, x.sizes()) : at::empty({0}, x.options());
  if (x.numel() == 0) {
    dparams.zero_();
    return {dx, dparams, g};
  }
  const DeviceScope scope(x);
  ConvBnReluBackwardParams p{};
  set_batch_norm_backward(p, x, dz, per_channel, eps, dparams, need_dparams);
  p.dx = need_dx ? dx.data_ptr() : nullptr;
  p.z = output.has_value() ? output->data_ptr() : nullptr;
  p.g = output.has_value() ? g.data_ptr() : nullptr;
  for (int i = 0; i < 4; ++i) {
    p.dx_stride[i] = need_dx ? dx.stride(i) : 0;
    p.z_stride[i] = output.has_value() ? output->stride(i) : 0;
    p.g_stride[i] = output.has_value() ? g.stride(i) : 0;
  }
  at::Tensor workspace =
      unwritten(at::empty({batch_norm_relu_backward_workspace_elements(p)}, x.options().dtype(acc)));
  p.workspace = workspace.data_ptr();
  check_launch(launch_batch_norm_relu_backward(p, relu_mask, stream_of(x)), "batch_norm_relu_backward");
  return {dx, dparams, g};
}

}  // namespace

TORCH_LIBRARY_IMPL(RK_NAMESPACE, RK_DISPATCH_KEY, m) {
  m.impl("batch_norm_relu_train", &batch_norm_relu_train);
  m.impl("batch_norm_relu_folded", &batch_norm_relu_folded);
  m.impl("batch_norm_relu_backward", &batch_norm_relu_backward);
  m.impl("conv_bn_relu_folded", &conv_bn_relu_folded);
  m.impl("grouped_conv", &grouped_conv);
  m.impl("conv_bn_relu_train", &conv_bn_relu_train);
  m.impl("conv_bn_relu_backward", &conv_bn_relu_backward);
}

}  // namespace resnext_kernels
