// Inference: z = relu(conv3x3_grouped(x) * scale + shift) in one kernel; reads x once, writes z once.
//
// A block computes a tile of output pixels of one image for kChannels consecutive output channels.
// Small groups are packed: the block's channels span as many groups as fit, and each thread only
// accumulates over the input channels of its own channel's group, so a non-finite input never
// reaches another group's output (a packed matrix product with zero weights would turn Inf into NaN
// there). The input halo of the tile is staged in shared memory one chunk of input channels at a
// time, channels fastest, so that channels-last inputs are read in contiguous runs.
#pragma once

#include "params.h"
#include "platform.cuh"

namespace resnext_kernels {
namespace folded {

constexpr int kThreads = 256;
constexpr int kChannels = 32;                          // output channels per block
constexpr int kPixelLanes = kThreads / kChannels;      // threads sharing one output channel
constexpr int kMaxPixels = 64;                         // output pixels per block
constexpr int kPixelsPerThread = kMaxPixels / kPixelLanes;
constexpr int kMaxChunk = 64;                          // input channels per shared-memory stage
constexpr int kSharedBytes = 48 * 1024;                // without opting in to larger carve-outs

struct Tiling {
  int tile_h, tile_w;  // output pixels per block
  int halo_h, halo_w;  // the input rows and columns the tile reads
  int chunk;           // input channels per shared-memory stage
  int tiles_h, tiles_w;
};

// Where a block works: its image, output tile and channel tile, and the input channels (whole
// groups) those channels read.
struct BlockTile {
  int64_t n, oh0, ow0, ih0, iw0;
  int co0, co_end, ci_begin, ci_end, cin_pg, cout_pg;
};

__device__ __forceinline__ BlockTile locate_block(const ConvBnReluParams& p, const Tiling& tiling) {
  BlockTile b;
  b.cin_pg = int(p.c_in / p.groups);
  b.cout_pg = int(p.c_out / p.groups);
  const int64_t tiles = int64_t(tiling.tiles_h) * tiling.tiles_w;
  const int tile = int(blockIdx.x % tiles);
  b.n = blockIdx.x / tiles;
  b.oh0 = int64_t(tile / tiling.tiles_w) * tiling.tile_h;
  b.ow0 = int64_t(tile % tiling.tiles_w) * tiling.tile_w;
  b.ih0 = b.oh0 * p.stride - p.dilation;
  b.iw0 = b.ow0 * p.stride - p.dilation;
  b.co0 = int(blockIdx.y) * kChannels;
  b.co_end = int(b.co0 + kChannels < p.c_out ? b.co0 + kChannels : p.c_out);
  b.ci_begin = (b.co0 / b.cout_pg) * b.cin_pg;
  b.ci_end = ((b.co_end - 1) / b.cout_pg + 1) * b.cin_pg;
  return b;
}

// Training pass 1 (kTrain): the epilogue writes y itself, rounded to T, and the block's partial
// statistics of the stored values: for each channel the count, the mean and the sum of squared
// deviations from that mean (two passes over the tile, staged in shared memory, summed by one
// thread per channel in pixel order: deterministic, no atomics).
__device__ __forceinline__ bool pixel_in_image(const ConvBnReluParams& p, const BlockTile& b, int pixel,
                                               int tile_pixels, int tile_w) {
  return pixel < tile_pixels && b.oh0 + pixel / tile_w < p.h_out && b.ow0 + pixel % tile_w < p.w_out;
}

// stage[pixel * kChannels + channel] holds the stored y of the tile. Every thread takes part: lane
// l = threadIdx.x / kChannels of `lanes` takes pixels l, l + lanes, ... of its channel. Two rounds
// through `scratch` ([2][lanes][kChannels] of Acc, not overlapping `stage`), each summed by lane 0
// in lane order: the channel's count and sum, giving the block mean; then the squared deviations
// from it. Contains barriers: call from all threads.
template <typename Acc, typename Staged>
__device__ __forceinline__ void block_statistics(const ConvBnReluParams& p, const BlockTile& b, const Staged* stage,
                                                 Acc* scratch, int lanes, int tile_pixels, int tile_w) {
  const int c = int(threadIdx.x) % kChannels, lane = int(threadIdx.x) / kChannels, co = b.co0 + c;
  Acc count = Acc(0), sum = Acc(0);
  for (int q = lane; q < tile_pixels; q += lanes)
    if (pixel_in_image(p, b, q, tile_pixels, tile_w)) {
      sum += Acc(stage[q * kChannels + c]);
      count += Acc(1);
    }
  scratch[lane * kChannels + c] = count;
  scratch[(lanes + lane) * kChannels + c] = sum;
  __syncthreads();
  if (lane == 0) {
    for (int l = 1; l < lanes; ++l) count += scratch[l * kChannels + c], sum += scratch[(lanes + l) * kChannels + c];
    scratch[c] = count;
    scratch[lanes * kChannels + c] = sum / count;  // every block has at least one pixel in the image
  }
  __syncthreads();
  count = scratch[c];
  const Acc mean = scratch[lanes * kChannels + c];
  Acc m2 = Acc(0);
  for (int q = lane; q < tile_pixels; q += lanes)
    if (pixel_in_image(p, b, q, tile_pixels, tile_w)) {
      const Acc delta = Acc(stage[q * kChannels + c]) - mean;
      m2 += delta * delta;
    }
  __syncthreads();  // everyone has read count and mean
  scratch[lane * kChannels + c] = m2;
  __syncthreads();
  if (p.partials == nullptr || lane != 0 || co >= b.co_end) return;
  for (int l = 1; l < lanes; ++l) m2 += scratch[l * kChannels + c];
  Acc* partials = static_cast<Acc*>(p.partials);
  const int64_t blocks = gridDim.x, at = int64_t(blockIdx.x) * p.c_out + co;
  partials[at] = count;
  partials[blocks * p.c_out + at] = mean;
  partials[2 * blocks * p.c_out + at] = m2;
}

template <typename T, bool kTrain>
__global__ void __launch_bounds__(kThreads) conv_bn_relu_folded_fma(const ConvBnReluParams p, const Tiling tiling) {
  using Acc = typename Numeric<T>::Acc;
  RK_DYNAMIC_SHARED(Acc, shared);
  const int chunk = tiling.chunk, halo_w = tiling.halo_w, tile_w = tiling.tile_w;
  const int halo = tiling.halo_h * halo_w, tile_pixels = tiling.tile_h * tile_w;
  Acc* x_tile = shared;                 // [halo][chunk]
  Acc* w_tile = shared + halo * chunk;  // [kChannels][chunk][9]

  const T* x = static_cast<const T*>(p.x);
  const T* weight = static_cast<const T*>(p.weight);
  const int s = p.stride, d = p.dilation;
  const BlockTile b = locate_block(p, tiling);
  const int cin_pg = b.cin_pg, cout_pg = b.cout_pg, co0 = b.co0, co_end = b.co_end;
  const int64_t n = b.n, oh0 = b.oh0, ow0 = b.ow0, ih0 = b.ih0, iw0 = b.iw0;

  const int c_local = int(threadIdx.x) % kChannels, co = co0 + c_local;
  const int pixel_lane = int(threadIdx.x) / kChannels;
  const bool active = co < co_end;
  const int group_begin = active ? (co / cout_pg) * cin_pg : 0;
  const int group_end = active ? group_begin + cin_pg : 0;

  Acc acc[kPixelsPerThread];
  for (int j = 0; j < kPixelsPerThread; ++j) acc[j] = Acc(0);

  for (int k0 = b.ci_begin; k0 < b.ci_end; k0 += chunk) {
    const int count = chunk < b.ci_end - k0 ? chunk : b.ci_end - k0;
    __syncthreads();  // the previous chunk's tiles have been read by everyone
    for (int i = int(threadIdx.x); i < halo * count; i += kThreads) {
      const int k = i % count, pos = i / count;
      const int64_t ih = ih0 + pos / halo_w, iw = iw0 + pos % halo_w;
      Acc v = Acc(0);
      if (ih >= 0 && ih < p.h && iw >= 0 && iw < p.w)
        v = Numeric<T>::load(x[n * p.x_stride[0] + (k0 + k) * p.x_stride[1] + ih * p.x_stride[2] + iw * p.x_stride[3]]);
      x_tile[pos * chunk + k] = v;
    }
    for (int i = int(threadIdx.x); i < kChannels * count * 9; i += kThreads) {
      const int c = i / (count * 9), rest = i % (count * 9), k = rest / 9, tap = rest % 9;
      const int oc = co0 + c, ic = k0 + k;
      Acc v = Acc(0);
      if (oc < co_end) {
        const int oc_group_begin = (oc / cout_pg) * cin_pg;
        if (ic >= oc_group_begin && ic < oc_group_begin + cin_pg)
          v = Numeric<T>::load(weight[(int64_t(oc) * cin_pg + (ic - oc_group_begin)) * 9 + tap]);
      }
      w_tile[(c * chunk + k) * 9 + tap] = v;
    }
    __syncthreads();
    if (!active) continue;
    const int k_begin = (group_begin > k0 ? group_begin : k0) - k0;
    const int k_end = (group_end < k0 + count ? group_end : k0 + count) - k0;
    for (int k = k_begin; k < k_end; ++k)
      for (int tap = 0; tap < 9; ++tap) {
        const Acc wv = w_tile[(c_local * chunk + k) * 9 + tap];
        const int dy = (tap / 3) * d, dx = (tap % 3) * d;
#pragma unroll
        for (int j = 0; j < kPixelsPerThread; ++j) {
          const int pixel = pixel_lane + j * kPixelLanes;
          if (pixel < tile_pixels) {
            const int ph = pixel / tile_w, pw = pixel % tile_w;
            acc[j] += x_tile[((ph * s + dy) * halo_w + pw * s + dx) * chunk + k] * wv;
          }
        }
      }
  }

  T* out = static_cast<T*>(p.out);
  if constexpr (kTrain) {
    Acc* stage = shared;  // [kMaxPixels][kChannels], over the tiles (launch sizes it)
    __syncthreads();
    for (int j = 0; j < kPixelsPerThread; ++j) {
      const int pixel = pixel_lane + j * kPixelLanes;
      if (!active || !pixel_in_image(p, b, pixel, tile_pixels, tile_w)) continue;
      const int64_t oh = oh0 + pixel / tile_w, ow = ow0 + pixel % tile_w;
      const T v = Numeric<T>::store(acc[j]);
      out[n * p.out_stride[0] + co * p.out_stride[1] + oh * p.out_stride[2] + ow * p.out_stride[3]] = v;
      stage[pixel * kChannels + c_local] = Numeric<T>::load(v);
    }
    __syncthreads();
    block_statistics<Acc>(p, b, stage, stage + kMaxPixels * kChannels, kPixelLanes, tile_pixels, tile_w);
    return;
  }
  if (!active) return;
  const Acc scale = static_cast<const Acc*>(p.scale)[co], shift = static_cast<const Acc*>(p.shift)[co];
  for (int j = 0; j < kPixelsPerThread; ++j) {
    const int pixel = pixel_lane + j * kPixelLanes;
    const int64_t oh = oh0 + pixel / tile_w, ow = ow0 + pixel % tile_w;
    if (pixel < tile_pixels && oh < p.h_out && ow < p.w_out)
      out[n * p.out_stride[0] + co * p.out_stride[1] + oh * p.out_stride[2] + ow * p.out_stride[3]] =
          Numeric<T>::store(relu(acc[j] * scale + shift));
  }
}

// Tensor-core variant for 16-bit inputs: the tile is a (pixels x channels) matrix product per tap,
// computed with mma.m16n8k16 (fp32 accumulate). Each warp owns 16 pixels and all kChannels channels
// (four 8-channel n-tiles). An n-tile's K range is only the input channels of its own groups, with
// A and B zeroed outside it, so packing small groups costs at most a 2x padding of K.
//
// A packed product multiplies every input channel of the n-tile by every column's weight, zero or
// not, and Inf * 0 is NaN: a non-finite input would leak into the other groups of its n-tile. So a
// block whose staged inputs hold any Inf or NaN (one vote per chunk) computes that chunk with exact
// per-group scalar sums instead, into the same accumulators. Finite inputs never pay for it.
constexpr int kMmaThreads = 128;
constexpr int kMmaK = 16;
constexpr int kNTiles = kChannels / 8;

// The exact partial sums of one chunk for every (pixel, channel) of the tile, each output channel
// summed over its own group's input channels only, into exact[pixel * kChannels + channel].
template <typename T>
__device__ __forceinline__ void exact_chunk_sums(float* exact, const uint16_t* x_tile, const uint16_t* w_tile,
                                                 int row, int k0, int count, int tile_pixels, int tile_w,
                                                 int halo_w, int s, int d, int co0, int co_end, int cin_pg,
                                                 int cout_pg) {
  for (int e = int(threadIdx.x); e < kMaxPixels * kChannels; e += kMmaThreads) {
    const int q = e / kChannels, c = e % kChannels, co = co0 + c;
    float sum = 0.0f;
    if (q < tile_pixels && co < co_end) {
      const int base = (q / tile_w) * s * halo_w + (q % tile_w) * s;
      const int group_begin = (co / cout_pg) * cin_pg;
      const int lo = group_begin > k0 ? group_begin : k0;
      const int hi = group_begin + cin_pg < k0 + count ? group_begin + cin_pg : k0 + count;
      for (int tap = 0; tap < 9; ++tap) {
        const int offset = (tap / 3) * d * halo_w + (tap % 3) * d;
        for (int k = lo; k < hi; ++k)
          sum += Numeric<T>::from_bits(x_tile[(base + offset) * row + k - k0]) *
                 Numeric<T>::from_bits(w_tile[(tap * kChannels + c) * row + k - k0]);
      }
    }
    exact[e] = sum;
  }
}

// Whether either 16-bit value packed in `word` is Inf or NaN.
template <typename T>
__device__ __forceinline__ int has_non_finite(uint32_t word) {
  return (word & 0x7fffu) >= Numeric<T>::kNonFinite || ((word >> 16) & 0x7fffu) >= Numeric<T>::kNonFinite;
}

template <typename T, bool kTrain>
__global__ void __launch_bounds__(kMmaThreads) conv_bn_relu_folded_mma(const ConvBnReluParams p, const Tiling tiling) {
  RK_DYNAMIC_SHARED(uint16_t, shared);  // raw 16-bit values: zero bits are +0.0 in fp16 and bf16
  const int chunk = tiling.chunk, row = chunk + kMmaK, halo_w = tiling.halo_w, tile_w = tiling.tile_w;
  const int halo = tiling.halo_h * halo_w, tile_pixels = tiling.tile_h * tile_w;
  uint16_t* x_tile = shared;                // [halo][row]
  uint16_t* w_tile = shared + halo * row;   // [9][kChannels][row]
  const int staged = (halo + 9 * kChannels) * row;
  float* exact = reinterpret_cast<float*>(shared + staged + staged % 2);  // [kMaxPixels][kChannels]

  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  const uint16_t* weight = static_cast<const uint16_t*>(p.weight);
  const int s = p.stride, d = p.dilation;
  const BlockTile b = locate_block(p, tiling);
  const int cin_pg = b.cin_pg, cout_pg = b.cout_pg, co0 = b.co0, co_end = b.co_end;
  const int64_t n = b.n, oh0 = b.oh0, ow0 = b.ow0, ih0 = b.ih0, iw0 = b.iw0;

  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
  // The two fragment rows of this lane: pixels warp*16 + g and + 8, as positions in the halo.
  int pixel[2], base[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    pixel[r] = warp * 16 + g + 8 * r;
    const int q = pixel[r] < tile_pixels ? pixel[r] : 0;
    base[r] = (q / tile_w) * s * halo_w + (q % tile_w) * s;
  }
  int k_begin[kNTiles], k_end[kNTiles];
  ntile_k_ranges(co0, co_end, cout_pg, cin_pg, k_begin, k_end);
  float acc[kNTiles][4];
#pragma unroll
  for (int j = 0; j < kNTiles; ++j)
    for (int i = 0; i < 4; ++i) acc[j][i] = 0.0f;
  // 16-byte loads of the halo need unit channel stride, 16-byte aligned pixels and shared rows.
  const bool vectorized = p.x_stride[1] == 1 && (p.x_stride[0] % 8 | p.x_stride[2] % 8 | p.x_stride[3] % 8) == 0 &&
                          reinterpret_cast<uintptr_t>(x) % 16 == 0 && row % 8 == 0;

  for (int k0 = b.ci_begin; k0 < b.ci_end; k0 += chunk) {
    const int count = chunk < b.ci_end - k0 ? chunk : b.ci_end - k0;
    __syncthreads();
    int non_finite = 0;
    if (vectorized && count % 8 == 0 && k0 % 8 == 0) {
      // Channels-last input: 8 channels of a pixel are 16 contiguous, aligned bytes.
      const int vectors = count / 8;
      for (int i = int(threadIdx.x); i < halo * vectors; i += kMmaThreads) {
        const int k = (i % vectors) * 8, pos = i / vectors;
        const int64_t ih = ih0 + pos / halo_w, iw = iw0 + pos % halo_w;
        uint4 v = {0u, 0u, 0u, 0u};
        if (ih >= 0 && ih < p.h && iw >= 0 && iw < p.w)
          v = *reinterpret_cast<const uint4*>(x + n * p.x_stride[0] + (k0 + k) + ih * p.x_stride[2] + iw * p.x_stride[3]);
        non_finite |= has_non_finite<T>(v.x) | has_non_finite<T>(v.y) | has_non_finite<T>(v.z) | has_non_finite<T>(v.w);
        *reinterpret_cast<uint4*>(x_tile + pos * row + k) = v;
      }
    } else {
      for (int i = int(threadIdx.x); i < halo * count; i += kMmaThreads) {
        const int k = i % count, pos = i / count;
        const int64_t ih = ih0 + pos / halo_w, iw = iw0 + pos % halo_w;
        uint16_t v = 0;
        if (ih >= 0 && ih < p.h && iw >= 0 && iw < p.w)
          v = x[n * p.x_stride[0] + (k0 + k) * p.x_stride[1] + ih * p.x_stride[2] + iw * p.x_stride[3]];
        non_finite |= (v & 0x7fff) >= Numeric<T>::kNonFinite;
        x_tile[pos * row + k] = v;
      }
    }
    for (int i = int(threadIdx.x); i < 9 * kChannels * count; i += kMmaThreads) {
      const int k = i % count, c = (i / count) % kChannels, tap = i / (count * kChannels);
      const int oc = co0 + c, ic = k0 + k;
      uint16_t v = 0;
      if (oc < co_end) {
        const int oc_group_begin = (oc / cout_pg) * cin_pg;
        if (ic >= oc_group_begin && ic < oc_group_begin + cin_pg)
          v = weight[(int64_t(oc) * cin_pg + (ic - oc_group_begin)) * 9 + tap];
      }
      w_tile[(tap * kChannels + c) * row + k] = v;
    }
    if (__syncthreads_or(non_finite)) {
      exact_chunk_sums<T>(exact, x_tile, w_tile, row, k0, count, tile_pixels, tile_w, halo_w, s, d, co0, co_end,
                          cin_pg, cout_pg);
      __syncthreads();
#pragma unroll
      for (int j = 0; j < kNTiles; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          if (pixel[i / 2] < kMaxPixels) acc[j][i] += exact[pixel[i / 2] * kChannels + 8 * j + 2 * t + i % 2];
      continue;  // the loop's first barrier keeps `exact` until everyone has read it
    }
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
      const int lo = k_begin[j] > k0 ? k_begin[j] : k0;
      const int hi = k_end[j] < k0 + count ? k_end[j] : k0 + count;
      for (int ks = lo; ks < hi; ks += kMmaK) {
        const int kr = ks - k0, valid = hi - ks;  // fragment columns >= valid are zero
        for (int tap = 0; tap < 9; ++tap) {
          const int offset = (tap / 3) * d * halo_w + (tap % 3) * d;
          uint32_t a[4], b[2];
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int col = 2 * t + 8 * (r / 2);
            const uint16_t* src = x_tile + (base[r % 2] + offset) * row + kr + col;
            a[r] = fragment_pair(src, col, valid);
          }
          load_b_fragment(b, w_tile + (tap * kChannels + 8 * j + g) * row + kr, t, valid);
          mma_m16n8k16<T>(acc[j], a, b);
        }
      }
    }
  }

