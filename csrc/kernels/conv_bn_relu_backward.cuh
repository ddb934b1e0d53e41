// Backward of z = relu(batch_norm(conv3x3_grouped(x))), training (batch statistics) or folded
// (inference scale and shift). Kernels, in launch order:
//
//  1, 2. the reductions and per-channel coefficients of dy (batch_norm_relu_backward.cuh);
//  3. dgrad: dx = conv_transpose(dy, w), dy computed on the fly while staging it in shared memory;
//  4. wgrad: dw = sum over (n, oh, ow) of x (*) dy, the long reduction split over blocks into
//     partials, then wgrad_reduce sums the splits in order.
// No float atomics anywhere: two runs give bitwise equal results. dgrad and wgrad run on tensor
// cores (mma.sync m16n8k16, fp32 accumulate) for fp16/bf16 and on FMA units for fp32/fp64; the
// reductions always accumulate in fp32 (fp64 for fp64).
#pragma once

#include "params.h"
#include "platform.cuh"
#include "tensor_core_tiles.cuh"

#include "batch_norm_relu_backward.cuh"

namespace resnext_kernels {
namespace backward {

constexpr int kMaxPixels = 64;                     // dgrad: input pixels per block
constexpr int kPixelsPerThread = kMaxPixels / kLanes;
constexpr int kMaxChunk = 64;                      // dgrad: output channels per shared-memory stage
constexpr int kSharedBytes = 48 * 1024;
constexpr int kWgradPixels = 64;                   // wgrad: pixels per shared-memory stage
constexpr int kWgradInputs = kLanes;               // wgrad: input channels (of a group) per block
constexpr int kMaxWgradSplits = 1024;

inline int64_t wgrad_pixels_per_split(const P& p) {
  const int64_t tiles = ceil_div(p.c_out, kChannels) * ceil_div(p.c_in / p.groups, kWgradInputs);
  int64_t splits = ceil_div(pixels(p), 4 * kWgradPixels);  // at least 256 pixels per split
  const int64_t most = ceil_div(kMaxWgradSplits, tiles);
  splits = splits < most ? splits : most;
  return ceil_div(pixels(p), splits > 0 ? splits : 1);
}
inline int64_t wgrad_splits(const P& p) { return ceil_div(pixels(p), wgrad_pixels_per_split(p)); }

// 3. dgrad. A block computes a tile of input pixels of one image for kChannels input channels; it
// stages, one chunk of output channels at a time, dy on the output pixels the tile's pixels feed
// (the "halo", computed on the fly) and the weights. Each thread sums over its own channel's group
// only, so packed small groups never mix. Input pixel ih receives from output row oh through tap kh
// when ih + d - kh * d = oh * s.
//
// Large dilations: the output rows a tile receives from through one tap row span at most
// band = (tile - 2 + s) / s + 1, and where three such bands are fewer rows than the consecutive halo,
// only they are staged, back to back, band k = 2 - kh starting at output row floor((ih0 + (k - 1) d) / s)
// (as the forward does in input space, tensor_core_tiles.cuh).
struct DgradTiling {
  int tile_h, tile_w;  // input pixels per tile
  int halo_h, halo_w;  // output rows and columns they receive from
  int band_h, band_w;  // rows (columns) per band, or 0: the halo is consecutive rows (columns)
  int chunk;
  int row;             // shared-memory values per staged halo position or weight row (>= chunk)
  int tiles_h, tiles_w;
  int tiles_per_block;
  bool phase_major;  // tensor cores: the tile's pixels numbered phase by phase (dgrad_tile_position)
};

// Tile row and column of a tensor-core dgrad tile's pixel q: row-major, or with phase_major (stride
// s > 1, tile sides multiples of s, 16 pixels per phase or a multiple), the pixels of each phase
// (ih % s, iw % s) in turn. A tap reaches an input pixel only from the output grid, i.e. by its
// phase: at stride 2, 1 of the 9 taps for phase (0, 0), 2 for (0, 1) and (1, 0), 4 for (1, 1). With
// every warp's 16 pixels in one phase, a warp skips the taps that reach none of them (mma_chunk).
struct TilePosition {
  int h, w;
};
__device__ __forceinline__ TilePosition dgrad_tile_position(const DgradTiling& t, int s, int q) {
  if (!t.phase_major) return {q / t.tile_w, q % t.tile_w};
  const int phase_w = t.tile_w / s, per_phase = t.tile_h / s * phase_w, phase = q / per_phase, r = q % per_phase;
  return {r / phase_w * s + phase / s, r % phase_w * s + phase % s};
}

__device__ __forceinline__ int floor_div(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

__device__ __forceinline__ int band_shift(int band, int shift1, int shift2) {
  return band == 0 ? 0 : band == 1 ? shift1 : shift2;
}

// Where a dgrad block works: its image and input tile, the first output row and column that reach
// the tile (oh_lo, ow_lo) and the tile's offset from them (eh, ew >= 2d), how much further than
// consecutive rows (columns) bands 1 and 2 of a banded halo start, its input channels and the output
// channels (whole groups) they receive from. 32-bit arithmetic (spatial sizes and the grid fit in
// int); 64-bit only in addresses.
struct DgradBlock {
  int64_t n;
  int ih0, iw0, oh_lo, ow_lo, eh, ew, ci0, ci_end, co_begin, co_stop;
  int shift_h1, shift_h2, shift_w1, shift_w2;

  // The output row (column) staged at halo row (column) r.
  __device__ __forceinline__ int output_row(int r, const DgradTiling& t) const {
    return oh_lo + r + (t.band_h ? band_shift(r / t.band_h, shift_h1, shift_h2) : 0);
  }
  __device__ __forceinline__ int output_column(int r, const DgradTiling& t) const {
    return ow_lo + r + (t.band_w ? band_shift(r / t.band_w, shift_w1, shift_w2) : 0);
  }
  // Tile row (column) a receives through tap row kh from halo row (row_reach(kh) + a) / s, where s
  // divides it.
  __device__ __forceinline__ int row_reach(int kh, int d, int s) const {
    return eh - kh * d - s * band_shift(2 - kh, shift_h1, shift_h2);
  }
  __device__ __forceinline__ int column_reach(int kw, int d, int s) const {
    return ew - kw * d - s * band_shift(2 - kw, shift_w1, shift_w2);
  }
};

__device__ __forceinline__ DgradBlock locate_dgrad_block(const P& p, const DgradTiling& tiling, int cin_pg, int cout_pg,
                                                        int64_t tile) {
  const int s = p.stride, d = p.dilation;
  const int64_t tiles = int64_t(tiling.tiles_h) * tiling.tiles_w;
  const int in_image = int(tile % tiles);
  DgradBlock b;
  b.n = tile / tiles;
  b.ih0 = (in_image / tiling.tiles_w) * tiling.tile_h;
  b.iw0 = (in_image % tiling.tiles_w) * tiling.tile_w;
  b.oh_lo = floor_div(b.ih0 - d, s);
  b.ow_lo = floor_div(b.iw0 - d, s);
  b.eh = b.ih0 + d - b.oh_lo * s;
  b.ew = b.iw0 + d - b.ow_lo * s;
  b.shift_h1 = tiling.band_h ? floor_div(b.ih0, s) - b.oh_lo - tiling.band_h : 0;
  b.shift_h2 = tiling.band_h ? floor_div(b.ih0 + d, s) - b.oh_lo - 2 * tiling.band_h : 0;
  b.shift_w1 = tiling.band_w ? floor_div(b.iw0, s) - b.ow_lo - tiling.band_w : 0;
  b.shift_w2 = tiling.band_w ? floor_div(b.iw0 + d, s) - b.ow_lo - 2 * tiling.band_w : 0;
  b.ci0 = int(blockIdx.y) * kChannels;
  b.ci_end = int(b.ci0 + kChannels < p.c_in ? b.ci0 + kChannels : p.c_in);
  b.co_begin = (b.ci0 / cin_pg) * cout_pg;
  b.co_stop = ((b.ci_end - 1) / cin_pg + 1) * cout_pg;
  return b;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) dgrad(const P p, const DgradTiling tiling) {
  using Acc = typename Numeric<T>::Acc;
  RK_DYNAMIC_SHARED(Acc, shared);
  const int chunk = tiling.chunk, halo_w = tiling.halo_w, tile_w = tiling.tile_w;
  const int halo = tiling.halo_h * halo_w, tile_pixels = tiling.tile_h * tile_w;
  Acc* dy_tile = shared;                // [halo][chunk]
  Acc* w_tile = shared + halo * chunk;  // [kChannels][chunk][9]
  const Acc* coef = workspace_of<Acc>(p).coef;
  const T* weight = static_cast<const T*>(p.weight);
  const int s = p.stride, d = p.dilation;
  const int cin_pg = int(p.c_in / p.groups), cout_pg = int(p.c_out / p.groups);

  const DgradBlock block = locate_dgrad_block(p, tiling, cin_pg, cout_pg, blockIdx.x);  // one tile per block
  const int64_t n = block.n;
  const int ih0 = block.ih0, iw0 = block.iw0;
  const int ci0 = block.ci0, ci_end = block.ci_end, co_begin = block.co_begin, co_stop = block.co_stop;

  const int c_local = int(threadIdx.x) % kChannels, ci = ci0 + c_local, pixel_lane = int(threadIdx.x) / kChannels;
  const SmallDivisor by_s(p.stride);  // nh, nw below: 0 <= . < 2 * halo * s, small
  const bool active = ci < ci_end;
  const int group_begin = active ? (ci / cin_pg) * cout_pg : 0;
  const int group_end = active ? group_begin + cout_pg : 0;

  Acc acc[kPixelsPerThread];
  int pixel_h[kPixelsPerThread], pixel_w[kPixelsPerThread];  // -1: beyond the tile
#pragma unroll
  for (int j = 0; j < kPixelsPerThread; ++j) {
    acc[j] = Acc(0);
    const int pixel = pixel_lane + j * kLanes;
    pixel_h[j] = pixel < tile_pixels ? pixel / tile_w : -1;
    pixel_w[j] = pixel % tile_w;
  }

  for (int k0 = co_begin; k0 < co_stop; k0 += chunk) {
    const int count = chunk < co_stop - k0 ? chunk : co_stop - k0;
    __syncthreads();
    for (int i = int(threadIdx.x); i < halo * count; i += kThreads) {
      const int k = i % count, pos = i / count;
      const int oh = block.output_row(pos / halo_w, tiling), ow = block.output_column(pos % halo_w, tiling);
      Acc v = Acc(0);
      if (oh >= 0 && oh < p.h_out && ow >= 0 && ow < p.w_out) v = dy_at<T>(p, coef, n, k0 + k, oh, ow);
      dy_tile[pos * chunk + k] = v;
    }
    for (int i = int(threadIdx.x); i < kChannels * count * 9; i += kThreads) {
      const int c = i / (count * 9), rest = i % (count * 9), k = rest / 9, tap = rest % 9;
      const int ic = ci0 + c;
      w_tile[(c * chunk + k) * 9 + tap] =
          ic < ci_end ? grouped_weight(weight, p.weight_stride, k0 + k, ic, cin_pg, cout_pg, tap) : Acc(0);
    }
    __syncthreads();
    if (!active) continue;
    const int k_begin = (group_begin > k0 ? group_begin : k0) - k0;
    const int k_end = (group_end < k0 + count ? group_end : k0 + count) - k0;
    for (int k = k_begin; k < k_end; ++k)
      for (int tap = 0; tap < 9; ++tap) {
        const Acc wv = w_tile[(c_local * chunk + k) * 9 + tap];
        const int rh = block.row_reach(tap / 3, d, s), rw = block.column_reach(tap % 3, d, s);
#pragma unroll
        for (int j = 0; j < kPixelsPerThread; ++j) {
          if (pixel_h[j] >= 0) {
            // nh, nw < 2 * halo * s: small
            const int nh = rh + pixel_h[j], nw = rw + pixel_w[j];
            const int qh = by_s.quotient(nh), qw = by_s.quotient(nw);
            if (qh * s == nh && qw * s == nw) acc[j] += dy_tile[(qh * halo_w + qw) * chunk + k] * wv;
          }
        }
      }
  }

  if (!active) return;
  T* dx = static_cast<T*>(p.dx);
#pragma unroll
  for (int j = 0; j < kPixelsPerThread; ++j) {
    const int pixel = pixel_lane + j * kLanes;
    const int ih = ih0 + pixel / tile_w, iw = iw0 + pixel % tile_w;
    if (pixel < tile_pixels && ih < p.h && iw < p.w)
      dx[n * p.dx_stride[0] + ci * p.dx_stride[1] + ih * p.dx_stride[2] + iw * p.dx_stride[3]] =
          Numeric<T>::store(acc[j]);
  }
}

// Tensor cores: bytes of the dy halo's space ([halo][row] 16-bit values), which also holds the
// epilogue's StagedTile; and of y and dz of a unit's halo as copied, 8 channels of the chunk per
// 16-byte vector.
__host__ __device__ inline size_t dgrad_halo_bytes(const DgradTiling& t) {
  const size_t halo_bytes = size_t(t.halo_h) * t.halo_w * t.row * 2;
  const size_t stage_bytes = size_t(kMaxPixels) * StagedTile<kChannels>::kRow * 4;
  return halo_bytes > stage_bytes ? halo_bytes : stage_bytes;
}
inline size_t dgrad_copied_bytes(const DgradTiling& t) {
  return 2 * size_t(t.halo_h) * t.halo_w * ((t.chunk + 7) / 8) * 16;
}

// Shared memory of a dgrad block. FMA: the dy halo and the weights, `chunk` values per channel, in
// the accumulation type. Tensor cores: a zero row, the weights and the dy halo, `row` 16-bit values
// each, then the copied y and dz of the next unit.
template <typename T>
size_t dgrad_shared_bytes(const DgradTiling& t) {
  const size_t halo = size_t(t.halo_h) * t.halo_w;
  if constexpr (sizeof(T) == 2)
    return (1 + size_t(9) * kChannels) * t.row * 2 + dgrad_halo_bytes(t) + dgrad_copied_bytes(t);
  return (halo + size_t(kChannels) * 9) * t.chunk * sizeof(typename Numeric<T>::Acc);
}

// The largest input tile (up to kMaxPixels) whose output halo leaves room for a chunk of at least
// one output channel, with the widest chunk that fits (as the forward's chooser); then how many
// tiles a tensor-core block takes. A one-pixel tile's banded halo is 3 x 3, so some tile always fits.
template <typename T>
bool choose_dgrad_tiling(const P& p, DgradTiling* t) {
  constexpr bool kTensorCores = sizeof(T) == 2;
  const int extra = p.stride == 1 ? 1 : 2;
  const auto halo_rows = [&](int tile, int* band) {
    const int consecutive = (tile - 1 + 2 * p.dilation) / p.stride + extra;
    const int banded = 3 * (tile == 1 ? 1 : (tile - 2) / p.stride + 2);  // no overflow at strides near 2^31
    *band = banded < consecutive ? banded / 3 : 0;
    return *band ? banded : consecutive;
  };
  const bool found = largest_tile(p.h, p.w, kMaxPixels, [&](int tile_h, int tile_w) {
    t->tile_h = tile_h;
    t->tile_w = tile_w;
    t->halo_h = halo_rows(tile_h, &t->band_h);
    t->halo_w = halo_rows(tile_w, &t->band_w);
    for (int chunk = kMaxChunk; chunk >= 1; --chunk) {
      if (kTensorCores && chunk > 8 && chunk % 8 != 0) continue;
      t->chunk = chunk;
      t->row = kTensorCores ? mma_row(chunk) : chunk;
      if (dgrad_shared_bytes<T>(*t) <= size_t(kSharedBytes)) return true;
    }
    return false;
  });
  if (!found) return false;
  t->tiles_h = int(ceil_div(p.h, t->tile_h));
  t->tiles_w = int(ceil_div(p.w, t->tile_w));
  t->tiles_per_block = 1;  // the tensor-core launch sets its own
  const int s = p.stride;
  t->phase_major = kTensorCores && s > 1 && t->tile_h % s == 0 && t->tile_w % s == 0 &&
                   (t->tile_h / s) * (t->tile_w / s) % 16 == 0;
  return true;
}

// Tensor-core dgrad for 16-bit inputs: per tap, (input pixels x output channels) dy times (output
// channels x input channels) weights with mma.m16n8k16, fp32 accumulate, fragments loaded with
// ldmatrix as in the forward (csrc/kernels/conv_bn_relu_folded.cuh): each warp owns 16 input pixels
// and all kChannels input channels (four 8-channel n-tiles); staged weights are zero outside each
// input channel's group and past the chunk, staged dy rows zero past the chunk, and one 16-wide A
// step serves every n-tile it overlaps. dy is computed in fp32 and rounded to T as it is staged (as
// PyTorch's own low-precision backward stores dy in T). A pixel that does not receive from a tap
// (stride > 1) names an all-zero shared row as its A row, and a warp skips the taps none of its
// pixels receive from (dgrad_tile_position puts each warp's pixels in one phase where it can). As
// in the forward, a chunk whose staged dy holds any Inf or NaN is summed exactly per group instead,
// so that Inf * 0 never leaks across packed groups; and a block computes up to kMaxTilesPerBlock
// tiles of one channel tile, staging the weights once when one chunk covers them.
constexpr int kMmaThreads = 128;
constexpr int kNTiles = kChannels / 8;

// The exact sum of one chunk for input channel ci (local c) at tile pixel (qh, qw).
template <typename T>
__device__ __forceinline__ float dgrad_exact_sum(const uint16_t* dy_tile, const uint16_t* w_tile, int row, int k0,
                                                 int count, int qh_tile, int qw_tile, int c, int ci, int halo_w, int s,
                                                 const SmallDivisor& by_s, int d, const DgradBlock& b, int cin_pg,
                                                 int cout_pg) {
  const int group_begin = (ci / cin_pg) * cout_pg;
  const int lo = group_begin > k0 ? group_begin : k0;
  const int hi = group_begin + cout_pg < k0 + count ? group_begin + cout_pg : k0 + count;
  float sum = 0.0f;
  for (int tap = 0; tap < 9; ++tap) {
    const int nh = b.row_reach(tap / 3, d, s) + qh_tile, nw = b.column_reach(tap % 3, d, s) + qw_tile;
    const int qh = by_s.quotient(nh), qw = by_s.quotient(nw);
    if (qh * s != nh || qw * s != nw) continue;
    for (int k = lo; k < hi; ++k)
      sum += Numeric<T>::from_bits(dy_tile[(qh * halo_w + qw) * row + k - k0]) *
             Numeric<T>::from_bits(w_tile[(tap * kChannels + c) * row + k - k0]);
  }
  return sum;
}

template <typename T>
__global__ void __launch_bounds__(kMmaThreads, 4) dgrad_mma(const P p, const DgradTiling tiling) {
  RK_DYNAMIC_SHARED(uint16_t, shared);  // raw 16-bit values: zero bits are +0.0 in fp16 and bf16
  const int chunk = tiling.chunk, row = tiling.row, halo_w = tiling.halo_w, tile_w = tiling.tile_w;
  const int halo = tiling.halo_h * halo_w, tile_pixels = tiling.tile_h * tile_w;
  uint16_t* zero_row = shared;                   // [row]
  uint16_t* w_tile = shared + row;               // [9][kChannels][row]: (tap, input channel, output channel)
  uint16_t* dy_tile = w_tile + 9 * kChannels * row;  // [halo][row]
  // The next unit's y and dz as copied, [halo][chunk / 8] vectors each, after the
  // halo's space: vector (pos, k / 8) is copied and read by the same thread, so no thread waits for
  // another's copies.
  const int copied_vectors = halo * ((chunk + 7) / 8);
  uint4* y_copied = reinterpret_cast<uint4*>(dy_tile + dgrad_halo_bytes(tiling) / 2);
  uint4* dz_copied = y_copied + copied_vectors;
  const float* coef = workspace_of<float>(p).coef;
  const uint16_t* weight = static_cast<const uint16_t*>(p.weight);
  const int s = p.stride, d = p.dilation;
  const SmallDivisor by_s(p.stride);  // nh, nw below: 0 <= . < 2 * halo * s, small
  const int cin_pg = int(p.c_in / p.groups), cout_pg = int(p.c_out / p.groups);

  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
  const int pixel[2] = {warp * 16 + g, warp * 16 + g + 8};  // this lane's two fragment rows
  const auto position = [&](int q) { return dgrad_tile_position(tiling, s, q); };
  // The pixel whose A row this lane names to ldmatrix (-1: beyond the tile), and its column offset.
  const int a_pixel = warp * 16 + lane % 16 < tile_pixels ? warp * 16 + lane % 16 : -1;
  const TilePosition a_position = position(a_pixel < 0 ? 0 : a_pixel);
  const int a_column = 8 * (lane / 16);
  for (int i = int(threadIdx.x); i < row; i += kMmaThreads) zero_row[i] = 0;
  T* dx = static_cast<T*>(p.dx);
  const bool vector_dy = dy_vectorizable(p);
  const bool vector_stores =
      vector_layout(p.dx_stride, dx) && (int(blockIdx.y) + 1) * kChannels <= p.c_in;  // a whole tile
  const SmallDivisor by_row(row), by_vectors(row / 8), by_halo_w(halo_w);  // staging loops: indices < 2^20

  // The block's work is a sequence of units (tile, chunk of output channels): tiles first .. last - 1
  // of the input-channel tile blockIdx.y, each in `chunks` chunks. A unit's y and dz (channels-last)
  // are copied during the previous unit; the thread that copied a vector turns it into dy.
  const int64_t tiles = p.n * tiling.tiles_h * tiling.tiles_w;
  const int64_t first = int64_t(blockIdx.x) * tiling.tiles_per_block;
  const int64_t last = first + tiling.tiles_per_block < tiles ? first + tiling.tiles_per_block : tiles;
  DgradBlock block = locate_dgrad_block(p, tiling, cin_pg, cout_pg, first);
  const int co_begin = block.co_begin, co_stop = block.co_stop, chunks = (co_stop - co_begin + chunk - 1) / chunk;
  const int units = int(last - first) * chunks;  // at most kMaxTilesPerBlock tiles
  const auto count_of = [&](int k0) { return chunk < co_stop - k0 ? chunk : co_stop - k0; };
  const auto by_vectors_of = [&](int k0) { return vector_dy && k0 % 8 == 0 && count_of(k0) % 8 == 0; };
  // Unit vector i of the dy halo: position pos, channels k .. k + 7 of the chunk, its copied vector.
  struct HaloVector {
    int pos, k, oh, ow, copied;
  };
  const auto halo_vector = [&](const DgradBlock& b, int i) {
    HaloVector v;
    v.pos = by_vectors.quotient(i);
    v.k = (i - v.pos * by_vectors.d) * 8;
    const int halo_row = by_halo_w.quotient(v.pos);
    v.oh = b.output_row(halo_row, tiling);
    v.ow = b.output_column(v.pos - halo_row * halo_w, tiling);
    v.copied = v.pos * ((chunk + 7) / 8) + v.k / 8;
    return v;
  };
  const auto copy_dy = [&](const DgradBlock& b, int k0) {
    const int count = count_of(k0);
    for (int i = int(threadIdx.x); i < halo * by_vectors.d; i += kMmaThreads) {
      const HaloVector v = halo_vector(b, i);
      if (v.k < count && v.oh >= 0 && v.oh < p.h_out && v.ow >= 0 && v.ow < p.w_out) {
        copy_async_16(y_copied + v.copied, y_vector_at(p, b.n, k0 + v.k, v.oh, v.ow), true);
        copy_async_16(dz_copied + v.copied, dz_vector_at(p, b.n, k0 + v.k, v.oh, v.ow), true);
      }
    }
  };
  float acc[kNTiles][4];

  if (by_vectors_of(co_begin)) copy_dy(block, co_begin);
  copy_async_commit();
  for (int u = 0; u < units; ++u) {
    const int k0 = co_begin + u % chunks * chunk, count = count_of(k0);
    if (k0 == co_begin) {
      if (u > 0) block = locate_dgrad_block(p, tiling, cin_pg, cout_pg, first + u / chunks);
#pragma unroll
      for (int j = 0; j < kNTiles; ++j)
        for (int i = 0; i < 4; ++i) acc[j][i] = 0.0f;
    }
    const int64_t n = block.n;
    const int ih0 = block.ih0, iw0 = block.iw0, ci0 = block.ci0, ci_end = block.ci_end;
    // Pixels of an edge tile outside the image name the zero row (nothing of theirs is stored), and a
    // warp with none inside skips its MMAs (ResNeXt's 28x28 layers: 2 of the 4 warps of their bottom
    // tiles; 14x14: 1).
    const bool a_in_image = a_pixel >= 0 && ih0 + a_position.h < p.h && iw0 + a_position.w < p.w;
    const bool warp_in_image = __any_sync(0xffffffffu, a_in_image);
    __syncthreads();  // everyone is done with the previous unit's shared memory
    int non_finite = 0;
    if (by_vectors_of(k0)) {
      copy_async_wait<0>();
      for (int i = int(threadIdx.x); i < halo * by_vectors.d; i += kMmaThreads) {
        const HaloVector v = halo_vector(block, i);
        uint4 dy = {0u, 0u, 0u, 0u};
        if (v.k < count && v.oh >= 0 && v.oh < p.h_out && v.ow >= 0 && v.ow < p.w_out)
          dy = dy_vector<T>(p, coef, k0 + v.k, y_copied[v.copied], dz_copied[v.copied]);
        non_finite |= has_non_finite<T>(dy.x) | has_non_finite<T>(dy.y) | has_non_finite<T>(dy.z) | has_non_finite<T>(dy.w);
        *reinterpret_cast<uint4*>(dy_tile + v.pos * row + v.k) = dy;
      }
    } else {
      for (int i = int(threadIdx.x); i < halo * row; i += kMmaThreads) {
        const int pos = by_row.quotient(i), k = i - pos * row, halo_row = by_halo_w.quotient(pos);
        const int oh = block.output_row(halo_row, tiling), ow = block.output_column(pos - halo_row * halo_w, tiling);
        T v = Numeric<T>::store(0.0f);
        if (k < count && oh >= 0 && oh < p.h_out && ow >= 0 && ow < p.w_out)
          v = Numeric<T>::store(dy_at<T>(p, coef, n, k0 + k, oh, ow));
        uint16_t bits;
        memcpy(&bits, &v, 2);
        dy_tile[pos * row + k] = bits;
        non_finite |= (bits & 0x7fff) >= Numeric<T>::kNonFinite;
      }
    }
    if (chunks > 1 || u == 0)
      for (int i = int(threadIdx.x); i < kChannels * row; i += kMmaThreads) {
        const int c = by_row.quotient(i), k = i - c * row, ic = ci0 + c, oc = k0 + k;
        const bool in_group = k < count && ic < ci_end && oc / cout_pg == ic / cin_pg;
        const uint16_t* source = weight + weight_offset(p.weight_stride, oc, ic % cin_pg, 0);
#pragma unroll
        for (int tap = 0; tap < 9; ++tap)
          w_tile[(tap * kChannels + c) * row + k] =
              in_group ? source[weight_offset(p.weight_stride, 0, 0, tap)] : uint16_t(0);
      }
    const bool any_non_finite = __syncthreads_or(non_finite);
    // The next unit's copies go into this thread's own copied vectors, read above: issued after the
    // barrier, which orders those reads before them (PTX orders cp.async with nothing else).
    if (u + 1 < units) {
      const int next_k0 = k0 + chunk < co_stop ? k0 + chunk : co_begin;
      if (by_vectors_of(next_k0))
        copy_dy(next_k0 == co_begin ? locate_dgrad_block(p, tiling, cin_pg, cout_pg, first + (u + 1) / chunks) : block,
                next_k0);
    }
    copy_async_commit();
    if (any_non_finite) {
      add_exact_sums(acc, t, [&](int c, int r) {
        const int q = r ? pixel[1] : pixel[0];
        return q < tile_pixels && ci0 + c < ci_end
                   ? dgrad_exact_sum<T>(dy_tile, w_tile, row, k0, count, position(q).h, position(q).w, c, ci0 + c,
                                        halo_w, s, by_s, d, block, cin_pg, cout_pg)
                   : 0.0f;
      });
    } else if (warp_in_image) {
      int k_begin[kNTiles], k_end[kNTiles];
      ntile_k_ranges(ci0, ci_end, cin_pg, cout_pg, k_begin, k_end);
      mma_chunk<T>(acc, k_begin, k_end, k0, count, w_tile, row, lane, s > 1, [&](int tap) {
        // The halo row this lane's ldmatrix row receives from through this tap, or the zero row.
        const int nh = block.row_reach(tap / 3, d, s) + a_position.h;
        const int nw = block.column_reach(tap % 3, d, s) + a_position.w;
        const int qh = by_s.quotient(nh), qw = by_s.quotient(nw);
        return a_in_image && qh * s == nh && qw * s == nw
                   ? FragmentRow{dy_tile + (qh * halo_w + qw) * row + a_column, 1}
                   : FragmentRow{zero_row + a_column, 0};
      });
    }
    if (k0 + chunk < co_stop) continue;

    // A whole channel tile of channels-last dx goes out 16 bytes at a time, through shared memory.
    auto in_image = [&](int q) { return q < tile_pixels && ih0 + position(q).h < p.h && iw0 + position(q).w < p.w; };
    if (vector_stores) {
      __syncthreads();  // the unit's dy halo is free
      const StagedTile<kChannels> staging{reinterpret_cast<float*>(dy_tile)};
#pragma unroll
      for (int j = 0; j < kNTiles; ++j)
        for (int r = 0; r < 2; ++r)
          if (in_image(pixel[r]))
            staging.put(pixel[r], 8 * j + 2 * t, Numeric<T>::load(Numeric<T>::store(acc[j][2 * r])),
                        Numeric<T>::load(Numeric<T>::store(acc[j][2 * r + 1])));
      __syncthreads();
      staging.store<T>(tile_pixels, kMmaThreads, [&](int q) -> T* {
        if (!in_image(q)) return nullptr;
        return dx + n * p.dx_stride[0] + ci0 + (ih0 + position(q).h) * p.dx_stride[2] + (iw0 + position(q).w) * p.dx_stride[3];
      });
      continue;
    }
#pragma unroll
    for (int j = 0; j < kNTiles; ++j)
      for (int i = 0; i < 4; ++i) {
        const int q = pixel[i / 2], ci = ci0 + 8 * j + 2 * t + i % 2;
        if (in_image(q) && ci < ci_end)
          dx[n * p.dx_stride[0] + ci * p.dx_stride[1] + (ih0 + position(q).h) * p.dx_stride[2] +
             (iw0 + position(q).w) * p.dx_stride[3]] = Numeric<T>::store(acc[j][i]);
      }
  }
}

// 4. wgrad. Block (split, output-channel tile, input-channel tile): thread (co, ci_l) accumulates
// the 9 taps of dw[co, ci_l] over the split's pixels, kWgradPixels at a time: dy staged in shared
// memory (computed on the fly), x read through the cache (threads of one group read the same x).
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) wgrad(const P p, int64_t pixels_per_split, bool channel_fast) {
  using Acc = typename Numeric<T>::Acc;
  __shared__ Acc dy_tile[kWgradPixels][kChannels];
  __shared__ int64_t image[kWgradPixels];
  __shared__ int out_h[kWgradPixels], out_w[kWgradPixels];
  const Workspace<Acc> ws = workspace_of<Acc>(p);
  const T* x = static_cast<const T*>(p.x);
  const int cin_pg = int(p.c_in / p.groups), cout_pg = int(p.c_out / p.groups), d = p.dilation;
  const int co0 = int(blockIdx.y) * kChannels;
  const int c_local = int(threadIdx.x) % kChannels, slot = int(threadIdx.x) / kChannels;
  const int co = co0 + c_local, ci_l = int(blockIdx.z) * kWgradInputs + slot;
  const bool active = co < p.c_out && ci_l < cin_pg;
  const int64_t ci = active ? int64_t(co / cout_pg) * cin_pg + ci_l : 0;
  const int64_t total = pixels(p);
  const int64_t m0 = int64_t(blockIdx.x) * pixels_per_split;
  const int64_t m1 = m0 + pixels_per_split < total ? m0 + pixels_per_split : total;
  // The stage's first pixel as (image, pixel in image), advanced without 64-bit divisions in the loop
  // (an image has fewer than 2^31 pixels: the binding checks it; unsigned, a pixel index plus a
  // stage's count cannot wrap).
  const unsigned hw = unsigned(p.h_out * p.w_out), w_out = unsigned(p.w_out);
  int64_t stage_n = m0 / hw;
  unsigned stage_r = unsigned(m0 % hw);

  Acc acc[9];
#pragma unroll
  for (int tap = 0; tap < 9; ++tap) acc[tap] = Acc(0);

  for (int64_t mb = m0; mb < m1; mb += kWgradPixels) {  // stage_n, stage_r: pixel mb
    const int count = int(m1 - mb < kWgradPixels ? m1 - mb : kWgradPixels);
    __syncthreads();
    for (int q = int(threadIdx.x); q < count; q += kThreads) {
      int64_t n = stage_n;
      unsigned r = stage_r + unsigned(q);
      while (r >= hw) r -= hw, ++n;
      image[q] = n;
      out_h[q] = int(r / w_out);
      out_w[q] = int(r % w_out);
    }
    stage_r += unsigned(count);
    while (stage_r >= hw) stage_r -= hw, ++stage_n;
    __syncthreads();
    for (int i = int(threadIdx.x); i < kWgradPixels * kChannels; i += kThreads) {
      const int c = channel_fast ? i % kChannels : i / kWgradPixels;
      const int q = channel_fast ? i / kChannels : i % kWgradPixels;
      if (q >= count || co0 + c >= p.c_out) continue;
      dy_tile[q][c] = dy_at<T>(p, ws.coef, image[q], co0 + c, out_h[q], out_w[q]);
    }
    __syncthreads();
    if (!active) continue;
    const T* xc = x + ci * p.x_stride[1];
    for (int q = 0; q < count; ++q) {
      const Acc dy = dy_tile[q][c_local];
      const T* xq = xc + image[q] * p.x_stride[0];
      const int ihb = out_h[q] * p.stride - d, iwb = out_w[q] * p.stride - d;
#pragma unroll
      for (int tap = 0; tap < 9; ++tap) {
        const int ih = ihb + (tap / 3) * d, iw = iwb + (tap % 3) * d;
        if (ih >= 0 && ih < p.h && iw >= 0 && iw < p.w)
          acc[tap] += Numeric<T>::load(xq[ih * p.x_stride[2] + iw * p.x_stride[3]]) * dy;
      }
    }
  }
  if (!active) return;
  Acc* out = ws.partials + (int64_t(blockIdx.x) * p.c_out + co) * (cin_pg * 9) + ci_l * 9;
#pragma unroll
  for (int tap = 0; tap < 9; ++tap) out[tap] = acc[tap];
}

// Tensor-core wgrad for 16-bit inputs. Per block (split, kChannels output channels, up to
// kWmmaInputs input channels of the contiguous range the block's groups read), over the split's
// (image, output tile) units in order: D[co][(tap, ci)] += sum over the tile's pixels of
// dy[pixel][co] * x[pixel, ci, tap] with mma.m16n8k16 (A = dy^T, two 16-row m-tiles; B from the
// tile's input halo staged once per unit, so x is loaded once per tile rather than once per tap;
// fp32 accumulate). Fragments come with ldmatrix: A from dy_tile's pixel-contiguous rows, B
// transposed from the halo, where 8 consecutive input channels of one tap are 16 contiguous bytes;
// a pixel outside the image or the tile names a zero row. Small groups are packed densely: D also
// holds products of channels of different groups, which are simply not written out (real products,
// no masking zeros, so non-finite values cannot leak), and an (m-tile, n-tile) pair with no
// channel pair of one group is skipped. Warp w owns the 9 n-tiles 9w .. 9w + 8, n-tile
// nt = 4 * tap + (8-channel slice of the inputs). Channels-last y, dz and x are copied by cp.async
// one unit ahead, so that a unit's loads overlap the previous unit's MMAs (at 2 blocks per SM,
// another block alone could not hide them).
constexpr int kWmmaInputs = 32;
constexpr int kWmmaRow = kWgradPixels + 8;   // dy_tile row: pixels (padded against bank conflicts)
constexpr int kWmmaHaloRow = kWmmaInputs + 8;  // x halo row: input channels (padded)
constexpr int kWmmaNTiles = kWmmaInputs * 9 / 8 / 4;  // per warp
constexpr int kWmmaDyBytes = kChannels * kWmmaRow * 2;
constexpr int kWmmaVectors = kChannels / 8 * kWgradPixels;  // 8-channel vectors of a unit's y (and dz)
constexpr int kWmmaRawBytes = 2 * kWmmaVectors * 16;        // y and dz as copied, before dy
constexpr int kWmmaZeroBytes = 16;                          // the zero row
constexpr int kWmmaPixelBytes = kWgradPixels * 4;           // pixel_base
constexpr int kWmmaFixedBytes = kWmmaDyBytes + kWmmaRawBytes + kWmmaZeroBytes + kWmmaPixelBytes;

struct WgradTiling {
  int tile_h, tile_w;  // output pixels per unit (at most kWgradPixels)
  int halo_h, halo_w;  // the input rows and columns they read (staged in bands: tap_reach)
  int reach_h, reach_w;  // rows and columns between the taps in the staged halo (tap_reach)
  int tiles_h, tiles_w;
  int64_t units_per_split;
};

// The largest output tile whose two input halo buffers fit beside dy_tile (a one-pixel tile's
// banded halo is 3 x 3: some tile always fits).
inline bool choose_wgrad_tiling(const P& p, WgradTiling* t) {
  const int budget = (kSharedBytes - kWmmaFixedBytes) / (2 * kWmmaHaloRow * 2);
  const bool found = largest_tile(p.h_out, p.w_out, kWgradPixels, [&](int tile_h, int tile_w) {
    set_tile_and_halo(t, tile_h, tile_w, p.stride, p.dilation);
    return int64_t(t->halo_h) * t->halo_w <= budget;
  });
  if (!found) return false;
  const int tile_h = t->tile_h, tile_w = t->tile_w;
  t->tiles_h = int(ceil_div(p.h_out, tile_h));
  t->tiles_w = int(ceil_div(p.w_out, tile_w));
  // No more splits than the workspace holds (wgrad_splits), none empty.
  const int64_t units = p.n * t->tiles_h * t->tiles_w, splits = wgrad_splits(p);
  t->units_per_split = ceil_div(units, splits < units ? splits : units);
  return true;
}
inline int64_t wgrad_mma_splits(const P& p, const WgradTiling& t) {
  return ceil_div(p.n * t.tiles_h * t.tiles_w, t.units_per_split);
}
inline size_t wgrad_mma_shared_bytes(const WgradTiling& t) {
  return size_t(kWmmaFixedBytes) + size_t(2) * t.halo_h * t.halo_w * kWmmaHaloRow * 2;
}

__host__ __device__ inline int wgrad_mma_input_begin(const P& p, int co0) {
  return (co0 / int(p.c_out / p.groups)) * int(p.c_in / p.groups);
}
__host__ __device__ inline int wgrad_mma_input_stop(const P& p, int co0) {
  const int co_end = int(co0 + kChannels < p.c_out ? co0 + kChannels : p.c_out);
  return ((co_end - 1) / int(p.c_out / p.groups) + 1) * int(p.c_in / p.groups);
}

template <typename T>
__global__ void __launch_bounds__(kMmaThreads, 2) wgrad_mma(const P p, const WgradTiling tiling) {
  RK_DYNAMIC_SHARED(uint16_t, shared);
  uint16_t* dy_tile = shared;  // [kChannels][kWmmaRow]: (co, pixel)
  const Workspace<float> ws = workspace_of<float>(p);
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  const int cin_pg = int(p.c_in / p.groups), cout_pg = int(p.c_out / p.groups), d = p.dilation, s = p.stride;
  const int co0 = int(blockIdx.y) * kChannels;
  const int ci_begin = wgrad_mma_input_begin(p, co0) + int(blockIdx.z) * kWmmaInputs;
  const int ci_stop = wgrad_mma_input_stop(p, co0);
  if (ci_begin >= ci_stop) return;  // uniform over the block
  const int ci_count = ci_stop - ci_begin < kWmmaInputs ? ci_stop - ci_begin : kWmmaInputs;
  const int tile_w = tiling.tile_w, tile_pixels = tiling.tile_h * tile_w, halo_w = tiling.halo_w;
  const int halo = tiling.halo_h * halo_w;
  // Two input halo buffers, [halo][kWmmaHaloRow]: (position, ci). The next unit's halo lands in one
  // while the MMAs read the other.
  const auto x_halo_of = [&](int64_t unit) {
    return shared + kChannels * kWmmaRow + int(unit % 2) * halo * kWmmaHaloRow;
  };
  // y and dz of the unit's pixels as copied, 8 channels per vector: vector i is copied and read
  // by the same thread, so no thread waits for another's copies.
  uint4* y_copied = reinterpret_cast<uint4*>(shared + kChannels * kWmmaRow + 2 * halo * kWmmaHaloRow);
  uint4* dz_copied = y_copied + kWmmaVectors;
  uint16_t* zero_row = reinterpret_cast<uint16_t*>(dz_copied + kWmmaVectors);  // [8]
  // [kWgradPixels]: the halo position of a pixel's first tap, -1: none.
  int* pixel_base = reinterpret_cast<int*>(zero_row + 8);
  const unsigned tiles = unsigned(tiling.tiles_h) * unsigned(tiling.tiles_w);
  const int64_t units = p.n * tiles, u0 = int64_t(blockIdx.x) * tiling.units_per_split;
  const int64_t u1 = u0 + tiling.units_per_split < units ? u0 + tiling.units_per_split : units;
  int64_t n = u0 / tiles;  // the unit as (image, tile), advanced without divisions in the loop
  int tile = int(u0 % tiles);

  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
  // N-tile nt's tap and first input channel; bit 2j + mt of `needed`: m-tile mt holds an output
  // channel of the same group as one of the input channels of the warp's n-tile j.
  auto tap_of = [&](int j) { return (warp * kWmmaNTiles + j) / 4; };
  auto slice_of = [&](int j) { return (warp * kWmmaNTiles + j) % 4 * 8; };
  int needed = 0;
#pragma unroll
  for (int j = 0; j < kWmmaNTiles; ++j) {
    const int slice = slice_of(j), ci_lo = ci_begin + slice;
    const int ci_hi = ci_begin + (slice + 7 < ci_count ? slice + 7 : ci_count - 1);
    for (int mt = 0; mt < 2; ++mt) {
      const int co_lo = co0 + 16 * mt, co_hi = co_lo + 15 < p.c_out ? co_lo + 15 : int(p.c_out) - 1;
      if (slice < ci_count && co_lo < p.c_out && ci_lo / cin_pg <= co_hi / cout_pg && co_lo / cout_pg <= ci_hi / cin_pg)
        needed |= 1 << (2 * j + mt);
    }
  }
  float acc[2][kWmmaNTiles][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int j = 0; j < kWmmaNTiles; ++j)
      for (int i = 0; i < 4; ++i) acc[mt][j][i] = 0.0f;
  if (threadIdx.x < kWmmaZeroBytes / 2) zero_row[threadIdx.x] = 0;
  const bool vector_dy = dy_vectorizable(p);
  // x by 16-byte copies of 8 channels where it is channels-last with 16-byte aligned pixels and the
  // block's input channels come in whole vectors; else one value at a time.
  const bool vector_x = vector_layout(p.x_stride, x) && ci_begin % 8 == 0 && ci_count % 8 == 0;
  const SmallDivisor by_halo_w(halo_w);  // positions < 2^20

  // Unit (image un, tile ut)'s vector i of dy: channels co0 + c .. + 7 of pixel q, copied (and
  // computed from y and dz 8 channels at a time) where the 8 channels and the pixel all exist.
  struct DyVector {
    int c, q, oh, ow;
    bool in_tile, copied;
  };
  const auto dy_vector_of = [&](int ut, int i) {
    DyVector v;
    v.c = (i % (kChannels / 8)) * 8;
    v.q = i / (kChannels / 8);
    v.oh = (ut / tiling.tiles_w) * tiling.tile_h + v.q / tile_w;
    v.ow = (ut % tiling.tiles_w) * tile_w + v.q % tile_w;
    v.in_tile = v.q < tile_pixels && v.oh < p.h_out && v.ow < p.w_out;
    v.copied = vector_dy && v.in_tile && co0 + v.c + 8 <= p.c_out;
    return v;
  };
  const auto copy_dy = [&](int64_t un, int ut) {
    for (int i = int(threadIdx.x); i < kWmmaVectors; i += kMmaThreads) {
      const DyVector v = dy_vector_of(ut, i);
      if (!v.copied) continue;
      copy_async_16(y_copied + i, y_vector_at(p, un, co0 + v.c, v.oh, v.ow), true);
      copy_async_16(dz_copied + i, dz_vector_at(p, un, co0 + v.c, v.oh, v.ow), true);
    }
  };
  const auto copy_x = [&](int64_t un, int ut, uint16_t* x_halo) {
    const int ih0 = (ut / tiling.tiles_w) * tiling.tile_h * s - d, iw0 = (ut % tiling.tiles_w) * tile_w * s - d;
    for (int i = int(threadIdx.x); i < halo * (kWmmaInputs / 8); i += kMmaThreads) {
      const int pos = i / (kWmmaInputs / 8), c = i % (kWmmaInputs / 8) * 8, halo_row = by_halo_w.quotient(pos);
      const int ih = ih0 + halo_input_offset(halo_row, tiling.reach_h, d);
      const int iw = iw0 + halo_input_offset(pos - halo_row * halo_w, tiling.reach_w, d);
      const bool inside = c < ci_count && ih >= 0 && ih < p.h && iw >= 0 && iw < p.w;
      copy_async_16(x_halo + pos * kWmmaHaloRow + c,
                    inside ? x + un * p.x_stride[0] + (ci_begin + c) + ih * p.x_stride[2] + iw * p.x_stride[3] : x,
                    inside);
    }
  };

  // Each unit's y, dz and x copies start during the previous unit.
  copy_dy(n, tile);
  if (vector_x) copy_x(n, tile, x_halo_of(u0));
  copy_async_commit();
  for (int64_t u = u0; u < u1; ++u) {
    const int oh0 = (tile / tiling.tiles_w) * tiling.tile_h, ow0 = (tile % tiling.tiles_w) * tile_w;
    const int ih0 = oh0 * s - d, iw0 = ow0 * s - d;
    // The K steps run over the tile's rows inside the image only: an edge tile's last rows are zeros
    // (ResNeXt's 28x28 layers: half the K steps of their bottom tiles; 14x14: a quarter).
    const int k_pixels = int(p.h_out - oh0 < tiling.tile_h ? p.h_out - oh0 : tiling.tile_h) * tile_w;
    uint16_t* x_halo = x_halo_of(u);
    __syncthreads();  // the previous unit's tiles have been read
    for (int q = int(threadIdx.x); q < kWgradPixels; q += kMmaThreads) {
      const int ph = q / tile_w, pw = q % tile_w;
      pixel_base[q] = q < tile_pixels && oh0 + ph < p.h_out && ow0 + pw < p.w_out ? ph * s * halo_w + pw * s : -1;
    }
    copy_async_wait<0>();
    // dy, 8 channels of a pixel at a time: from the copied vectors where they are all there, else
    // one by one.
    for (int i = int(threadIdx.x); i < kWmmaVectors; i += kMmaThreads) {
      const DyVector v = dy_vector_of(tile, i);
      if (v.copied) {
        const uint4 dy = dy_vector<T>(p, ws.coef, co0 + v.c, y_copied[i], dz_copied[i]);
        const uint32_t words[4] = {dy.x, dy.y, dy.z, dy.w};
#pragma unroll
        for (int e = 0; e < 8; ++e) dy_tile[(v.c + e) * kWmmaRow + v.q] = uint16_t(words[e / 2] >> (16 * (e % 2)));
        continue;
      }
      for (int e = 0; e < 8; ++e) {
        T dy = Numeric<T>::store(0.0f);
        if (v.in_tile && co0 + v.c + e < p.c_out)
          dy = Numeric<T>::store(dy_at<T>(p, ws.coef, n, co0 + v.c + e, v.oh, v.ow));
        uint16_t bits;
        memcpy(&bits, &dy, 2);
        dy_tile[(v.c + e) * kWmmaRow + v.q] = bits;
      }
    }
    if (!vector_x) {
      for (int i = int(threadIdx.x); i < halo * kWmmaInputs; i += kMmaThreads) {
        const int c = i % kWmmaInputs, pos = i / kWmmaInputs, halo_row = by_halo_w.quotient(pos);
        const int ih = ih0 + halo_input_offset(halo_row, tiling.reach_h, d);
        const int iw = iw0 + halo_input_offset(pos - halo_row * halo_w, tiling.reach_w, d);
        uint16_t v = 0;
        if (c < ci_count && ih >= 0 && ih < p.h && iw >= 0 && iw < p.w)
          v = x[n * p.x_stride[0] + (ci_begin + c) * p.x_stride[1] + ih * p.x_stride[2] + iw * p.x_stride[3]];
        x_halo[pos * kWmmaHaloRow + c] = v;
      }
    }
    __syncthreads();
    // The next unit's copies, into this thread's own y and dz vectors (read above: the barrier
    // orders those reads before the copies, which PTX orders with nothing else) and the other halo
    // buffer (read by nobody since the loop's first barrier).
    if (++tile == int(tiles)) tile = 0, ++n;
    if (u + 1 < u1) {
      copy_dy(n, tile);
      if (vector_x) copy_x(n, tile, x_halo_of(u + 1));
    }
    copy_async_commit();
    for (int ks = 0; ks < k_pixels; ks += kMmaK) {
      // A (m-tile mt): lane l names row co = 16 mt + l % 16 at pixels ks + 8 (l / 16).
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) ldmatrix(a[mt], dy_tile + (16 * mt + lane % 16) * kWmmaRow + ks + 8 * (lane / 16));
      // B, transposed: lane l (< 16) names pixel ks + l's 8 input channels of the n-tile's tap.
      const int base = pixel_base[ks + lane % 16];
#pragma unroll
      for (int j = 0; j < kWmmaNTiles; ++j) {
        if ((needed >> 2 * j & 3) == 0) continue;
        const int tap = tap_of(j), offset = (tap / 3) * tiling.reach_h * halo_w + (tap % 3) * tiling.reach_w;
        uint32_t b[2];
        ldmatrix_trans(b, base < 0 ? zero_row : x_halo + (base + offset) * kWmmaHaloRow + slice_of(j));
        if (needed >> 2 * j & 1) mma_m16n8k16<T>(acc[0][j], a[0], b);
        if (needed >> 2 * j & 2) mma_m16n8k16<T>(acc[1][j], a[1], b);
      }
    }
  }

