// Backward of z = relu(y * scale + shift) per channel, where (training) scale and shift come from
// the batch statistics of y: the part of the backward that the fused convolution
// (conv_bn_relu_backward.cuh) and the standalone BatchNorm + ReLU (batch_norm_relu.cuh) share.
//
//  1. reduce_partials (reduce_partials_vector where y, dz and, given, z and g are dense channels-last
//     16-bit): per (pixel block, channel) sums of g and g * (y - center), g = dz * 1[not z <= 0] (z
//     recomputed from y as the forward's pass 2 computes and stores it (relu_passes), or read; as
//     torch.relu's backward, a NaN z passes its gradient); skipped when folded and no dparams are
//     wanted (frozen BatchNorm) unless they must write g;
//  2. finalize: sums the partials in a fixed order into dparams and per-channel coefficients with
//     dy = scale * g + B * (y - center) + C (training: center = mean, B = -scale * rstd * mean(g xhat),
//     C = -scale * mean(g); folded: B = C = center = 0).
// The standalone op with a residual, whose ReLU mask depends on the residual too, tests z itself
// (Mask::kFromOutput: the reductions also write g, the residual's gradient, which its dx pass then
// reads unmasked), or hands in g (Mask::kNone, kMask = false: g = dz). The fused convolution computes
// dy on the fly in dgrad and wgrad; the standalone op writes it (input_grad).
#pragma once

#include "params.h"
#include "platform.cuh"

