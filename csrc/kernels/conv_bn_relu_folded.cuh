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
#include "tensor_core_tiles.cuh"

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
  int tile_h, tile_w;   // output pixels per tile
  int halo_h, halo_w;   // the input rows and columns the tile reads (staged in bands: tap_reach)
  int reach_h, reach_w; // rows and columns between the taps in the staged halo (tap_reach)
  int chunk;            // input channels per shared-memory stage
  int row;              // shared-memory values per staged halo position or weight row (>= chunk)
  int tiles_h, tiles_w;
  int tiles_per_block;  // consecutive tiles of one channel tile that a block computes in turn
};

// Where a block works on tile `tile` (counted over the batch): its image, output tile and channel
// tile, and the input channels (whole groups) those channels read.
struct BlockTile {
  int64_t n, oh0, ow0, ih0, iw0;
  int co0, co_end, ci_begin, ci_end, cin_pg, cout_pg;
};

__device__ __forceinline__ BlockTile locate_block(const ConvBnReluParams& p, const Tiling& tiling, int64_t tile) {
  BlockTile b;
  b.cin_pg = int(p.c_in / p.groups);
  b.cout_pg = int(p.c_out / p.groups);
  const int64_t tiles = int64_t(tiling.tiles_h) * tiling.tiles_w;
  const int in_image = int(tile % tiles);
  b.n = tile / tiles;
  b.oh0 = int64_t(in_image / tiling.tiles_w) * tiling.tile_h;
  b.ow0 = int64_t(in_image % tiling.tiles_w) * tiling.tile_w;
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

// stage[pixel * stride + channel] holds the stored y of the tile. Every thread takes part: lane
// l = threadIdx.x / kChannels of `lanes` takes pixels l, l + lanes, ... of its channel. Two rounds
// through `scratch` ([2][lanes][kChannels] of Acc, not overlapping `stage`), each summed by lane 0
// in lane order: the channel's count and sum, giving the block mean; then the squared deviations
// from it. Contains barriers: call from all threads.
// The partials of tile `tile` of `tiles` (the batch's tiles) are written for the block's channels.
template <typename Acc, typename Staged>
__device__ __forceinline__ void block_statistics(const ConvBnReluParams& p, const BlockTile& b, const Staged* stage,
                                                 int stride, Acc* scratch, int lanes, int tile_pixels, int tile_w,
                                                 int64_t tile, int64_t tiles) {
  const int c = int(threadIdx.x) % kChannels, lane = int(threadIdx.x) / kChannels, co = b.co0 + c;
  Acc count = Acc(0), sum = Acc(0);
  for (int q = lane; q < tile_pixels; q += lanes)
    if (pixel_in_image(p, b, q, tile_pixels, tile_w)) {
      sum += Acc(stage[q * stride + c]);
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
  if (lane == 0) count = scratch[c];
  const Acc mean = scratch[lanes * kChannels + c];
  Acc m2 = Acc(0);
  for (int q = lane; q < tile_pixels; q += lanes)
    if (pixel_in_image(p, b, q, tile_pixels, tile_w)) {
      const Acc delta = Acc(stage[q * stride + c]) - mean;
      m2 += delta * delta;
    }
  // No barrier before this write: rows 0 .. lanes - 1 are read only after the next barrier (lane 0
  // has its count already), and the mean lives in row `lanes`, which no thread writes here.
  scratch[lane * kChannels + c] = m2;
  __syncthreads();
  if (p.partials == nullptr || lane != 0 || co >= b.co_end) return;
  for (int l = 1; l < lanes; ++l) m2 += scratch[l * kChannels + c];
  Acc* partials = static_cast<Acc*>(p.partials);
  const int64_t at = tile * p.c_out + co;
  partials[at] = count;
  partials[tiles * p.c_out + at] = mean;
  partials[2 * tiles * p.c_out + at] = m2;
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
  const BlockTile b = locate_block(p, tiling, blockIdx.x);  // one tile per block
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
      const int64_t ih = ih0 + halo_input_offset(pos / halo_w, tiling.reach_h, d);
      const int64_t iw = iw0 + halo_input_offset(pos % halo_w, tiling.reach_w, d);
      Acc v = Acc(0);
      if (ih >= 0 && ih < p.h && iw >= 0 && iw < p.w)
        v = Numeric<T>::load(x[n * p.x_stride[0] + (k0 + k) * p.x_stride[1] + ih * p.x_stride[2] + iw * p.x_stride[3]]);
      x_tile[pos * chunk + k] = v;
    }
    for (int i = int(threadIdx.x); i < kChannels * count * 9; i += kThreads) {
      const int c = i / (count * 9), rest = i % (count * 9), k = rest / 9, tap = rest % 9;
      const int oc = co0 + c;
      w_tile[(c * chunk + k) * 9 + tap] =
          oc < co_end ? grouped_weight(weight, p.weight_stride, oc, k0 + k, cin_pg, cout_pg, tap) : Acc(0);
    }
    __syncthreads();
    if (!active) continue;
    const int k_begin = (group_begin > k0 ? group_begin : k0) - k0;
    const int k_end = (group_end < k0 + count ? group_end : k0 + count) - k0;
    for (int k = k_begin; k < k_end; ++k)
      for (int tap = 0; tap < 9; ++tap) {
        const Acc wv = w_tile[(c_local * chunk + k) * 9 + tap];
        const int dy = (tap / 3) * tiling.reach_h, dx = (tap % 3) * tiling.reach_w;
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
    block_statistics<Acc>(p, b, stage, kChannels, stage + kMaxPixels * kChannels, kPixelLanes, tile_pixels, tile_w,
                          blockIdx.x,
                          gridDim.x);
    return;
  }
  if (!active) return;
  const Acc scale = static_cast<const Acc*>(p.scale)[co], shift = static_cast<const Acc*>(p.shift)[co];
  for (int j = 0; j < kPixelsPerThread; ++j) {
    const int pixel = pixel_lane + j * kPixelLanes;
    const int64_t oh = oh0 + pixel / tile_w, ow = ow0 + pixel % tile_w;
    if (pixel < tile_pixels && oh < p.h_out && ow < p.w_out)
      out[n * p.out_stride[0] + co * p.out_stride[1] + oh * p.out_stride[2] + ow * p.out_stride[3]] =
          Numeric<T>::store(relu(affine(rounded<T>(acc[j]), scale, shift)));
  }
}

// Tensor-core variant for 16-bit inputs: the tile is a (pixels x channels) matrix product per tap,
// computed with mma.m16n8k16 (fp32 accumulate). Each warp owns 16 pixels and all kChannels channels
// (four 8-channel n-tiles); fragments come from shared memory with ldmatrix, one A fragment per
// (tap, 16 input channels) serving every n-tile whose groups touch those channels. Staged weights
// are zero outside each output channel's group and past the chunk, so packing small groups costs
// at most a 2x padding of K; the halo's spare columns are zeroed too.
//
// A packed product multiplies every input channel of a 16-wide K step by every column's weight, zero
// or not, and Inf * 0 is NaN: a non-finite input would leak into other groups' outputs. So a tile
// whose staged inputs hold any Inf or NaN (one vote per chunk) computes that chunk with exact
// per-group scalar sums instead, into the same accumulators. Finite inputs never pay for it.
//
// A block computes tiling.tiles_per_block consecutive tiles for one channel tile; when the channel
// tile's input channels fit in one chunk, its weights are staged once for all of them. With
// channels-last input, the next chunk's (or tile's) halo is copied by cp.async into a second buffer
// while the current one is computed, so that a block's loads overlap its own MMAs.
constexpr int kMmaThreads = 128;
constexpr int kNTiles = kChannels / 8;
// The epilogue stages the tile's stored values over the halo (StagedTile, tensor_core_tiles.cuh), for
// 16-byte stores and the training statistics, whose lanes' sums follow ([2][lanes][kChannels]).
constexpr int kStageRow = StagedTile<kChannels>::kRow;
constexpr int kMmaStatsBytes = (kMaxPixels * kStageRow + 2 * (kMmaThreads / kChannels) * kChannels) * 4;

// Bytes of one halo buffer of the tensor-core kernel: the halo ([halo][row] 16-bit values), or the
// epilogue's staged tile and statistics over it, whichever is larger (a multiple of 16). The same in
// inference, which stages no statistics: the folded backward recomputes y with the training kernel,
// which must choose the inference forward's tile and chunk, i.e. sum in its order, for its ReLU mask.
__host__ __device__ inline size_t buffer_bytes(const Tiling& t) {
  const size_t x_bytes = size_t(t.halo_h) * t.halo_w * t.row * 2;
  return x_bytes > size_t(kMmaStatsBytes) ? x_bytes : size_t(kMmaStatsBytes);
}

// The exact partial sum of one chunk for output channel `co` at the halo position `base`: over its
// own group's input channels only.
template <typename T>
__device__ __forceinline__ float exact_chunk_sum(const uint16_t* x_tile, const uint16_t* w_tile, int row, int base,
                                                 int c, int co, int k0, int count, const Tiling& tiling,
                                                 int cin_pg, int cout_pg) {
  const int group_begin = (co / cout_pg) * cin_pg;
  const int lo = group_begin > k0 ? group_begin : k0;
  const int hi = group_begin + cin_pg < k0 + count ? group_begin + cin_pg : k0 + count;
  float sum = 0.0f;
  for (int tap = 0; tap < 9; ++tap) {
    const int offset = (tap / 3) * tiling.reach_h * tiling.halo_w + (tap % 3) * tiling.reach_w;
    for (int k = lo; k < hi; ++k)
      sum += Numeric<T>::from_bits(x_tile[(base + offset) * row + k - k0]) *
             Numeric<T>::from_bits(w_tile[(tap * kChannels + c) * row + k - k0]);
  }
  return sum;
}

// w_tile[tap][c][k] = weight of output channel co0 + c, input channel k0 + k, or zero where that
// input channel is outside the output channel's group or past the chunk.
__device__ __forceinline__ void stage_weights(uint16_t* w_tile, const ConvBnReluParams& p, int row, int k0, int count,
                                              const BlockTile& b) {
  const uint16_t* weight = static_cast<const uint16_t*>(p.weight);
  const SmallDivisor by_row(row);  // i < 2^20
  for (int i = int(threadIdx.x); i < kChannels * row; i += kMmaThreads) {
    const int c = by_row.quotient(i), k = i - c * row, oc = b.co0 + c, ic = k0 + k;
    const int group_begin = (oc / b.cout_pg) * b.cin_pg;
    const bool in_group = k < count && oc < b.co_end && ic >= group_begin && ic < group_begin + b.cin_pg;
    const uint16_t* source = weight + weight_offset(p.weight_stride, oc, ic - group_begin, 0);
#pragma unroll
    for (int tap = 0; tap < 9; ++tap)
      w_tile[(tap * kChannels + c) * row + k] = in_group ? source[weight_offset(p.weight_stride, 0, 0, tap)] : uint16_t(0);
  }
}

// Channels-last input, 8-channel aligned chunk: starts copying x_tile[pos][k] = x at halo position
// pos, channel k0 + k (zero outside the image and past the chunk) by 16-byte cp.async, 8 channels of
// a pixel per copy. Vector i lands at x_tile + 8 i.
__device__ __forceinline__ void copy_halo_async(uint16_t* x_tile, const ConvBnReluParams& p, const Tiling& tiling,
                                                const BlockTile& b, int k0, int count) {
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  const int halo_w = tiling.halo_w, halo = tiling.halo_h * halo_w;
  const SmallDivisor by_halo_w(halo_w), by_vectors(tiling.row / 8);  // dividends < 2^20
  for (int i = int(threadIdx.x); i < halo * by_vectors.d; i += kMmaThreads) {
    const int pos = by_vectors.quotient(i), k = (i - pos * by_vectors.d) * 8, halo_row = by_halo_w.quotient(pos);
    const int64_t ih = b.ih0 + halo_input_offset(halo_row, tiling.reach_h, p.dilation);
    const int64_t iw = b.iw0 + halo_input_offset(pos - halo_row * halo_w, tiling.reach_w, p.dilation);
    const bool inside = k < count && ih >= 0 && ih < p.h && iw >= 0 && iw < p.w;
    copy_async_16(x_tile + 8 * i,
                  inside ? x + b.n * p.x_stride[0] + (k0 + k) + ih * p.x_stride[2] + iw * p.x_stride[3] : x, inside);
  }
}

// After copy_halo_async's copies have landed: whether the vectors this thread copied hold an Inf or NaN.
template <typename T>
__device__ __forceinline__ int copied_non_finite(const uint16_t* x_tile, const Tiling& tiling) {
  const uint4* vectors = reinterpret_cast<const uint4*>(x_tile);
  int non_finite = 0;
  for (int i = int(threadIdx.x); i < tiling.halo_h * tiling.halo_w * (tiling.row / 8); i += kMmaThreads) {
    const uint4 v = vectors[i];
    non_finite |= has_non_finite<T>(v.x) | has_non_finite<T>(v.y) | has_non_finite<T>(v.z) | has_non_finite<T>(v.w);
  }
  return non_finite;
}

// Any other input: x_tile[pos][k] as above, one value at a time; returns whether this thread staged
// an Inf or NaN.
template <typename T>
__device__ __forceinline__ int stage_halo(uint16_t* x_tile, const ConvBnReluParams& p, const Tiling& tiling,
                                          const BlockTile& b, int k0, int count) {
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  const int row = tiling.row, halo_w = tiling.halo_w, halo = tiling.halo_h * halo_w;
  const SmallDivisor by_halo_w(halo_w), by_row(row);  // dividends < 2^20
  int non_finite = 0;
  for (int i = int(threadIdx.x); i < halo * row; i += kMmaThreads) {
    const int pos = by_row.quotient(i), k = i - pos * row, halo_row = by_halo_w.quotient(pos);
    const int64_t ih = b.ih0 + halo_input_offset(halo_row, tiling.reach_h, p.dilation);
    const int64_t iw = b.iw0 + halo_input_offset(pos - halo_row * halo_w, tiling.reach_w, p.dilation);
    uint16_t v = 0;
    if (k < count && ih >= 0 && ih < p.h && iw >= 0 && iw < p.w)
      v = x[b.n * p.x_stride[0] + (k0 + k) * p.x_stride[1] + ih * p.x_stride[2] + iw * p.x_stride[3]];
    non_finite |= (v & 0x7fff) >= Numeric<T>::kNonFinite;
    x_tile[pos * row + k] = v;
  }
  return non_finite;
}

template <typename T, bool kTrain>
__global__ void __launch_bounds__(kMmaThreads, 4) conv_bn_relu_folded_mma(const ConvBnReluParams p, const Tiling tiling) {
  RK_DYNAMIC_SHARED(uint16_t, shared);  // raw 16-bit values: zero bits are +0.0 in fp16 and bf16
  const int chunk = tiling.chunk, row = tiling.row, halo_w = tiling.halo_w, tile_w = tiling.tile_w;
  const int tile_pixels = tiling.tile_h * tile_w;
  uint16_t* w_tile = shared;  // [9][kChannels][row]
  // Two halo buffers ([halo][row], then the epilogue's StagedTile): one is computed from while the
  // next unit's halo lands in the other.
  const auto x_buffer = [&, buffer_values = int(buffer_bytes(tiling) / 2)](int64_t unit) {
    return shared + 9 * kChannels * row + int(unit % 2) * buffer_values;
  };
  const int s = p.stride, reach_h = tiling.reach_h, reach_w = tiling.reach_w;

  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
  // The halo positions of this lane's two fragment rows (pixels warp*16 + g and + 8), and of the
  // row it names to ldmatrix (pixel warp*16 + lane % 16, columns from 8 * (lane / 16)).
  int pixel[2], base[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    pixel[r] = warp * 16 + g + 8 * r;
    const int q = pixel[r] < tile_pixels ? pixel[r] : 0;
    base[r] = (q / tile_w) * s * halo_w + (q % tile_w) * s;
  }
  const int a_pixel = warp * 16 + lane % 16 < tile_pixels ? warp * 16 + lane % 16 : 0;
  const int a_base = (a_pixel / tile_w) * s * halo_w + (a_pixel % tile_w) * s, a_column = 8 * (lane / 16);

  T* out = static_cast<T*>(p.out);
  // 16-byte copies of the halo need unit channel stride and 16-byte aligned pixels; 4-byte stores
  // of channel pairs likewise.
  const bool vectorized = vector_layout(p.x_stride, p.x);
  const bool paired_stores = p.out_stride[1] == 1 &&
                             (p.out_stride[0] % 2 | p.out_stride[2] % 2 | p.out_stride[3] % 2) == 0 &&
                             reinterpret_cast<uintptr_t>(out) % 4 == 0;
  const bool vector_stores =
      vector_layout(p.out_stride, out) && (int(blockIdx.y) + 1) * kChannels <= p.c_out;  // a whole tile

  // The block's work is a sequence of units (tile, chunk of input channels): tiles first .. last - 1
  // of the channel tile blockIdx.y, each in `chunks` chunks. Where a unit's halo can be copied
  // 16 bytes at a time, its copies start during the previous unit.
  const int64_t tiles = p.n * tiling.tiles_h * tiling.tiles_w;
  const int64_t first = int64_t(blockIdx.x) * tiling.tiles_per_block;
  const int64_t last = first + tiling.tiles_per_block < tiles ? first + tiling.tiles_per_block : tiles;
  BlockTile b = locate_block(p, tiling, first), next = b;
  const int ci_begin = b.ci_begin, ci_end = b.ci_end, chunks = (ci_end - ci_begin + chunk - 1) / chunk;
  const int64_t units = (last - first) * chunks;
  const auto count_of = [&](int k0) { return chunk < ci_end - k0 ? chunk : ci_end - k0; };
  const auto copied = [&](int k0) { return vectorized && k0 % 8 == 0 && count_of(k0) % 8 == 0; };
  int k_begin[kNTiles], k_end[kNTiles];
  ntile_k_ranges(b.co0, b.co_end, b.cout_pg, b.cin_pg, k_begin, k_end);
  float acc[kNTiles][4];

  if (copied(ci_begin)) copy_halo_async(x_buffer(0), p, tiling, b, ci_begin, count_of(ci_begin));
  copy_async_commit();
  for (int64_t u = 0; u < units; ++u) {
    const int k0 = ci_begin + int(u % chunks) * chunk, count = count_of(k0);
    uint16_t* x_tile = x_buffer(u);
    if (k0 == ci_begin) {
      b = next;
#pragma unroll
      for (int j = 0; j < kNTiles; ++j)
        for (int i = 0; i < 4; ++i) acc[j][i] = 0.0f;
    }
    __syncthreads();  // everyone is done with the previous unit's buffer (the next one's) and weights
    if (chunks > 1 || u == 0) stage_weights(w_tile, p, row, k0, count, b);
    if (u + 1 < units) {
      const int next_k0 = k0 + chunk < ci_end ? k0 + chunk : ci_begin;
      if (next_k0 == ci_begin) next = locate_block(p, tiling, first + (u + 1) / chunks);
      if (copied(next_k0)) copy_halo_async(x_buffer(u + 1), p, tiling, next, next_k0, count_of(next_k0));
    }
    copy_async_commit();
    int non_finite;
    if (copied(k0)) {
      copy_async_wait<1>();  // this unit's group; the next unit's stays in flight
      non_finite = copied_non_finite<T>(x_tile, tiling);
    } else {
      non_finite = stage_halo<T>(x_tile, p, tiling, b, k0, count);
    }
    // A warp whose 16 pixels all lie outside the image (in an edge tile) has nothing to compute: on
    // ResNeXt's 28x28 and 14x14 layers, 1 in 8 warps.
    const bool warp_in_image = __any_sync(0xffffffffu, pixel_in_image(p, b, warp * 16 + lane % 16, tile_pixels, tile_w));
    if (__syncthreads_or(non_finite)) {
      add_exact_sums(acc, t, [&](int c, int r) {
        return (r ? pixel[1] : pixel[0]) < tile_pixels && b.co0 + c < b.co_end
                   ? exact_chunk_sum<T>(x_tile, w_tile, row, r ? base[1] : base[0], c, b.co0 + c, k0, count, tiling,
                                        b.cin_pg, b.cout_pg)
                   : 0.0f;
      });
    } else if (warp_in_image) {
      mma_chunk<T>(acc, k_begin, k_end, k0, count, w_tile, row, lane, false, [&](int tap) {
        return FragmentRow{x_tile + (a_base + (tap / 3) * reach_h * halo_w + (tap % 3) * reach_w) * row + a_column, 1};
      });
    }
    if (k0 + chunk < ci_end) continue;

    // Epilogue: this lane holds channels co, co + 1 (co = co0 + 8j + 2t) of pixels pixel[0..1]. With
    // 16-byte stores (a whole channel tile of channels-last output) or statistics to take, the values
    // go through `stage` (over this unit's halo buffer) first.
    const int64_t tile = first + u / chunks;
    const int co0 = b.co0, co_end = b.co_end;
    const bool staged = vector_stores || (kTrain && p.partials != nullptr);  // uniform over the block
    if (staged) __syncthreads();  // the unit's halo is free
    const StagedTile<kChannels> staging{reinterpret_cast<float*>(x_tile)};
    float* stage = staging.stage;
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
      const int c = 8 * j + 2 * t, co = co0 + c;
      float scale[2] = {1.0f, 1.0f}, shift[2] = {0.0f, 0.0f};
      if constexpr (!kTrain) {
        for (int e = 0; e < 2; ++e)
          if (co + e < co_end) {
            scale[e] = static_cast<const float*>(p.scale)[co + e];
            shift[e] = static_cast<const float*>(p.shift)[co + e];
          }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int q = pixel[r];
        if (co >= co_end || !pixel_in_image(p, b, q, tile_pixels, tile_w)) continue;
        T v[2];
        for (int e = 0; e < 2; ++e)
          v[e] = Numeric<T>::store(kTrain ? acc[j][2 * r + e]
                                          : relu(affine(rounded<T>(acc[j][2 * r + e]), scale[e], shift[e])));
        if (staged) {
          staging.put(q, c, Numeric<T>::load(v[0]), Numeric<T>::load(v[1]));
          if (vector_stores) continue;
        }
        T* at = out + b.n * p.out_stride[0] + co * p.out_stride[1] + (b.oh0 + q / tile_w) * p.out_stride[2] +
                (b.ow0 + q % tile_w) * p.out_stride[3];
        if (paired_stores && co + 1 < co_end) {
          uint16_t bits[2];
          memcpy(bits, v, sizeof bits);
          *reinterpret_cast<uint32_t*>(at) = uint32_t(bits[0]) | uint32_t(bits[1]) << 16;
        } else {
          at[0] = v[0];
          if (co + 1 < co_end) at[p.out_stride[1]] = v[1];
        }
      }
    }
    if (!staged) continue;
    __syncthreads();
    if (vector_stores)
      staging.store<T>(tile_pixels, kMmaThreads, [&](int q) -> T* {
        if (!pixel_in_image(p, b, q, tile_pixels, tile_w)) return nullptr;
        return out + b.n * p.out_stride[0] + co0 + (b.oh0 + q / tile_w) * p.out_stride[2] +
               (b.ow0 + q % tile_w) * p.out_stride[3];
      });
    if constexpr (kTrain) {
      if (p.partials != nullptr)
        block_statistics<float>(p, b, stage, kStageRow, stage + kMaxPixels * kStageRow, kMmaThreads / kChannels,
                                tile_pixels, tile_w, tile, tiles);
    }
  }
}

