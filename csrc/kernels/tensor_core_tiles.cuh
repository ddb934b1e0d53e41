// The building blocks of the packed tensor-core kernels (forward, dgrad): K ranges of packed groups,
// shared row sizes, the tile search and banded halos (every kernel's), persistent blocks, the per-chunk
// MMA loop, the exact fallback for non-finite chunks, and the staged 16-byte epilogue.
#pragma once

#include "platform.cuh"

namespace resnext_kernels {

// For an MMA tile whose n columns [n0, n_end) come in 8-wide n-tiles, where each group maps
// n_per_group columns to k_per_group rows of K: the K range (whole groups) each n-tile reads. No
// n-tile reads another group's rows beyond what its own columns span.
template <int NTiles>
__device__ __forceinline__ void ntile_k_ranges(int n0, int n_end, int n_per_group, int k_per_group,
                                               int (&k_begin)[NTiles], int (&k_end)[NTiles]) {
#pragma unroll
  for (int j = 0; j < NTiles; ++j) {
    const int first = n0 + 8 * j, last = (first + 7 < n_end ? first + 7 : n_end - 1);
    k_begin[j] = first < n_end ? (first / n_per_group) * k_per_group : 0;
    k_end[j] = first < n_end ? (last / n_per_group + 1) * k_per_group : 0;
  }
}

// K of one mma.m16n8k16 step.
constexpr int kMmaK = 16;
constexpr int kMaxTilesPerBlock = 8;

// Values per staged shared row of the tensor-core kernels: `chunk` channels padded with zero
// columns to a whole kMmaK, so every 16-wide K step (they start at multiples of kMmaK inside the
// chunk) stays in its row, plus 8 columns nobody reads, so that row % 16 == 8 and the eight 16-byte
// rows one ldmatrix reads from consecutive positions (stride 1; stride 2 leaves 2-way conflicts)
// hit distinct banks.
__host__ __device__ inline int mma_row(int chunk) {
  return (chunk + kMmaK - 1) / kMmaK * kMmaK + 8;
}

// How many tiles (of `work` tiles x channel tiles) a persistent tensor-core block computes in turn,
// when `slots` blocks fit on the device at once: as many as whole waves of blocks allow, up to
// kMaxTilesPerBlock. Long blocks overlap each tile's copies with the previous tile's MMAs and stage
// their weights once, so small layers get them too (ResNeXt's stage 4 on an H100: 4096 tiles,
// 132 SMs x 4 blocks, 8 tiles per block in one wave), while blocks of whole waves leave no
// straggling partial wave. The host test build (no slots) takes the most, so its tests run the
// multi-tile path.
constexpr int tiles_per_block(int64_t work, int64_t slots) {
  if (slots <= 0) return kMaxTilesPerBlock;
  const int64_t waves = (work + slots * kMaxTilesPerBlock - 1) / (slots * kMaxTilesPerBlock);
  const int64_t per_block = (work + slots * waves - 1) / (slots * waves);
  return int(per_block < 1 ? 1 : per_block);
}
static_assert(tiles_per_block(4096, 528) == 8 && tiles_per_block(100352, 528) == 8, "ResNeXt-50 stages 4 and 1");
static_assert(tiles_per_block(100, 528) == 1 && tiles_per_block(1000, 528) == 2, "small work: one block per slot");
static_assert(tiles_per_block(4224 + 1, 528) == 5, "just over one wave of 8: two waves of 5");

// Tiling search shared by the kernels: the largest tile of at most max_pixels (at most 8 wide) of
// an h x w image for which fits(tile_h, tile_w) holds, halving its longer side until one does;
// false when not even 1 x 1 fits.
template <typename Fits>
inline bool largest_tile(int64_t h, int64_t w, int max_pixels, Fits fits) {
  int tile_w = int(w < 8 ? w : 8);
  int tile_h = int(h < max_pixels / tile_w ? h : max_pixels / tile_w);
  while (!fits(tile_h, tile_w)) {
    if (tile_h == 1 && tile_w == 1) return false;
    if (tile_h >= tile_w) tile_h = (tile_h + 1) / 2; else tile_w = (tile_w + 1) / 2;
  }
  return true;
}

// Large dilations. A tile of `tile` output rows reads input rows spanning (tile - 1) * stride +
// 2 * dilation + 1, and once the dilation passes the tile's own span, (tile - 1) * stride + 1, most of
// them are rows no tap reads. Then only three bands of `span` rows are staged, one per tap row, back to
// back: in the staged halo the taps lie `reach` = min(dilation, span) rows apart, and staged row r
// holds the input row r + (r / reach) * (dilation - reach) past the halo's first. Columns alike. With
// reach == dilation this is the whole halo, so no dilation is too large for shared memory.
__host__ __device__ inline int tap_reach(int tile, int stride, int dilation) {
  const int span = (tile - 1) * stride + 1;
  return dilation < span ? dilation : span;
}
__host__ __device__ inline int halo_extent(int tile, int stride, int reach) { return (tile - 1) * stride + 2 * reach + 1; }
__device__ __forceinline__ int halo_input_offset(int r, int reach, int dilation) {
  return reach == dilation ? r : r + (r / reach) * (dilation - reach);
}
// A tiling's tile of output pixels and the input halo it stages (fields tile_*, reach_*, halo_*).
template <typename AnyTiling>
inline void set_tile_and_halo(AnyTiling* t, int tile_h, int tile_w, int stride, int dilation) {
  t->tile_h = tile_h;
  t->tile_w = tile_w;
  t->reach_h = tap_reach(tile_h, stride, dilation);
  t->reach_w = tap_reach(tile_w, stride, dilation);
  t->halo_h = halo_extent(tile_h, stride, t->reach_h);
  t->halo_w = halo_extent(tile_w, stride, t->reach_w);
}

// The A row a lane names to ldmatrix for one tap: its address at K step 0, and how far it moves
// per K column (0: an all-zero row, read at its start at every step, named by a pixel the tap does
// not reach).
struct FragmentRow {
  const uint16_t* start;
  int k_step;
};

// One staged chunk of a packed tensor-core tile: each warp owns 16 rows and NTiles 8-wide n-tiles.
// For every tap and 16-wide K step, one A fragment (from a_row_of(tap)) feeds each n-tile whose K
// range [k_begin, k_end) it overlaps; B comes from w_tile[tap][8 NTiles][row], which must be zero
// outside each column's group and past the chunk, and A must be finite (chunks holding Inf or NaN
// take the exact per-group sums instead: Inf * 0 would leak into other groups). With
// skip_unreached_taps (uniform over the warp), a tap that reaches none of the warp's rows (every lane
// names an all-zero row) is skipped, at the cost of a warp vote per tap: for strided dgrad, where
// most taps reach no pixel of a phase.
template <typename T, int NTiles, typename RowOf>
__device__ __forceinline__ void mma_chunk(float (&acc)[NTiles][4], const int (&k_begin)[NTiles],
                                          const int (&k_end)[NTiles], int k0, int count, const uint16_t* w_tile,
                                          int row, int lane, bool skip_unreached_taps, RowOf a_row_of) {
  int lo[NTiles], hi[NTiles];  // each n-tile's K range within this chunk
#pragma unroll
  for (int j = 0; j < NTiles; ++j) {
    lo[j] = (k_begin[j] > k0 ? k_begin[j] : k0) - k0;
    hi[j] = (k_end[j] < k0 + count ? k_end[j] : k0 + count) - k0;
  }
  const int b_row = lane % 8, b_column = 8 * ((lane / 8) % 2);  // ldmatrix.x2 of an n-tile's B
  for (int tap = 0; tap < 9; ++tap) {
    const FragmentRow a_row = a_row_of(tap);
    if (skip_unreached_taps && !__any_sync(0xffffffffu, a_row.k_step != 0)) continue;
    for (int kr = 0; kr < count; kr += kMmaK) {
      uint32_t a[4];
      ldmatrix(a, a_row.start + kr * a_row.k_step);
#pragma unroll
      for (int j = 0; j < NTiles; ++j) {
        if (kr >= hi[j] || kr + kMmaK <= lo[j]) continue;
        uint32_t b[2];
        ldmatrix(b, w_tile + (tap * 8 * NTiles + 8 * j + b_row) * row + kr + b_column);
        mma_m16n8k16<T>(acc[j], a, b);
      }
    }
  }
}

// acc[j][i] += exact(channel, r) for each of the lane's accumulators (channel 8j + 2t + i % 2 of
// the tile, fragment row r = i / 2), in a rolled loop: one copy of this rare path's code.
template <int NTiles, typename Exact>
__device__ __forceinline__ void add_exact_sums(float (&acc)[NTiles][4], int t, Exact exact) {
#pragma unroll 1
  for (int e = 0; e < NTiles * 4; ++e) {
    const int i = e % 4;
    const float sum = exact(8 * (e / 4) + 2 * t + i % 2, i / 2);
#pragma unroll
    for (int j = 0; j < NTiles; ++j)
      for (int i2 = 0; i2 < 4; ++i2)
        if (4 * j + i2 == e) acc[j][i2] += sum;
  }
}

// Epilogues of the tensor-core kernels with channels-last outputs: a tile's values go to shared
// memory as floats, [pixels][Channels + 8] (the padding puts a warp's 8-byte channel-pair writes on
// distinct banks), then out 8 channels per 16-byte store.
template <int Channels>
struct StagedTile {
  static constexpr int kRow = Channels + 8;
  float* stage;
  // Channels c, c + 1 of pixel q (values already rounded to the output type).
  __device__ __forceinline__ void put(int q, int c, float v0, float v1) const {
    *reinterpret_cast<float2*>(stage + q * kRow + c) = {v0, v1};
  }
  // After a barrier: pixel q's channels go to address_of(q) (its first channel; 16-byte aligned,
  // the channels contiguous), or nowhere when that is null.
  template <typename T, typename AddressOf>
  __device__ __forceinline__ void store(int pixels, int threads, AddressOf address_of) const {
    for (int i = int(threadIdx.x); i < pixels * (Channels / 8); i += threads) {
      const int q = i / (Channels / 8), c = i % (Channels / 8) * 8;
      T* at = address_of(q);
      if (at == nullptr) continue;
      const float* from = stage + q * kRow + c;
      uint32_t words[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const T pair[2] = {Numeric<T>::store(from[2 * e]), Numeric<T>::store(from[2 * e + 1])};
        memcpy(&words[e], pair, 4);
      }
      *reinterpret_cast<uint4*>(at + c) = {words[0], words[1], words[2], words[3]};
    }
  }
};

}  // namespace resnext_kernels