namespace resnext_kernels {
namespace backward {

using P = ConvBnReluBackwardParams;

// Where the reductions' ReLU mask comes from: z recomputed from y (relu_passes), the op's output z, or
// nowhere (dz is g already).
enum class Mask { kNone, kFromY, kFromOutput };

constexpr int kThreads = 256;
constexpr int kChannels = 32;                      // channels per block (reduce, dgrad, wgrad)
constexpr int kLanes = kThreads / kChannels;       // threads sharing one channel
constexpr int kReducePixels = 256;                 // minimum pixels per reduction block
constexpr int kMaxReduceBlocks = 1024;
constexpr int kFinalChannels = 8;                  // finalize: channels per block
constexpr int kFinalLanes = kThreads / kFinalChannels;
// Coefficient rows of the workspace, each c_out wide.
enum Row { kScale = 0, kShift = 1, kB = 2, kC = 3, kCenter = 4, kRows = 5 };

__host__ __device__ inline int64_t pixels(const P& p) { return p.n * p.h_out * p.w_out; }
__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t reduce_pixels_per_block(const P& p) {
  const int64_t per = ceil_div(pixels(p), kMaxReduceBlocks);
  return per > kReducePixels ? per : kReducePixels;
}
inline int64_t reduce_blocks(const P& p) { return ceil_div(pixels(p), reduce_pixels_per_block(p)); }

template <typename Acc>
struct Workspace {
  Acc* coef;      // [kRows][c_out]
  Acc* partials;  // reduction partials [2][blocks][c_out], later wgrad partials [splits][c_out][K]
};
template <typename Acc>
__device__ __forceinline__ Workspace<Acc> workspace_of(const P& p) {
  Acc* base = static_cast<Acc*>(p.workspace);
  return {base, base + kRows * p.c_out};
}

// Whether z = relu(y * scale + shift) passes its gradient. As torch.relu's backward, which tests z as
// stored: not where it is <= 0 (NaN passes), so also not where a positive y * scale + shift rounds
// to zero in T (fp16, below 2^-25).
template <typename T, typename Acc = typename Numeric<T>::Acc>
__device__ __forceinline__ bool relu_passes(Acc yv, Acc scale, Acc shift) {
  return !(rounded<T>(affine(yv, scale, shift)) <= Acc(0));
}

// dy of one element from its y and dz and its channel's coefficients: the one formula of every
// kernel. A zero B (always, folded) contributes nothing, even where y is infinite (0 * Inf = NaN).
template <typename T, bool kMask = true, typename Acc = typename Numeric<T>::Acc>
__device__ __forceinline__ Acc dy_of(Acc yv, Acc dz, Acc scale, Acc shift, Acc b, Acc center, Acc c) {
  const Acc g = !kMask || relu_passes<T>(yv, scale, shift) ? dz : Acc(0);
  return scale * g + (b == Acc(0) ? Acc(0) : b * (yv - center)) + c;
}

// dy at (n, co, oh, ow), from dz and y and the coefficients.
template <typename T, bool kMask = true>
__device__ __forceinline__ typename Numeric<T>::Acc dy_at(const P& p, const typename Numeric<T>::Acc* coef, int64_t n,
                                                           int64_t co, int64_t oh, int64_t ow) {
  const T* y = static_cast<const T*>(p.y);
  const T* dz = static_cast<const T*>(p.dz);
  const int64_t c_out = p.c_out;
  using Acc = typename Numeric<T>::Acc;
  return dy_of<T, kMask>(
      Numeric<T>::load(y[n * p.y_stride[0] + co * p.y_stride[1] + oh * p.y_stride[2] + ow * p.y_stride[3]]),
      Numeric<T>::load(dz[n * p.dz_stride[0] + co * p.dz_stride[1] + oh * p.dz_stride[2] + ow * p.dz_stride[3]]),
      coef[kScale * c_out + co], coef[kShift * c_out + co], coef[kB * c_out + co], coef[kCenter * c_out + co],
      coef[kC * c_out + co]);
}

// Whether dy_vector may serve 16-bit y and dz: both channels-last with 16-byte aligned pixels, and
// 16-byte aligned coefficient rows.
__device__ __forceinline__ bool dy_vectorizable(const P& p) {
  return vector_layout(p.y_stride, p.y) && vector_layout(p.dz_stride, p.dz) && p.c_out % 4 == 0;
}

// Where dy_vector reads the 8 channels co .. co + 7 of y and dz at one pixel.
__device__ __forceinline__ const uint16_t* y_vector_at(const P& p, int64_t n, int co, int64_t oh, int64_t ow) {
  return static_cast<const uint16_t*>(p.y) + n * p.y_stride[0] + co + oh * p.y_stride[2] + ow * p.y_stride[3];
}
__device__ __forceinline__ const uint16_t* dz_vector_at(const P& p, int64_t n, int co, int64_t oh, int64_t ow) {
  return static_cast<const uint16_t*>(p.dz) + n * p.dz_stride[0] + co + oh * p.dz_stride[2] + ow * p.dz_stride[3];
}

// dy of the 8 channels co .. co + 7 (co % 8 == 0, co + 8 <= c_out) at one pixel from their y and
// dz (8 16-bit values each), rounded to the 16-bit T and packed; the coefficients four channels at
// a time.
template <typename T, bool kMask = true>
__device__ __forceinline__ uint4 dy_vector(const P& p, const float* coef, int co, uint4 y8, uint4 dz8) {
  const uint32_t y_words[4] = {y8.x, y8.y, y8.z, y8.w}, dz_words[4] = {dz8.x, dz8.y, dz8.z, dz8.w};
  uint32_t out[4];
#pragma unroll
  for (int h = 0; h < 2; ++h) {  // four channels at a time: fewer coefficients live at once
    float4 rows[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) rows[r] = *reinterpret_cast<const float4*>(coef + r * p.c_out + co + 4 * h);
#pragma unroll
    for (int e = 4 * h; e < 4 * h + 4; ++e) {
      auto at = [&](int r) { return e % 4 == 0 ? rows[r].x : e % 4 == 1 ? rows[r].y : e % 4 == 2 ? rows[r].z : rows[r].w; };
      const int shift = 16 * (e % 2);
      const float value = dy_of<T, kMask>(Numeric<T>::from_bits(uint16_t(y_words[e / 2] >> shift)),
                                          Numeric<T>::from_bits(uint16_t(dz_words[e / 2] >> shift)), at(kScale),
                                          at(kShift), at(kB), at(kCenter), at(kC));
      const T rounded = Numeric<T>::store(value);
      uint16_t bits;
      memcpy(&bits, &rounded, 2);
      out[e / 2] = e % 2 ? out[e / 2] | uint32_t(bits) << 16 : uint32_t(bits);
    }
  }
  return {out[0], out[1], out[2], out[3]};
}

// 1. Partial sums over a block's pixel range. Channel-fast thread order when y is channels-last,
// pixel-fast otherwise, so that loads are contiguous either way.
template <typename T, Mask kMask>
__global__ void __launch_bounds__(kThreads) reduce_partials(const P p, int64_t pixels_per_block, bool channel_fast) {
  using Acc = typename Numeric<T>::Acc;
  __shared__ Acc shared[2][kLanes][kChannels];
  const int tid = int(threadIdx.x);
  const int c_local = channel_fast ? tid % kChannels : tid / kLanes;
  const int lane = channel_fast ? tid / kChannels : tid % kLanes;
  const int64_t co = int64_t(blockIdx.y) * kChannels + c_local;
  const int64_t m0 = int64_t(blockIdx.x) * pixels_per_block, total = pixels(p);
  const int64_t m1 = m0 + pixels_per_block < total ? m0 + pixels_per_block : total;
  const int64_t hw = p.h_out * p.w_out;
  Acc sum_g = Acc(0), sum_gy = Acc(0);
  if (co < p.c_out && m0 + lane < m1) {
    const Acc scale = static_cast<const Acc*>(p.scale)[co], shift = static_cast<const Acc*>(p.shift)[co];
    const Acc center = p.mean != nullptr ? static_cast<const Acc*>(p.mean)[co] : Acc(0);
    const T* y = static_cast<const T*>(p.y);
    const T* dz = static_cast<const T*>(p.dz);
    // The lane's pixel as (n, oh, ow), advanced by kLanes pixels without divisions.
    int64_t n = (m0 + lane) / hw;
    // ow in 64 bits: w_out + kLanes may pass 2^31.
    int oh = int((m0 + lane) % hw / p.w_out);
    int64_t ow = (m0 + lane) % p.w_out;
    const int h_out = int(p.h_out), w_out = int(p.w_out);
    for (int64_t m = m0 + lane; m < m1; m += kLanes) {
      const Acc yv = Numeric<T>::load(y[n * p.y_stride[0] + co * p.y_stride[1] + oh * p.y_stride[2] + ow * p.y_stride[3]]);
      bool pass = kMask != Mask::kFromY || relu_passes<T>(yv, scale, shift);
      const T dzv = dz[n * p.dz_stride[0] + co * p.dz_stride[1] + oh * p.dz_stride[2] + ow * p.dz_stride[3]];
      if constexpr (kMask == Mask::kFromOutput) {
        const T* z = static_cast<const T*>(p.z);
        pass = !(Numeric<T>::load(z[n * p.z_stride[0] + co * p.z_stride[1] + oh * p.z_stride[2] + ow * p.z_stride[3]]) <=
                 Acc(0));
        static_cast<T*>(p.g)[n * p.g_stride[0] + co * p.g_stride[1] + oh * p.g_stride[2] + ow * p.g_stride[3]] =
            pass ? dzv : Numeric<T>::store(Acc(0));
      }
      if (pass) {
        const Acc g = Numeric<T>::load(dzv);
        sum_g += g;
        sum_gy += g * (yv - center);
      }
      ow += kLanes;
      while (ow >= w_out) ow -= w_out, ++oh;
      while (oh >= h_out) oh -= h_out, ++n;
    }
  }
  shared[0][lane][c_local] = sum_g;
  shared[1][lane][c_local] = sum_gy;
  __syncthreads();
  if (lane != 0 || co >= p.c_out) return;
  for (int l = 1; l < kLanes; ++l) sum_g += shared[0][l][c_local], sum_gy += shared[1][l][c_local];
  Acc* partials = workspace_of<Acc>(p).partials;
  const int64_t blocks = gridDim.x;
  partials[int64_t(blockIdx.x) * p.c_out + co] = sum_g;
  partials[(blocks + blockIdx.x) * p.c_out + co] = sum_gy;
}

// Whether 16-bit y and dz (and z and g, where given) are all dense channels-last and 16-byte aligned,
// with whole vectors of 8 channels: then pixel m of the batch starts at element m * c_out of each.
inline bool dense_channels_last_vectors(const P& p) {
  const int64_t c = p.c_out, dense[4] = {p.h_out * p.w_out * c, 1, p.w_out * c, c};
  auto dense_vectors = [&](const void* t, const int64_t* stride) {
    bool dense_t = reinterpret_cast<uintptr_t>(t) % 16 == 0;
    for (int i = 0; i < 4; ++i) dense_t &= stride[i] == dense[i];
    return dense_t;
  };
  return c % 8 == 0 && dense_vectors(p.y, p.y_stride) && dense_vectors(p.dz, p.dz_stride) &&
         (p.z == nullptr || dense_vectors(p.z, p.z_stride)) && (p.g == nullptr || dense_vectors(p.g, p.g_stride));
}

// 1, where dense_channels_last_vectors: the same partial sums, a thread taking 8 channels of a pixel
// by 16-byte loads (a quarter of the instructions per value), kVectorLanes pixel lanes per block.
constexpr int kVectorLanes = kThreads / (kChannels / 8);

template <typename T, Mask kMask>
__global__ void __launch_bounds__(kThreads) reduce_partials_vector(const P p, int64_t pixels_per_block) {
  __shared__ float shared[2][kVectorLanes][kChannels];
  const int tid = int(threadIdx.x), c_local = tid % (kChannels / 8) * 8, lane = tid / (kChannels / 8);
  const int co = int(blockIdx.y) * kChannels + c_local;  // the first of this thread's 8 channels
  const int64_t m0 = int64_t(blockIdx.x) * pixels_per_block, total = pixels(p);
  const int64_t m1 = m0 + pixels_per_block < total ? m0 + pixels_per_block : total;
  float sum_g[8], sum_gy[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) sum_g[e] = sum_gy[e] = 0.0f;
  if (co < p.c_out) {
    const float* scale = static_cast<const float*>(p.scale) + co;
    const float* shift = static_cast<const float*>(p.shift) + co;
    float center[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) center[e] = p.mean != nullptr ? static_cast<const float*>(p.mean)[co + e] : 0.0f;
    const uint16_t* y = static_cast<const uint16_t*>(p.y) + co;
    const uint16_t* dz = static_cast<const uint16_t*>(p.dz) + co;
    for (int64_t m = m0 + lane; m < m1; m += kVectorLanes) {
      const uint4 y8 = *reinterpret_cast<const uint4*>(y + m * p.c_out);
      const uint4 dz8 = *reinterpret_cast<const uint4*>(dz + m * p.c_out);
      const uint32_t y_words[4] = {y8.x, y8.y, y8.z, y8.w}, dz_words[4] = {dz8.x, dz8.y, dz8.z, dz8.w};
      uint32_t z_words[4] = {0, 0, 0, 0}, g_words[4] = {0, 0, 0, 0};
      if constexpr (kMask == Mask::kFromOutput) {
        const uint4 z8 = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p.z) + co + m * p.c_out);
        z_words[0] = z8.x, z_words[1] = z8.y, z_words[2] = z8.z, z_words[3] = z8.w;
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int shift_bits = 16 * (e % 2);
        const float yv = Numeric<T>::from_bits(uint16_t(y_words[e / 2] >> shift_bits));
        bool pass = kMask != Mask::kFromY || relu_passes<T>(yv, scale[e], shift[e]);
        if constexpr (kMask == Mask::kFromOutput) {
          pass = !(Numeric<T>::from_bits(uint16_t(z_words[e / 2] >> shift_bits)) <= 0.0f);
          if (pass) g_words[e / 2] |= dz_words[e / 2] & (0xffffu << shift_bits);  // g = dz, bit for bit
        }
        if (pass) {
          const float g = Numeric<T>::from_bits(uint16_t(dz_words[e / 2] >> shift_bits));
          sum_g[e] += g;
          sum_gy[e] += g * (yv - center[e]);
        }
      }
      if constexpr (kMask == Mask::kFromOutput)
        *reinterpret_cast<uint4*>(static_cast<uint16_t*>(p.g) + co + m * p.c_out) =
            uint4{g_words[0], g_words[1], g_words[2], g_words[3]};
    }
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) shared[0][lane][c_local + e] = sum_g[e], shared[1][lane][c_local + e] = sum_gy[e];
  __syncthreads();
  // Thread c sums channel c over the lanes, in lane order.
  const int c = int(blockIdx.y) * kChannels + tid;
  if (tid >= kChannels || c >= p.c_out) return;
  float g = 0.0f, gy = 0.0f;
  for (int l = 0; l < kVectorLanes; ++l) g += shared[0][l][tid], gy += shared[1][l][tid];
  float* partials = workspace_of<float>(p).partials;
  partials[int64_t(blockIdx.x) * p.c_out + c] = g;
  partials[(int64_t(gridDim.x) + blockIdx.x) * p.c_out + c] = gy;
}

