// Training forward, pass 2: merge the per-block statistics of pass 1 (conv_bn_relu_folded.cuh with
// kTrain, or batch_norm_relu.cuh's for the standalone op) into per-channel mean and biased variance,
// fold them with gamma and beta into a scale and shift, then z = relu(y * scale + shift) elementwise,
// with the standalone op's residual added before the ReLU. The normalisation also serves inference.
//
// Why y is written rather than recomputed, in activation-sized transfers (C_in = C_out, as in
// ResNeXt): the forward with write-y reads x, writes y, reads y, writes z (4); with recompute it
// reads x (statistics), reads x again and writes z (3). But the backward needs y everywhere: here it
// reads (y, dz) for the reductions, (y, dz) for dgrad plus writes dx, and (y, dz, x) for wgrad (8);
// with recompute it must first rebuild y (read x, write y: +2, and a second convolution). A training
// step moves 12 with write-y against 13, with one convolution fewer. Recompute would only win for a
// training-mode forward that is never differentiated.
#pragma once

#include "params.h"
#include "platform.cuh"

namespace resnext_kernels {
namespace bn_train {

constexpr int kThreads = 256;
constexpr int kChannels = 8;                   // channels per merge block
constexpr int kLanes = kThreads / kChannels;   // threads sharing one channel's partials
constexpr int kSlab = 8 * kLanes;              // blocks per first-stage merge block

// Block (row block b, channel tile): blockIdx.x = b * channel tiles + channel tile (one grid
// dimension: row blocks can outnumber gridDim.y's limit). Merges rows [b * rows_per_block, ...) of
// `in` ([3][rows][c]: count, mean, M2) for kChannels channels: lane l takes rows l, l + kLanes, ...
// in order, then lane 0 merges the lanes in order. Not final: writes row b of `out`
// ([3][row blocks][c]). Final (one row block): writes stats = mean, var, scale, shift.
template <typename Acc>
__global__ void __launch_bounds__(kThreads) merge_statistics(const BatchNormReluParams p, const Acc* in, int64_t rows,
                                                             int64_t rows_per_block, Acc* out, bool final) {
  __shared__ Acc shared[3][kLanes][kChannels];
  const int c_local = int(threadIdx.x) % kChannels, lane = int(threadIdx.x) / kChannels;
  const int64_t channel_tiles = (p.c + kChannels - 1) / kChannels, row_block = blockIdx.x / channel_tiles;
  const int64_t c = (blockIdx.x - row_block * channel_tiles) * kChannels + c_local;
  const int64_t plane = rows * p.c, r0 = row_block * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < rows ? r0 + rows_per_block : rows;
  Acc count = Acc(0), mean = Acc(0), m2 = Acc(0);
  if (c < p.c)
    for (int64_t r = r0 + lane; r < r1; r += kLanes)
      merge_moments(count, mean, m2, in[r * p.c + c], in[plane + r * p.c + c], in[2 * plane + r * p.c + c]);
  shared[0][lane][c_local] = count;
  shared[1][lane][c_local] = mean;
  shared[2][lane][c_local] = m2;
  __syncthreads();
  if (lane != 0 || c >= p.c) return;
  for (int l = 1; l < kLanes; ++l)
    merge_moments(count, mean, m2, shared[0][l][c_local], shared[1][l][c_local], shared[2][l][c_local]);
  if (!final) {
    const int64_t out_plane = gridDim.x / channel_tiles * p.c, at = row_block * p.c + c;
    out[at] = count;
    out[out_plane + at] = mean;
    out[2 * out_plane + at] = m2;
    return;
  }
  const Acc var = m2 / count;
  Acc scale = Acc(1) / sqrt(var + Acc(p.eps));
  if (p.gamma != nullptr) scale *= static_cast<const Acc*>(p.gamma)[c];
  Acc shift = -mean * scale;
  if (p.beta != nullptr) shift += static_cast<const Acc*>(p.beta)[c];
  Acc* stats = static_cast<Acc*>(p.stats);
  stats[c] = mean;
  stats[p.c + c] = var;
  stats[2 * p.c + c] = scale;
  stats[3 * p.c + c] = shift;
}

// z of one element: relu(y * scale + shift), or relu(round(y * scale + shift) + residual), each
// rounded to T where an unfused batch_norm and add would store it.
template <typename T, bool kResidual, typename Acc = typename Numeric<T>::Acc>
__device__ __forceinline__ T normalized(Acc y, Acc scale, Acc shift, Acc residual) {
  const Acc v = affine(y, scale, shift);
  if constexpr (kResidual) return Numeric<T>::store(relu(rounded<T>(v) + residual));
  return Numeric<T>::store(relu(v));
}

// z over the dense y (residual) and z (same layout), grid-stride.
template <typename T, bool kResidual>
__global__ void __launch_bounds__(kThreads) normalize_relu(const BatchNormReluParams p,
                                                           const typename Numeric<T>::Acc* scale,
                                                           const typename Numeric<T>::Acc* shift) {
  const T* y = static_cast<const T*>(p.y);
  const T* residual = static_cast<const T*>(p.residual);
  T* z = static_cast<T*>(p.z);
  const int64_t step = int64_t(gridDim.x) * kThreads;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < p.numel; i += step) {
    const int64_t c = p.channels_last ? i % p.c : (i / p.hw) % p.c;
    z[i] = normalized<T, kResidual>(Numeric<T>::load(y[i]), scale[c], shift[c],
                                    kResidual ? Numeric<T>::load(residual[i]) : 0);
  }
}

// The same for 16-bit channels-last y and z with c % 8 == 0, 16 bytes at a time: thread t always
// takes the 8 channels (t % (c / 8)) * 8 .. + 7, of pixels t / (c / 8), + stride / (c / 8), ... (the
// stride, in 8-value vectors, is a multiple of c / 8), so its scales and shifts stay in registers
// and no element needs a division.
template <typename T, bool kResidual>
__global__ void __launch_bounds__(kThreads) normalize_relu_vectors(const BatchNormReluParams p, const float* scales,
                                                                   const float* shifts, int64_t stride) {
  const int64_t first = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (first >= stride) return;
  const int c0 = int(first % (p.c / 8)) * 8;
  float scale[8], shift[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) scale[e] = scales[c0 + e], shift[e] = shifts[c0 + e];
  const uint4* y = static_cast<const uint4*>(p.y);
  const uint4* residual = static_cast<const uint4*>(p.residual);
  uint4* z = static_cast<uint4*>(p.z);
  for (int64_t v = first; v < p.numel / 8; v += stride) {
    const uint4 in = y[v];
    const uint32_t words[4] = {in.x, in.y, in.z, in.w};
    uint4 added{};
    if constexpr (kResidual) added = residual[v];
    const uint32_t residual_words[4] = {added.x, added.y, added.z, added.w};
    uint32_t out[4];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int half = 16 * (e % 2);
      const T value = normalized<T, kResidual>(Numeric<T>::from_bits(uint16_t(words[e / 2] >> half)), scale[e], shift[e],
                                               Numeric<T>::from_bits(uint16_t(residual_words[e / 2] >> half)));
      uint16_t bits;
      memcpy(&bits, &value, 2);
      out[e / 2] = e % 2 ? out[e / 2] | uint32_t(bits) << 16 : uint32_t(bits);
    }
    z[v] = {out[0], out[1], out[2], out[3]};
  }
}

