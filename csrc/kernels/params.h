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
  const void* weight;  // (c_out, c_in / groups, 3, 3), any layout (weight_stride)
  const void* scale;   // (c_out,), float32, or float64 for float64 inputs
  const void* shift;
  void* out;
  DType dtype;
  int64_t n, c_in, h, w;
  int64_t c_out, h_out, w_out;
  int64_t x_stride[4];    // in elements, for (n, c, h, w)
  int64_t out_stride[4];
  int64_t weight_stride[4];  // in elements: a channels-last model's weights are read where they lie
  int stride, dilation, groups;
  int sm_count;  // the device's multiprocessors, to size blocks; 0 in the host test build
  // Training pass 1 only (launch_conv_stats): per (pixel block, channel) partial statistics of y,
  // [3][blocks][c_out] in the accumulation type: count, block mean, sum of squares around the block
  // mean. May be null: then the kernel only writes y.
  void* partials;
};

// Launches on `stream` (a cudaStream_t); returns nullptr or the launch error's description.
const char* launch_conv_bn_relu_folded(const ConvBnReluParams& params, void* stream);

// Training pass 1: y = conv2d(...) (no scale, shift or ReLU) into `out`, in x's dtype, and the
// partial statistics of the stored y into `partials`. conv_stats_blocks: the partials' block count
// (0 only if no tile fit in shared memory, which tap_reach rules out; the launch then reports it).
int64_t conv_stats_blocks(const ConvBnReluParams& params);
const char* launch_conv_stats(const ConvBnReluParams& params, void* stream);

// Training pass 2 (and the standalone BatchNorm + ReLU's normalisation): merges the partials of pass
// 1 in a fixed order (Chan's parallel variance formula), then z = relu(y * scale + shift), or with a
// residual z = relu(round(y * scale + shift) + residual), rounding where an unfused batch_norm and add
// store their outputs.
struct BatchNormReluParams {
  const void* partials;  // [3][blocks][c], from launch_conv_stats or launch_batch_norm_stats
  int64_t blocks;
  const void* gamma;     // (c,), accumulation type, or null (1)
  const void* beta;      // (c,), or null (0)
  double eps;
  void* stats;           // out: [4][c] mean, biased var, scale, shift (accumulation type)
  const void* y;         // y, residual and z: dense, all NCHW or all channels-last
  const void* residual;  // or null
  void* z;
  DType dtype;
  int64_t numel, c, hw;
  bool channels_last;
  void* slabs;  // workspace: [3][batch_norm_train_slabs(blocks)][c], accumulation type (null when 0)
};
// The merge is itself two-stage when there are many blocks: slabs of blocks first, then the slabs.
int64_t batch_norm_train_slabs(int64_t blocks);
const char* launch_batch_norm_train(const BatchNormReluParams& params, void* stream);
// The normalisation alone, with given per-channel scale and shift (accumulation type): inference.
const char* launch_normalize_relu(const BatchNormReluParams& params, const void* scale, const void* shift,
                                  void* stream);

// The standalone BatchNorm + ReLU's training pass 1: the partial statistics of a dense x (NCHW or
// channels-last), as launch_conv_stats writes them for y.
struct BatchNormStatsParams {
  const void* x;
  DType dtype;
  int64_t n, c, hw;
  bool channels_last;
  void* partials;  // out: [3][batch_norm_stats_blocks(params)][c]
};
int64_t batch_norm_stats_blocks(const BatchNormStatsParams& params);
const char* launch_batch_norm_stats(const BatchNormStatsParams& params, void* stream);

// Backward of z = relu(y * scale + shift), y = conv2d(x, weight), where (training) scale and shift
// come from the batch statistics mean, var of y. With g = dz * 1[not z <= 0], z = relu(y * scale + shift)
// as the forward stores it (recomputed from y):
//   folded (mean == null):  dy = scale * g;  dparams = (sum g * y, sum g)   (d scale, d shift)
//   training:  dy = scale * (g - mean(g) - xhat * mean(g * xhat)), xhat = (y - mean) * rstd;
//              dparams = (sum g * xhat, sum g)   (d gamma, d beta)
// dy is never written out: dgrad and wgrad compute it in their prologues from (dz, y) and
// per-channel coefficients. Every reduction is two-stage in a fixed order (deterministic).
struct ConvBnReluBackwardParams {
  const void* x;
  const void* weight;  // (c_out, c_in / groups, 3, 3), any layout (weight_stride)
  const void* y;
  const void* dz;
  const void* scale;   // (c_out,), accumulation type
  const void* shift;
  const void* mean;    // (c_out,) or null (folded)
  const void* var;     // (c_out,) biased batch variance, with mean
  double eps;
  void* dx;            // null: not wanted
  void* dw;            // null: not wanted; (c_out, c_in / groups, 3, 3), contiguous, weight's dtype
  void* dparams;       // out: [2][c_out], accumulation type; null: not wanted (folded: no reductions)
  void* workspace;     // backward_workspace_elements(...) elements of the accumulation type
  const void* z;       // the standalone op's output, whose sign is the ReLU mask; null: mask from y
  void* g;             // with z: out, dz * 1[not z <= 0] in y's shape and dtype
  DType dtype;
  int64_t n, c_in, h, w;
  int64_t c_out, h_out, w_out;
  int64_t x_stride[4], y_stride[4], dz_stride[4], dx_stride[4], z_stride[4], g_stride[4];
  int64_t weight_stride[4];
  int stride, dilation, groups;
  int sm_count;  // as ConvBnReluParams::sm_count
};
int64_t backward_workspace_elements(const ConvBnReluBackwardParams& params);
const char* launch_conv_bn_relu_backward(const ConvBnReluBackwardParams& params, void* stream);

// Backward of the standalone z = relu(y * scale + shift [+ residual]) (y the BatchNorm's input), with
// the fields of ConvBnReluBackwardParams that the BatchNorm part reads: y, dz, the per-channel
// tensors, eps, dx (out: dense, y's memory format; null: not wanted), dparams, workspace, z, g, dtype,
// n, c_out, h_out, w_out (y's sizes) and y_stride, dz_stride, dx_stride, z_stride, g_stride.
// relu_mask: dz is z's gradient, masked where z (recomputed from y) <= 0, or, with z given (a residual),
// where z <= 0, the reductions then writing g = the masked dz for the dx pass and the caller;
// otherwise (a residual, z null) dz is already g = dz * 1[z > 0].
int64_t batch_norm_relu_backward_workspace_elements(const ConvBnReluBackwardParams& params);
const char* launch_batch_norm_relu_backward(const ConvBnReluBackwardParams& params, bool relu_mask, void* stream);

}  // namespace resnext_kernels