  float* out = ws.partials + int64_t(blockIdx.x) * p.c_out * (cin_pg * 9);
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int j = 0; j < kWmmaNTiles; ++j)
      for (int i = 0; i < 4; ++i) {
        const int co = co0 + mt * 16 + g + 8 * (i / 2);
        const int tap = tap_of(j), c = slice_of(j) + 2 * t + i % 2, ci = ci_begin + c;
        if (co >= p.c_out || c >= ci_count || ci / cin_pg != co / cout_pg) continue;
        out[int64_t(co) * (cin_pg * 9) + (ci % cin_pg) * 9 + tap] = acc[mt][j][i];
      }
}

// Sums the wgrad splits in order into dw.
template <typename T>
__global__ void __launch_bounds__(kThreads) wgrad_reduce(const P p, int64_t splits) {
  using Acc = typename Numeric<T>::Acc;
  const Acc* partials = workspace_of<Acc>(p).partials;
  const int64_t size = p.c_out * (p.c_in / p.groups) * 9, step = int64_t(gridDim.x) * kThreads;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < size; e += step) {
    Acc sum = Acc(0);
    for (int64_t b = 0; b < splits; ++b) sum += partials[b * size + e];
    static_cast<T*>(p.dw)[e] = Numeric<T>::store(sum);
  }
}

