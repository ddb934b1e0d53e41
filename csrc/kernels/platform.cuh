// The few things the kernels need that differ between nvcc and the host test build.
#pragma once

#ifdef RESNEXT_KERNELS_EMULATE
#include "../emulate/cuda_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define RK_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  kernel<<<(grid), (block), (shared_bytes), (stream)>>>(__VA_ARGS__)
#define RK_DYNAMIC_SHARED(type, name)                             \
  extern __shared__ __align__(16) unsigned char rk_shared_raw[]; \
  type* name = reinterpret_cast<type*>(rk_shared_raw)
#define RK_LAUNCH_ERROR()                                                     \
  ([]() -> const char* {                                                      \
    cudaError_t error = cudaGetLastError();                                   \
    return error == cudaSuccess ? nullptr : cudaGetErrorString(error);        \
  }())
#endif

namespace resnext_kernels {

// Storage type T, and the type its arithmetic accumulates in.
template <typename T>
struct Numeric {
  using Acc = float;
  __device__ __forceinline__ static float load(T v) { return float(v); }
  __device__ __forceinline__ static T store(float v) { return T(v); }
};
template <>
struct Numeric<double> {
  using Acc = double;
  __device__ __forceinline__ static double load(double v) { return v; }
  __device__ __forceinline__ static double store(double v) { return v; }
};
// The 16-bit types also convert from raw bits, and say which bits mark Inf and NaN.
template <>
struct Numeric<__half> {
  using Acc = float;
  static constexpr uint16_t kNonFinite = 0x7c00;  // (bits & 0x7fff) >= this: Inf or NaN
  __device__ __forceinline__ static float load(__half v) { return __half2float(v); }
  __device__ __forceinline__ static float from_bits(uint16_t b) { return __half2float(__ushort_as_half(b)); }
  __device__ __forceinline__ static __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Numeric<__nv_bfloat16> {
  using Acc = float;
  static constexpr uint16_t kNonFinite = 0x7f80;
  __device__ __forceinline__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static float from_bits(uint16_t b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
  __device__ __forceinline__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// Division by a runtime divisor d >= 1 of dividends 0 <= a < 2^20 without the integer division
// sequence (~20 instructions): (a + 0.5) / d lies at least 0.5 / d from an integer, far more than
// float's rounding error at that size.
struct SmallDivisor {
  int d;
  float inverse;
  __host__ __device__ explicit SmallDivisor(int divisor) : d(divisor), inverse(1.0f / float(divisor)) {}
  __device__ __forceinline__ int quotient(int a) const { return int((float(a) + 0.5f) * inverse); }
};

// Whether either 16-bit value packed in `word` is Inf or NaN (T: __half or __nv_bfloat16).
template <typename T>
__device__ __forceinline__ int has_non_finite(uint32_t word) {
  return (word & 0x7fffu) >= Numeric<T>::kNonFinite || ((word >> 16) & 0x7fffu) >= Numeric<T>::kNonFinite;
}

// ReLU that keeps NaN, as torch.relu does (fmaxf(NaN, 0) would give 0).
template <typename Acc>
__device__ __forceinline__ Acc relu(Acc v) {
  return v < Acc(0) ? Acc(0) : v;
}

// (count, mean, M2) of a set of values merged with another set's: Chan et al.'s parallel formula
// for the variance. Deterministic as long as the merge order is fixed.
template <typename Acc>
__device__ __forceinline__ void merge_moments(Acc& count, Acc& mean, Acc& m2, Acc count_b, Acc mean_b, Acc m2_b) {
  if (count_b == Acc(0)) return;
  if (count == Acc(0)) {
    count = count_b, mean = mean_b, m2 = m2_b;
    return;
  }
  const Acc total = count + count_b, delta = mean_b - mean;
  mean += delta * (count_b / total);
  m2 += m2_b + delta * delta * (count * count_b / total);
  count = total;
}

}  // namespace resnext_kernels

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

// ldmatrix.sync.aligned.m8n8.xN.shared.b16: N 8x8 matrices of 16-bit values from shared memory, one
// register each. Lane l gives the address of row l % 8 of matrix l / 8 (16 contiguous, 16-byte
// aligned bytes); lane l receives, of every matrix, the pair in row l / 4 at columns 2 * (l % 4) and
// 2 * (l % 4) + 1: exactly the A/B fragment registers of mma.m16n8k16. Call from the whole warp.
// ldmatrix_trans (.trans): the same rows, each matrix transposed: lane l receives the pair in
// column l / 4 at rows 2 * (l % 4) and 2 * (l % 4) + 1 (the B fragment of a k-major tile).
template <int N>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[N], const uint16_t* row);
template <int N>
__device__ __forceinline__ void ldmatrix_trans(uint32_t (&r)[N], const uint16_t* row);

#ifdef RESNEXT_KERNELS_EMULATE
template <int N>
inline void ldmatrix(uint32_t (&r)[N], const uint16_t* row) {
  emu::ldmatrix<N, false>(r, row);
}
template <int N>
inline void ldmatrix_trans(uint32_t (&r)[N], const uint16_t* row) {
  emu::ldmatrix<N, true>(r, row);
}
#else
template <>
__device__ __forceinline__ void ldmatrix_trans<2>(uint32_t (&r)[2], const uint16_t* row) {
  const unsigned address = unsigned(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(address));
}
template <>
__device__ __forceinline__ void ldmatrix<2>(uint32_t (&r)[2], const uint16_t* row) {
  const unsigned address = unsigned(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(address));
}
template <>
__device__ __forceinline__ void ldmatrix<4>(uint32_t (&r)[4], const uint16_t* row) {
  const unsigned address = unsigned(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}
#endif

// K of one mma.m16n8k16 step.
constexpr int kMmaK = 16;
constexpr int kMaxTilesPerBlock = 8;

// Values per staged shared row of the tensor-core kernels: `chunk` channels in whole 16-byte
// vectors and at least kMmaK zero columns beyond, so a 16-wide K step that starts inside the chunk
// stays in its row; and row % 16 == 8, so the eight 16-byte rows one ldmatrix reads from
// consecutive positions (stride 1; stride 2 leaves 2-way conflicts) hit distinct banks.
__host__ __device__ inline int mma_row(int chunk) {
  const int vectors = (chunk + 7) / 8 * 8;
  return vectors + (vectors % 16 ? kMmaK : kMmaK + 8);
}

// How many tiles (of `work` tiles x channel tiles) a persistent tensor-core block computes in turn:
// enough blocks remain for about four waves of four blocks per multiprocessor. The host test build
// (sm_count 0) takes the most, so its tests run the multi-tile path.
inline int tiles_per_block(int64_t work, int sm_count) {
  const int64_t per_block = sm_count > 0 ? work / (int64_t(sm_count) * 16) : kMaxTilesPerBlock;
  return int(per_block < 1 ? 1 : per_block > kMaxTilesPerBlock ? kMaxTilesPerBlock : per_block);
}

// d += a * b for one warp: mma.m16n8k16, 16-bit A (row-major) and B (column-major), fp32 C/D, with
// the fragment layouts of the PTX ISA (the host test build computes from the same layouts).
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2]);

#ifdef RESNEXT_KERNELS_EMULATE
template <>
inline void mma_m16n8k16<__half>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  emu::mma_m16n8k16<__half, __half2float>(d, a, b, d);
}
template <>
inline void mma_m16n8k16<__nv_bfloat16>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  emu::mma_m16n8k16<__nv_bfloat16, __bfloat162float>(d, a, b, d);
}
#else
#define RK_MMA_16816(type)                                                                              \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." type "." type ".f32 {%0, %1, %2, %3}, "        \
               "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"                                        \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                         \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  RK_MMA_16816("f16");
}
template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  RK_MMA_16816("bf16");
}
#undef RK_MMA_16816
#endif