// z from y (and the residual) with the per-channel scale and shift.
template <typename T, bool kResidual>
const char* launch_normalize(const BatchNormReluParams& p, const typename Numeric<T>::Acc* scale,
                             const typename Numeric<T>::Acc* shift, cudaStream_t s) {
  if constexpr (sizeof(T) == 2) {
    if (p.channels_last && p.c % 8 == 0 && reinterpret_cast<uintptr_t>(p.y) % 16 == 0 &&
        reinterpret_cast<uintptr_t>(p.z) % 16 == 0 && reinterpret_cast<uintptr_t>(p.residual) % 16 == 0) {
      const int64_t stride = channel_vector_stride(p.numel, p.c, kThreads);
      auto normalize_kernel = normalize_relu_vectors<T, kResidual>;
      RK_LAUNCH(normalize_kernel, dim3(unsigned((stride + kThreads - 1) / kThreads)), dim3(kThreads), 0, s, p, scale,
                shift, stride);
      return RK_LAUNCH_ERROR();
    }
  }
  auto normalize_kernel = normalize_relu<T, kResidual>;
  RK_LAUNCH(normalize_kernel, dim3(grid_stride_blocks(p.numel, kThreads)), dim3(kThreads), 0, s, p, scale, shift);
  return RK_LAUNCH_ERROR();
}

