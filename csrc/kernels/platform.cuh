// What every kernel shares: the things that differ between nvcc and the host test build (launches,
// shared memory, the 16-bit types, ldmatrix, cp.async, mma.sync) and a few numeric helpers.
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

// v rounded to T and back: the y an unfused convolution stores. The inference epilogue normalises
// this y, as the reference does and as backward's ReLU mask (recomputed from the stored y) assumes.
template <typename T>
__device__ __forceinline__ typename Numeric<T>::Acc rounded(typename Numeric<T>::Acc v) {
  return Numeric<T>::load(Numeric<T>::store(v));
}

// Where weight[oc][k][tap / 3][tap % 3] (k: an input channel's index within oc's group) lies, for the
// weight's strides (elements).
__device__ __forceinline__ int64_t weight_offset(const int64_t* stride, int oc, int k, int tap) {
  return oc * stride[0] + k * stride[1] + (tap / 3) * stride[2] + (tap % 3) * stride[3];
}

// The weight joining output channel oc and input channel ic at `tap`, or zero where they lie in
// different groups (the off-group entries of a tile spanning several groups).
template <typename T>
__device__ __forceinline__ typename Numeric<T>::Acc grouped_weight(const T* weight, const int64_t* stride, int oc,
                                                                   int ic, int cin_pg, int cout_pg, int tap) {
  const int group_begin = (oc / cout_pg) * cin_pg;
  if (ic < group_begin || ic >= group_begin + cin_pg) return 0;
  return Numeric<T>::load(weight[weight_offset(stride, oc, ic - group_begin, tap)]);
}

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

// How many blocks of `kernel` (`threads` threads, `shared_bytes` of dynamic shared memory) the
// device holds at once: sm_count times what one multiprocessor holds. In the host test build,
// RESNEXT_KERNELS_EMULATE_SLOTS (default 0: none known, so persistent blocks take the most tiles; a
// large value gives one tile per block, as small test shapes get on a GPU).
template <typename Kernel>
inline int64_t resident_blocks(Kernel kernel, int threads, size_t shared_bytes, int sm_count) {
#ifdef RESNEXT_KERNELS_EMULATE
  (void)kernel, (void)threads, (void)shared_bytes, (void)sm_count;
  const char* slots = std::getenv("RESNEXT_KERNELS_EMULATE_SLOTS");
  return slots ? std::atoll(slots) : 0;
#else
  int per_multiprocessor = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_multiprocessor, kernel, threads, shared_bytes) != cudaSuccess) {
    (void)cudaGetLastError();  // cleared, so that the launch check reports the launch's own error
    per_multiprocessor = 1;
  }
  return int64_t(sm_count) * per_multiprocessor;
#endif
}

// Whether a grid of x * y * z blocks is within CUDA's limits (x < 2^31, y and z < 2^16): dim3's
// unsigned fields would silently truncate larger counts.
inline bool grid_fits(int64_t x, int64_t y = 1, int64_t z = 1) {
  return x >= 1 && x < (int64_t(1) << 31) && y >= 1 && y < 65536 && z >= 1 && z < 65536;
}
constexpr const char* kGridTooLarge = "tensor too large: its tiles exceed the blocks one launch can have";

// ReLU that keeps NaN, as torch.relu does (fmaxf(NaN, 0) would give 0).
template <typename Acc>
__device__ __forceinline__ Acc relu(Acc v) {
  return v < Acc(0) ? Acc(0) : v;
}

// v * scale + shift in one rounding. Spelled out, so that every kernel that computes or re-tests the
// BatchNorm's output (forward epilogues, pass 2, the backward's ReLU mask) rounds it alike whatever
// the compiler contracts, and the host test build rounds it as the GPU does.
__device__ __forceinline__ float affine(float v, float scale, float shift) { return fmaf(v, scale, shift); }
__device__ __forceinline__ double affine(double v, double scale, double shift) { return fma(v, scale, shift); }

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

// cp.async.cg.shared.global, 16 bytes: copies `from` (global) to `to` (shared) without passing
// through registers, or writes 16 zero bytes and reads nothing when `valid` is false. The copies a
// thread issued since its last copy_async_commit() form one group; copy_async_wait<N>() returns
// once at most the N groups it committed last are still in flight. Until then the destination's
// contents are undefined; other threads may read it after a barrier that follows the wait.
__device__ __forceinline__ void copy_async_16(void* to, const void* from, bool valid);
__device__ __forceinline__ void copy_async_commit();
template <int N>
__device__ __forceinline__ void copy_async_wait();

#ifdef RESNEXT_KERNELS_EMULATE
inline void copy_async_16(void* to, const void* from, bool valid) { emu::copy_async_16(to, from, valid); }
inline void copy_async_commit() { emu::copy_async_commit(); }
template <int N>
inline void copy_async_wait() {
  emu::copy_async_wait(N);
}
#else
__device__ __forceinline__ void copy_async_16(void* to, const void* from, bool valid) {
  const unsigned address = unsigned(__cvta_generic_to_shared(to));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(from), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif

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

// Whether a 16-bit tensor with these strides and data is read or written 8 channels at a time by
// 16-byte accesses: unit channel stride and 16-byte aligned pixels.
__host__ __device__ inline bool vector_layout(const int64_t (&stride)[4], const void* base) {
  return stride[1] == 1 && (stride[0] % 8 | stride[2] % 8 | stride[3] % 8) == 0 &&
         reinterpret_cast<uintptr_t>(base) % 16 == 0;
}

// Blocks of a grid-stride kernel over `count` items, `threads` per block: a thread per item, at most
// 65536 blocks.
inline unsigned grid_stride_blocks(int64_t count, int threads) {
  const int64_t blocks = (count + threads - 1) / threads;
  return unsigned(blocks < 65536 ? blocks : 65536);
}

// The stride, in 8-value vectors, of a grid-stride kernel over `numel` dense channels-last values
// whose threads each keep the same 8 of the c channels (c % 8 == 0) in registers: the threads of
// grid_stride_blocks rounded down to a multiple of c / 8. Launch it on (stride + threads - 1) / threads
// blocks.
inline int64_t channel_vector_stride(int64_t numel, int64_t c, int threads) {
  const int64_t vectors = numel / 8, most = int64_t(65536) * threads;
  return (vectors < most ? vectors : most) / (c / 8) * (c / 8);
}

}  // namespace resnext_kernels