// The A row a lane names to ldmatrix for one tap: its address at K step 0, and how far it moves
// per K column (0: a row read at its start at every step, such as an all-zero row).
struct FragmentRow {
  const uint16_t* start;
  int k_step;
};

// One staged chunk of a packed tensor-core tile: each warp owns 16 rows and NTiles 8-wide n-tiles.
// For every tap and 16-wide K step, one A fragment (from a_row_of(tap)) feeds each n-tile whose K
// range [k_begin, k_end) it overlaps; B comes from w_tile[tap][8 NTiles][row], which must be zero
// outside each column's group and past the chunk, and A must be finite (chunks holding Inf or NaN
// take the exact per-group sums instead: Inf * 0 would leak into other groups).
template <typename T, int NTiles, typename RowOf>
__device__ __forceinline__ void mma_chunk(float (&acc)[NTiles][4], const int (&k_begin)[NTiles],
                                          const int (&k_end)[NTiles], int k0, int count, const uint16_t* w_tile,
                                          int row, int lane, RowOf a_row_of) {
  int lo[NTiles], hi[NTiles];  // each n-tile's K range within this chunk
#pragma unroll
  for (int j = 0; j < NTiles; ++j) {
    lo[j] = (k_begin[j] > k0 ? k_begin[j] : k0) - k0;
    hi[j] = (k_end[j] < k0 + count ? k_end[j] : k0 + count) - k0;
  }
  const int b_row = lane % 8, b_column = 8 * ((lane / 8) % 2);  // ldmatrix.x2 of an n-tile's B
  for (int tap = 0; tap < 9; ++tap) {
    const FragmentRow a_row = a_row_of(tap);
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

// Whether a 16-bit output with these strides takes 16-byte stores of 8 channels.
__host__ __device__ inline bool vector_store_layout(const int64_t (&stride)[4], const void* base) {
  return stride[1] == 1 && (stride[0] % 8 | stride[2] % 8 | stride[3] % 8) == 0 &&
         reinterpret_cast<uintptr_t>(base) % 16 == 0;
}

}  // namespace resnext_kernels