template <typename T>
const char* launch_normalize(const BatchNormReluParams& p, const void* scale, const void* shift, void* stream) {
  using Acc = typename Numeric<T>::Acc;
  const auto s = static_cast<cudaStream_t>(stream);
  const Acc* scales = static_cast<const Acc*>(scale);
  const Acc* shifts = static_cast<const Acc*>(shift);
  return p.residual != nullptr ? launch_normalize<T, true>(p, scales, shifts, s)
                               : launch_normalize<T, false>(p, scales, shifts, s);
}

// Merge, then normalise with the merged scale and shift (rows 2 and 3 of the statistics).
template <typename T>
const char* launch(const BatchNormReluParams& p, void* stream) {
  using Acc = typename Numeric<T>::Acc;
  const auto s = static_cast<cudaStream_t>(stream);
  const int64_t channel_tiles = (p.c + kChannels - 1) / kChannels;
  const Acc* partials = static_cast<const Acc*>(p.partials);
  auto merge_kernel = merge_statistics<Acc>;
  const int64_t slabs = batch_norm_train_slabs(p.blocks);
  if (slabs > 1) {
    if (!grid_fits(slabs * channel_tiles)) return kGridTooLarge;
    Acc* merged = static_cast<Acc*>(p.slabs);
    RK_LAUNCH(merge_kernel, dim3(unsigned(slabs * channel_tiles)), dim3(kThreads), 0, s, p, partials, p.blocks,
              int64_t(kSlab), merged, false);
    if (const char* error = RK_LAUNCH_ERROR()) return error;
    RK_LAUNCH(merge_kernel, dim3(unsigned(channel_tiles)), dim3(kThreads), 0, s, p, merged, slabs, slabs, merged, true);
  } else {
    RK_LAUNCH(merge_kernel, dim3(unsigned(channel_tiles)), dim3(kThreads), 0, s, p, partials, p.blocks, p.blocks,
              nullptr, true);
  }
  if (const char* error = RK_LAUNCH_ERROR()) return error;
  const Acc* stats = static_cast<const Acc*>(p.stats);
  return launch_normalize<T>(p, stats + 2 * p.c, stats + 3 * p.c, stream);
}

}  // namespace bn_train

int64_t batch_norm_train_slabs(int64_t blocks) {
  return blocks > bn_train::kSlab ? (blocks + bn_train::kSlab - 1) / bn_train::kSlab : 0;
}

const char* launch_batch_norm_train(const BatchNormReluParams& p, void* stream) {
  switch (p.dtype) {
    case DType::kFloat32: return bn_train::launch<float>(p, stream);
    case DType::kFloat64: return bn_train::launch<double>(p, stream);
    case DType::kFloat16: return bn_train::launch<__half>(p, stream);
    case DType::kBFloat16: return bn_train::launch<__nv_bfloat16>(p, stream);
  }
  return "unsupported dtype";
}

const char* launch_normalize_relu(const BatchNormReluParams& p, const void* scale, const void* shift, void* stream) {
  switch (p.dtype) {
    case DType::kFloat32: return bn_train::launch_normalize<float>(p, scale, shift, stream);
    case DType::kFloat64: return bn_train::launch_normalize<double>(p, scale, shift, stream);
    case DType::kFloat16: return bn_train::launch_normalize<__half>(p, scale, shift, stream);
    case DType::kBFloat16: return bn_train::launch_normalize<__nv_bfloat16>(p, scale, shift, stream);
  }
  return "unsupported dtype";
}

}  // namespace resnext_kernels