// Shared memory of one block for a tiling (row and tile set) of element type T.
template <typename T, bool kTrain>
size_t shared_bytes(const Tiling& t) {
  const size_t halo = size_t(t.halo_h) * t.halo_w;
  if constexpr (sizeof(T) == 2) {
    return size_t(9) * kChannels * t.row * 2 + 2 * buffer_bytes(t);
  } else {
    using Acc = typename Numeric<T>::Acc;
    // The training epilogue stages the tile's y over the (finished) input tiles, the lanes' partial
    // statistics after it.
    const size_t tiles = (halo + kChannels * 9) * t.chunk * sizeof(Acc);
    const size_t stats = kTrain ? (size_t(kMaxPixels) * kChannels + 2 * kPixelLanes * kChannels) * sizeof(Acc) : 0;
    return tiles > stats ? tiles : stats;
  }
}

// The largest tile (up to kMaxPixels) whose halo and weights fit in shared memory for a chunk of at
// least one input channel, with the widest chunk that fits (whole 8-channel vectors for 16-bit
// types above 8, keeping staged rows 16-byte aligned); then how many tiles a block takes. A one-pixel
// tile's halo is 3 x 3 pixels whatever the dilation (tap_reach), so some tile always fits.
template <typename T, bool kTrain>
bool choose_tiling(const ConvBnReluParams& p, Tiling* t) {
  constexpr bool kTensorCores = sizeof(T) == 2;
  const bool found = largest_tile(p.h_out, p.w_out, kMaxPixels, [&](int tile_h, int tile_w) {
    set_tile_and_halo(t, tile_h, tile_w, p.stride, p.dilation);
    for (int chunk = kMaxChunk; chunk >= 1; --chunk) {
      if (kTensorCores && chunk > 8 && chunk % 8 != 0) continue;
      t->chunk = chunk;
      t->row = kTensorCores ? mma_row(chunk) : chunk;
      if (shared_bytes<T, kTrain>(*t) <= size_t(kSharedBytes)) return true;
    }
    return false;
  });
  if (!found) return false;
  t->tiles_h = int((p.h_out + t->tile_h - 1) / t->tile_h);
  t->tiles_w = int((p.w_out + t->tile_w - 1) / t->tile_w);
  t->tiles_per_block = 1;  // the tensor-core launch sets its own
  return true;
}

