// The standalone BatchNorm + ReLU, z = relu(batch_norm(x) [+ residual]): ResNeXtBlock's bn1 + relu
// and bn3 + add + relu, which an eager step runs as separate passes (batch_norm reads x twice and
// writes its output, the add and the ReLU read and write it again; backward 8 transfers where this
// needs 5 without a residual).
//
// Training forward: moments (here) writes per (pixel block, channel) partial statistics of x, which
// batch_norm_train.cuh merges and normalises with, as for the convolution's y. Inference: the
// normalisation alone. Backward: the reductions and coefficients of batch_norm_relu_backward.cuh,
// then input_grad (here) writes the BatchNorm input's gradient dy where the fused convolution
// computes it on the fly.
#pragma once

#include "batch_norm_relu_backward.cuh"
#include "params.h"
#include "platform.cuh"

namespace resnext_kernels {
namespace bn_relu {

// Blocked as the backward's reductions: kChannels channels by pixel ranges of at least kReducePixels,
// at most kMaxReduceBlocks of them (the merge is two-stage beyond 256).
using backward::ceil_div;
using backward::kChannels;
using backward::kLanes;
using backward::kThreads;
using backward::kVectorLanes;

inline int64_t pixels_per_block(const BatchNormStatsParams& p) {
  const int64_t per = ceil_div(p.n * p.hw, backward::kMaxReduceBlocks);
  return per > backward::kReducePixels ? per : backward::kReducePixels;
}

// Moments of one thread's values, kept as sums of deviations from its first value: exact enough
// when |mean| >> std (the first value is then close to the mean), and no division per value.
template <typename Acc>
struct ShiftedMoments {
  Acc count = Acc(0), first = Acc(0), sum = Acc(0), sum_sq = Acc(0);
  __device__ __forceinline__ void add(Acc v) {
    if (count == Acc(0)) first = v;
    const Acc d = v - first;
    count += Acc(1), sum += d, sum_sq += d * d;
  }
  // (count, mean, sum of squares around the mean), as merge_moments takes them; the difference
  // rounded below zero (nearly equal values) is clamped, so no variance comes out negative.
  __device__ __forceinline__ void finish(Acc& n, Acc& mean, Acc& m2) const {
    n = count;
    mean = count == Acc(0) ? Acc(0) : first + sum / count;
    const Acc centered = count == Acc(0) ? Acc(0) : sum_sq - sum * (sum / count);
    m2 = centered < Acc(0) ? Acc(0) : centered;  // NaN stays NaN
  }
};

// Lane l's moments of channel c_local sit in shared[.][l][c_local]; thread c_local merges the lanes
// in order and writes the block's partial (count, mean, M2) of channel c.
template <typename Acc, int kLaneCount>
__device__ __forceinline__ void write_partial(const BatchNormStatsParams& p, Acc (*shared)[kLaneCount][kChannels],
                                              int64_t c, int c_local) {
  Acc count = Acc(0), mean = Acc(0), m2 = Acc(0);
  for (int l = 0; l < kLaneCount; ++l) merge_moments(count, mean, m2, shared[0][l][c_local], shared[1][l][c_local],
                                                     shared[2][l][c_local]);
  Acc* partials = static_cast<Acc*>(p.partials);
  const int64_t plane = int64_t(gridDim.x) * p.c, at = int64_t(blockIdx.x) * p.c + c;
  partials[at] = count;
  partials[plane + at] = mean;
  partials[2 * plane + at] = m2;
}

// Pixel block blockIdx.x, channels blockIdx.y * kChannels + ...: channel-fast thread order for
// channels-last x, pixel-fast for NCHW, so that loads are contiguous either way.
template <typename T>
__global__ void __launch_bounds__(kThreads) moments(const BatchNormStatsParams p, int64_t pixels_per_block) {
  using Acc = typename Numeric<T>::Acc;
  __shared__ Acc shared[3][kLanes][kChannels];
  const int tid = int(threadIdx.x);
  const int c_local = p.channels_last ? tid % kChannels : tid / kLanes;
  const int lane = p.channels_last ? tid / kChannels : tid % kLanes;
  const int64_t c = int64_t(blockIdx.y) * kChannels + c_local;
  const int64_t m0 = int64_t(blockIdx.x) * pixels_per_block, total = p.n * p.hw;
  const int64_t m1 = m0 + pixels_per_block < total ? m0 + pixels_per_block : total;
  ShiftedMoments<Acc> moments;
  if (c < p.c) {
    const T* x = static_cast<const T*>(p.x);
    // Pixel m = n * hw + s sits at m * c + channel (channels-last) or (n * c + channel) * hw + s.
    int64_t n = (m0 + lane) / p.hw, s = (m0 + lane) % p.hw;
    for (int64_t m = m0 + lane; m < m1; m += kLanes) {
      moments.add(Numeric<T>::load(x[p.channels_last ? m * p.c + c : (n * p.c + c) * p.hw + s]));
      s += kLanes;
      while (s >= p.hw) s -= p.hw, ++n;
    }
  }
  moments.finish(shared[0][lane][c_local], shared[1][lane][c_local], shared[2][lane][c_local]);
  __syncthreads();
  const int64_t c_merged = int64_t(blockIdx.y) * kChannels + tid;
  if (tid < kChannels && c_merged < p.c) write_partial<Acc, kLanes>(p, shared, c_merged, tid);
}

// The same for dense channels-last 16-bit x with c % 8 == 0 and 16-byte alignment: a thread takes 8
// channels of a pixel per 16-byte load.
template <typename T>
__global__ void __launch_bounds__(kThreads) moments_vector(const BatchNormStatsParams p, int64_t pixels_per_block) {
  __shared__ float shared[3][kVectorLanes][kChannels];
  const int tid = int(threadIdx.x), c_local = tid % (kChannels / 8) * 8, lane = tid / (kChannels / 8);
  const int64_t c0 = int64_t(blockIdx.y) * kChannels + c_local;  // the first of this thread's 8 channels
  const int64_t m0 = int64_t(blockIdx.x) * pixels_per_block, total = p.n * p.hw;
  const int64_t m1 = m0 + pixels_per_block < total ? m0 + pixels_per_block : total;
  ShiftedMoments<float> moments[8];
  if (c0 < p.c) {
    const uint16_t* x = static_cast<const uint16_t*>(p.x) + c0;
    for (int64_t m = m0 + lane; m < m1; m += kVectorLanes) {
      const uint4 x8 = *reinterpret_cast<const uint4*>(x + m * p.c);
      const uint32_t words[4] = {x8.x, x8.y, x8.z, x8.w};
#pragma unroll
      for (int e = 0; e < 8; ++e) moments[e].add(Numeric<T>::from_bits(uint16_t(words[e / 2] >> (16 * (e % 2)))));
    }
  }
#pragma unroll
  for (int e = 0; e < 8; ++e)
    moments[e].finish(shared[0][lane][c_local + e], shared[1][lane][c_local + e], shared[2][lane][c_local + e]);
  __syncthreads();
  const int64_t c = int64_t(blockIdx.y) * kChannels + tid;
  if (tid < kChannels && c < p.c) write_partial<float, kVectorLanes>(p, shared, c, tid);
}

template <typename T>
const char* launch_stats(const BatchNormStatsParams& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  const int64_t blocks = batch_norm_stats_blocks(p), channel_tiles = ceil_div(p.c, kChannels);
  if (!grid_fits(blocks, channel_tiles)) return kGridTooLarge;
  const dim3 grid{unsigned(blocks), unsigned(channel_tiles)};
  if constexpr (sizeof(T) == 2) {
    if (p.channels_last && p.c % 8 == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0) {
      auto kernel = moments_vector<T>;
      RK_LAUNCH(kernel, grid, dim3(kThreads), 0, s, p, pixels_per_block(p));
      return RK_LAUNCH_ERROR();
    }
  }
  auto kernel = moments<T>;
  RK_LAUNCH(kernel, grid, dim3(kThreads), 0, s, p, pixels_per_block(p));
  return RK_LAUNCH_ERROR();
}

using backward::P;

// dy (the BatchNorm input's gradient) of every element, written to the dense dx in y's memory format
// (channels_last or NCHW), grid-stride.
template <typename T, bool kMask>
__global__ void __launch_bounds__(kThreads) input_grad(const P p, bool channels_last) {
  using Acc = typename Numeric<T>::Acc;
  const Acc* coef = backward::workspace_of<Acc>(p).coef;
  T* dx = static_cast<T*>(p.dx);
  const int64_t c = p.c_out, h = p.h_out, w = p.w_out, numel = p.n * c * h * w;
  const int64_t step = int64_t(gridDim.x) * kThreads;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < numel; i += step) {
    int64_t n, ch, oh, ow;
    if (channels_last) {
      ch = i % c;
      const int64_t m = i / c;
      ow = m % w, oh = m / w % h, n = m / (w * h);
    } else {
      ow = i % w, oh = i / w % h;
      const int64_t plane = i / (w * h);
      ch = plane % c, n = plane / c;
    }
    dx[i] = Numeric<T>::store(backward::dy_at<T, kMask>(p, coef, n, ch, oh, ow));
  }
}

// The same for 16-bit y, dz and dx, all dense channels-last and 16-byte aligned, c % 8 == 0: thread t
// always takes the 8 channels (t % (c / 8)) * 8 .. + 7 (as normalize_relu_vectors).
template <typename T, bool kMask>
__global__ void __launch_bounds__(kThreads) input_grad_vector(const P p, int64_t stride) {
  const int64_t first = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (first >= stride) return;
  const float* coef = backward::workspace_of<float>(p).coef;
  const int co = int(first % (p.c_out / 8)) * 8;
  const uint4* y = static_cast<const uint4*>(p.y);
  const uint4* dz = static_cast<const uint4*>(p.dz);
  uint4* dx = static_cast<uint4*>(p.dx);
  const int64_t vectors = p.n * p.c_out * p.h_out * p.w_out / 8;
  for (int64_t v = first; v < vectors; v += stride) dx[v] = backward::dy_vector<T, kMask>(p, coef, co, y[v], dz[v]);
}

template <typename T, backward::Mask kReductionMask, bool kMask>
const char* launch_backward(const P& reduce_params, const P& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (const char* error = backward::launch_reductions<T, kReductionMask>(reduce_params, s)) return error;
  if (p.dx == nullptr) return nullptr;
  const int64_t numel = p.n * p.c_out * p.h_out * p.w_out;
  const int64_t dense_channels_last[4] = {p.h_out * p.w_out * p.c_out, 1, p.w_out * p.c_out, p.c_out};
  bool dx_channels_last = true;
  for (int i = 0; i < 4; ++i) dx_channels_last &= p.dx_stride[i] == dense_channels_last[i];
  if constexpr (sizeof(T) == 2) {
    if (dx_channels_last && backward::dense_channels_last_vectors(p) && reinterpret_cast<uintptr_t>(p.dx) % 16 == 0) {
      const int64_t stride = channel_vector_stride(numel, p.c_out, kThreads);
      auto kernel = input_grad_vector<T, kMask>;
      RK_LAUNCH(kernel, dim3(unsigned((stride + kThreads - 1) / kThreads)), dim3(kThreads), 0, s, p, stride);
      return RK_LAUNCH_ERROR();
    }
  }
  auto kernel = input_grad<T, kMask>;
  RK_LAUNCH(kernel, dim3(grid_stride_blocks(numel, kThreads)), dim3(kThreads), 0, s, p, dx_channels_last);
  return RK_LAUNCH_ERROR();
}

template <typename T>
const char* launch_backward(const P& p, bool relu_mask, void* stream) {
  using backward::Mask;
  if (!relu_mask) return launch_backward<T, Mask::kNone, false>(p, p, stream);
  if (p.z == nullptr) return launch_backward<T, Mask::kFromY, true>(p, p, stream);
  // The mask from z: the reductions write g, which the dx pass reads as its (already masked) dz.
  P masked = p;
  masked.dz = p.g;
  for (int i = 0; i < 4; ++i) masked.dz_stride[i] = p.g_stride[i];
  masked.z = nullptr;
  masked.g = nullptr;
  return launch_backward<T, Mask::kFromOutput, false>(p, masked, stream);
}

}  // namespace bn_relu