  T* out = static_cast<T*>(p.out);
  if constexpr (kTrain) {
    __syncthreads();  // `exact` may still be read by a straggler of the last chunk
#pragma unroll
    for (int j = 0; j < kNTiles; ++j)
      for (int i = 0; i < 4; ++i) {
        const int q = pixel[i / 2], c = 8 * j + 2 * t + i % 2, co = co0 + c;
        if (co >= co_end || !pixel_in_image(p, b, q, tile_pixels, tile_w)) continue;
        const int64_t oh = oh0 + q / tile_w, ow = ow0 + q % tile_w;
        const T v = Numeric<T>::store(acc[j][i]);
        out[n * p.out_stride[0] + co * p.out_stride[1] + oh * p.out_stride[2] + ow * p.out_stride[3]] = v;
        exact[q * kChannels + c] = Numeric<T>::load(v);
      }
    __syncthreads();
    // The staged inputs are consumed: their space holds the lanes' partial statistics.
    block_statistics<float>(p, b, exact, reinterpret_cast<float*>(shared), kMmaThreads / kChannels, tile_pixels,
                            tile_w);
    return;
  }
  const float* scale = static_cast<const float*>(p.scale);
  const float* shift = static_cast<const float*>(p.shift);
#pragma unroll
  for (int j = 0; j < kNTiles; ++j)
    for (int i = 0; i < 4; ++i) {
      const int q = pixel[i / 2], co = co0 + 8 * j + 2 * t + i % 2;
      const int64_t oh = oh0 + q / tile_w, ow = ow0 + q % tile_w;
      if (q < tile_pixels && co < co_end && oh < p.h_out && ow < p.w_out)
        out[n * p.out_stride[0] + co * p.out_stride[1] + oh * p.out_stride[2] + ow * p.out_stride[3]] =
            Numeric<T>::store(relu(acc[j][i] * scale[co] + shift[co]));
    }
}

// The largest tile (up to kMaxPixels) whose input halo leaves room in shared memory for a chunk of
// at least one input channel: per channel, the halo and kChannels x 9 weights, each `value_bytes`
// wide, plus `pad` spare channels per row and `reserve` bytes besides.
inline bool choose_tiling(const ConvBnReluParams& p, int value_bytes, int pad, int reserve, Tiling* t) {
  const int budget = (kSharedBytes - reserve) / value_bytes;
  int tile_w = int(p.w_out < 8 ? p.w_out : 8);
  int tile_h = int(p.h_out < kMaxPixels / tile_w ? p.h_out : kMaxPixels / tile_w);
  while (true) {
    t->tile_h = tile_h;
    t->tile_w = tile_w;
    t->halo_h = (tile_h - 1) * p.stride + 2 * p.dilation + 1;
    t->halo_w = (tile_w - 1) * p.stride + 2 * p.dilation + 1;
    const int64_t per_channel = int64_t(t->halo_h) * t->halo_w + kChannels * 9;
    const int64_t chunk = budget / per_channel - pad;
    if (chunk >= 1) {
      t->chunk = int(chunk < kMaxChunk ? chunk : kMaxChunk);
      // 16-bit chunks in whole 8-channel vectors keep shared rows 16-byte aligned (vectorised loads).
      if (value_bytes == 2 && t->chunk >= 8) t->chunk -= t->chunk % 8;
      t->tiles_h = int((p.h_out + tile_h - 1) / tile_h);
      t->tiles_w = int((p.w_out + tile_w - 1) / tile_w);
      return true;
    }
    if (tile_h == 1 && tile_w == 1) return false;
    if (tile_h >= tile_w) tile_h = (tile_h + 1) / 2; else tile_w = (tile_w + 1) / 2;
  }
}

inline size_t shared_bytes(const Tiling& t, int value_bytes, int pad, int reserve) {
  return size_t(int64_t(t.halo_h) * t.halo_w + kChannels * 9) * (t.chunk + pad) * value_bytes + reserve;
}

template <typename T, bool kTrain = false>
const char* launch(const ConvBnReluParams& p, void* stream) {
  using Acc = typename Numeric<T>::Acc;
  // 16-bit inputs run on tensor cores; fp32 and fp64 on FMA units.
  constexpr bool kTensorCores = sizeof(T) == 2;
  constexpr int value_bytes = kTensorCores ? 2 : int(sizeof(Acc));
  constexpr int pad = kTensorCores ? kMmaK : 0;
  // The tensor-core kernel keeps room for one chunk's exact sums (and 4 bytes to align them).
  constexpr int reserve = kTensorCores ? kMaxPixels * kChannels * 4 + 4 : 0;
  Tiling tiling;
  if (!choose_tiling(p, value_bytes, pad, reserve, &tiling))
    return "dilation and stride too large: one output pixel's input halo does not fit in shared memory";
  const dim3 grid(unsigned(p.n * tiling.tiles_h * tiling.tiles_w), unsigned((p.c_out + kChannels - 1) / kChannels));
  size_t bytes = shared_bytes(tiling, value_bytes, pad, reserve);
  // The FMA kernel's training epilogue stages the tile's y over the (finished) input tiles, and the
  // lanes' partial statistics after it. (The tensor-core kernel stages y in `exact` and keeps the
  // lanes' statistics over its tiles, at least 9 * kChannels * (1 + kMmaK) 16-bit values.)
  const size_t stage_bytes =
      kTrain && !kTensorCores ? (size_t(kMaxPixels) * kChannels + 2 * kPixelLanes * kChannels) * sizeof(Acc) : 0;
  bytes = bytes > stage_bytes ? bytes : stage_bytes;
  if constexpr (kTensorCores) {
    auto kernel = conv_bn_relu_folded_mma<T, kTrain>;
    RK_LAUNCH(kernel, grid, dim3(kMmaThreads), bytes, static_cast<cudaStream_t>(stream), p, tiling);
  } else {
    auto kernel = conv_bn_relu_folded_fma<T, kTrain>;
    RK_LAUNCH(kernel, grid, dim3(kThreads), bytes, static_cast<cudaStream_t>(stream), p, tiling);
  }
  return RK_LAUNCH_ERROR();
}

}  // namespace folded