// 2. Sums the partials in order (lane l takes blocks l, l + kFinalLanes, ...; then lane 0 the lanes
// in order); writes dparams and the coefficients.
template <typename Acc>
__global__ void __launch_bounds__(kThreads) finalize(const P p, int64_t blocks) {
  __shared__ Acc shared[2][kFinalLanes][kFinalChannels];
  const int c_local = int(threadIdx.x) % kFinalChannels, lane = int(threadIdx.x) / kFinalChannels;
  const int64_t c = int64_t(blockIdx.x) * kFinalChannels + c_local;
  const Workspace<Acc> ws = workspace_of<Acc>(p);
  Acc sum_g = Acc(0), sum_gy = Acc(0);
  if (c < p.c_out)
    for (int64_t b = lane; b < blocks; b += kFinalLanes)
      sum_g += ws.partials[b * p.c_out + c], sum_gy += ws.partials[(blocks + b) * p.c_out + c];
  shared[0][lane][c_local] = sum_g;
  shared[1][lane][c_local] = sum_gy;
  __syncthreads();
  if (lane != 0 || c >= p.c_out) return;
  for (int l = 1; l < kFinalLanes; ++l) sum_g += shared[0][l][c_local], sum_gy += shared[1][l][c_local];
  const Acc scale = static_cast<const Acc*>(p.scale)[c];
  Acc* dparams = static_cast<Acc*>(p.dparams);  // null: only the coefficients are wanted
  Acc* coef = ws.coef;
  coef[kScale * p.c_out + c] = scale;
  coef[kShift * p.c_out + c] = static_cast<const Acc*>(p.shift)[c];
  if (p.mean != nullptr) {
    const Acc rstd = Acc(1) / sqrt(static_cast<const Acc*>(p.var)[c] + Acc(p.eps));
    const Acc count = Acc(pixels(p));
    const Acc sum_gxhat = sum_gy * rstd;
    if (dparams != nullptr) dparams[c] = sum_gxhat, dparams[p.c_out + c] = sum_g;
    coef[kB * p.c_out + c] = -scale * rstd * (sum_gxhat / count);
    coef[kC * p.c_out + c] = -scale * (sum_g / count);
    coef[kCenter * p.c_out + c] = static_cast<const Acc*>(p.mean)[c];
  } else {
    if (dparams != nullptr) dparams[c] = sum_gy, dparams[p.c_out + c] = sum_g;
    coef[kB * p.c_out + c] = Acc(0);
    coef[kC * p.c_out + c] = Acc(0);
    coef[kCenter * p.c_out + c] = Acc(0);
  }
}