int64_t batch_norm_stats_blocks(const BatchNormStatsParams& p) {
  return bn_relu::ceil_div(p.n * p.hw, bn_relu::pixels_per_block(p));
}

const char* launch_batch_norm_stats(const BatchNormStatsParams& p, void* stream) {
  switch (p.dtype) {
    case DType::kFloat32: return bn_relu::launch_stats<float>(p, stream);
    case DType::kFloat64: return bn_relu::launch_stats<double>(p, stream);
    case DType::kFloat16: return bn_relu::launch_stats<__half>(p, stream);
    case DType::kBFloat16: return bn_relu::launch_stats<__nv_bfloat16>(p, stream);
  }
  return "unsupported dtype";
}

int64_t batch_norm_relu_backward_workspace_elements(const ConvBnReluBackwardParams& p) {
  return backward::kRows * p.c_out + 2 * backward::reduce_blocks(p) * p.c_out;
}

const char* launch_batch_norm_relu_backward(const ConvBnReluBackwardParams& p, bool relu_mask, void* stream) {
  switch (p.dtype) {
    case DType::kFloat32: return bn_relu::launch_backward<float>(p, relu_mask, stream);
    case DType::kFloat64: return bn_relu::launch_backward<double>(p, relu_mask, stream);
    case DType::kFloat16: return bn_relu::launch_backward<__half>(p, relu_mask, stream);
    case DType::kBFloat16: return bn_relu::launch_backward<__nv_bfloat16>(p, relu_mask, stream);
  }
  return "unsupported dtype";
}

}  // namespace resnext_kernels