template <typename T, bool kTrain = false>
const char* launch(const ConvBnReluParams& p, void* stream) {
  Tiling tiling;
  if (!choose_tiling<T, kTrain>(p, &tiling))
    return "internal error: no convolution tile fits in shared memory";
  const size_t bytes = shared_bytes<T, kTrain>(tiling);
  const int64_t tiles = p.n * tiling.tiles_h * tiling.tiles_w;
  if constexpr (sizeof(T) == 2)
    tiling.tiles_per_block = tiles_per_block(
        tiles * ((p.c_out + kChannels - 1) / kChannels),
        resident_blocks(conv_bn_relu_folded_mma<T, kTrain>, kMmaThreads, bytes, p.sm_count));
  const int64_t blocks = (tiles + tiling.tiles_per_block - 1) / tiling.tiles_per_block;
  const int64_t channel_tiles = (p.c_out + kChannels - 1) / kChannels;
  if (!grid_fits(blocks, channel_tiles)) return kGridTooLarge;
  const dim3 grid{unsigned(blocks), unsigned(channel_tiles)};
  if constexpr (sizeof(T) == 2) {  // 16-bit inputs run on tensor cores; fp32 and fp64 on FMA units
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
  folded::Tiling tiling;
  bool fits = false;
  switch (p.dtype) {
    case DType::kFloat32: fits = folded::choose_tiling<float, true>(p, &tiling); break;
    case DType::kFloat64: fits = folded::choose_tiling<double, true>(p, &tiling); break;
    case DType::kFloat16: fits = folded::choose_tiling<__half, true>(p, &tiling); break;
    case DType::kBFloat16: fits = folded::choose_tiling<__nv_bfloat16, true>(p, &tiling); break;
  }
  return fits ? p.n * tiling.tiles_h * tiling.tiles_w : 0;
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