// 1 and 2: the reductions (when training or dparams are wanted, and always with Mask::kFromOutput,
// whose g they write) and the coefficients.
template <typename T, Mask kMask>
const char* launch_reductions(const P& p, cudaStream_t s) {
  using Acc = typename Numeric<T>::Acc;
  if (!grid_fits(1, ceil_div(p.c_out, kChannels))) return kGridTooLarge;
  const unsigned channel_tiles = unsigned(ceil_div(p.c_out, kChannels));
  // Folded, dy = scale * g needs no sums: without dparams wanted, finalize only writes the coefficients.
  const bool reduce = p.mean != nullptr || p.dparams != nullptr || kMask == Mask::kFromOutput;
  const int64_t blocks = reduce ? reduce_blocks(p) : 0;
  if (blocks > 0) {
    bool reduced_by_vectors = false;
    if constexpr (sizeof(T) == 2) {
      if (dense_channels_last_vectors(p)) {
        auto reduce_kernel = reduce_partials_vector<T, kMask>;
        RK_LAUNCH(reduce_kernel, dim3(unsigned(blocks), channel_tiles), dim3(kThreads), 0, s, p,
                  reduce_pixels_per_block(p));
        reduced_by_vectors = true;
      }
    }
    if (!reduced_by_vectors) {
      auto reduce_kernel = reduce_partials<T, kMask>;
      RK_LAUNCH(reduce_kernel, dim3(unsigned(blocks), channel_tiles), dim3(kThreads), 0, s, p,
                reduce_pixels_per_block(p), p.y_stride[1] == 1);
    }
    if (const char* error = RK_LAUNCH_ERROR()) return error;
  }
  auto finalize_kernel = finalize<Acc>;
  RK_LAUNCH(finalize_kernel, dim3(unsigned(ceil_div(p.c_out, kFinalChannels))), dim3(kThreads), 0, s, p, blocks);
  return RK_LAUNCH_ERROR();
}

}  // namespace backward
}  // namespace resnext_kernels