const char* launch_conv_bn_relu_folded(const ConvBnReluParams& p, void* stream) {
  switch (p.dtype) {
    case DType::kFloat32: return folded::launch<float>(p, stream);
    case DType::kFloat64: return folded::launch<double>(p, stream);
    case DType::kFloat16: return folded::launch<__half>(p, stream);
    case DType::kBFloat16: return folded::launch<__nv_bfloat16>(p, stream);
  }
  return "unsupported dtype";
}

int64_t conv_stats_blocks(const ConvBnReluParams& p) {
  const bool tensor_cores = p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16;
  const int value_bytes = tensor_cores ? 2 : p.dtype == DType::kFloat64 ? 8 : 4;
  folded::Tiling tiling;
  if (!folded::choose_tiling(p, value_bytes, tensor_cores ? folded::kMmaK : 0,
                             tensor_cores ? folded::kMaxPixels * folded::kChannels * 4 + 4 : 0, &tiling))
    return 0;
  return p.n * tiling.tiles_h * tiling.tiles_w;
}

const char* launch_conv_stats(const ConvBnReluParams& p, void* stream) {
  switch (p.dtype) {
    case DType::kFloat32: return folded::launch<float, true>(p, stream);
    case DType::kFloat64: return folded::launch<double, true>(p, stream);
    case DType::kFloat16: return folded::launch<__half, true>(p, stream);
    case DType::kBFloat16: return folded::launch<__nv_bfloat16, true>(p, stream);
  }
  return "unsupported dtype";
}

}  // namespace resnext_kernels