template <typename T>
const char* launch(const P& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  // y and z of the grids below: channel tiles of c_out and c_in, and wgrad's input tiles per group.
  if (!grid_fits(1, ceil_div(p.c_out, kChannels), ceil_div(p.c_in / p.groups, kWgradInputs)) ||
      !grid_fits(1, ceil_div(p.c_in, kChannels)))
    return kGridTooLarge;
  const unsigned channel_tiles = unsigned(ceil_div(p.c_out, kChannels));
  if (const char* error = launch_reductions<T, Mask::kFromY>(p, s)) return error;
  if (p.dx != nullptr) {
    DgradTiling tiling;
    if (!choose_dgrad_tiling<T>(p, &tiling))
      return "internal error: no dgrad tile fits in shared memory";
    const size_t bytes = dgrad_shared_bytes<T>(tiling);
    const int64_t dgrad_tiles = p.n * tiling.tiles_h * tiling.tiles_w;
    if constexpr (sizeof(T) == 2)
      tiling.tiles_per_block = tiles_per_block(dgrad_tiles * ceil_div(p.c_in, kChannels),
                                               resident_blocks(dgrad_mma<T>, kMmaThreads, bytes, p.sm_count));
    const int64_t dgrad_blocks = ceil_div(dgrad_tiles, tiling.tiles_per_block);
    if (!grid_fits(dgrad_blocks)) return kGridTooLarge;
    const dim3 grid(unsigned(dgrad_blocks), unsigned(ceil_div(p.c_in, kChannels)));
    if constexpr (sizeof(T) == 2) {  // 16-bit inputs run on tensor cores; fp32 and fp64 on FMA units
      auto dgrad_kernel = dgrad_mma<T>;
      RK_LAUNCH(dgrad_kernel, grid, dim3(kMmaThreads), bytes, s, p, tiling);
    } else {
      auto dgrad_kernel = dgrad<T>;
      RK_LAUNCH(dgrad_kernel, grid, dim3(kThreads), bytes, s, p, tiling);
    }
    if (const char* error = RK_LAUNCH_ERROR()) return error;
  }
  if (p.dw != nullptr) {
    int64_t splits = wgrad_splits(p);
    if constexpr (sizeof(T) == 2) {  // 16-bit inputs run on tensor cores; fp32 and fp64 on FMA units
      WgradTiling tiling;
      if (!choose_wgrad_tiling(p, &tiling)) return "internal error: no wgrad tile fits in shared memory";
      int input_tiles = 1;  // the most any output-channel tile needs
      for (int co0 = 0; co0 < p.c_out; co0 += kChannels) {
        const int tiles = int(ceil_div(wgrad_mma_input_stop(p, co0) - wgrad_mma_input_begin(p, co0), kWmmaInputs));
        input_tiles = tiles > input_tiles ? tiles : input_tiles;
      }
      splits = wgrad_mma_splits(p, tiling);
      if (!grid_fits(splits, channel_tiles, input_tiles)) return kGridTooLarge;
      auto wgrad_kernel = wgrad_mma<T>;
      RK_LAUNCH(wgrad_kernel, dim3(unsigned(splits), channel_tiles, unsigned(input_tiles)), dim3(kMmaThreads),
                wgrad_mma_shared_bytes(tiling), s, p, tiling);
    } else {
      auto wgrad_kernel = wgrad<T>;
      RK_LAUNCH(wgrad_kernel,
                dim3(unsigned(splits), channel_tiles, unsigned(ceil_div(p.c_in / p.groups, kWgradInputs))),
                dim3(kThreads), 0, s, p, wgrad_pixels_per_split(p), p.dz_stride[1] == 1);
    }
    if (const char* error = RK_LAUNCH_ERROR()) return error;
    const int64_t size = p.c_out * (p.c_in / p.groups) * 9, reduce_grid = ceil_div(size, kThreads);
    auto wgrad_reduce_kernel = wgrad_reduce<T>;
    RK_LAUNCH(wgrad_reduce_kernel, dim3(unsigned(reduce_grid < 4096 ? reduce_grid : 4096)), dim3(kThreads), 0, s, p,
              splits);
    if (const char* error = RK_LAUNCH_ERROR()) return error;
  }
  return nullptr;
}

}  // namespace backward

int64_t backward_workspace_elements(const ConvBnReluBackwardParams& p) {
  using namespace backward;
  const int64_t reduce = 2 * reduce_blocks(p) * p.c_out;
  const int64_t wgrad = wgrad_splits(p) * p.c_out * (p.c_in / p.groups) * 9;
  return kRows * p.c_out + (reduce > wgrad ? reduce : wgrad);
}

const char* launch_conv_bn_relu_backward(const ConvBnReluBackwardParams& p, void* stream) {
  switch (p.dtype) {
    case DType::kFloat32: return backward::launch<float>(p, stream);
    case DType::kFloat64: return backward::launch<double>(p, stream);
    case DType::kFloat16: return backward::launch<__half>(p, stream);
    case DType::kBFloat16: return backward::launch<__nv_bfloat16>(p, stream);
  }
  return "unsupported dtype";
}

}  // namespace resnext_kernels
