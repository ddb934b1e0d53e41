// The CUDA compatibility layer of the host test build: the project's microscope.
//
// It lets the kernel sources under csrc/kernels/ compile with the host C++ compiler and run on CPU
// memory, so that every CI run (no GPU) executes the kernels' real logic: indexing, tiling, masks,
// barriers, warp exchanges and tensor-core fragment layouts. It is a test instrument: slow, serial,
// never used by the nvcc build and never offered to users as a CPU backend.
//
// Model:
//  * Blocks run one after another. A block's threads are cooperative fibers (ucontext) on one OS
//    thread; a fiber runs until it waits at a barrier or returns, then the next one runs. Three
//    schedules, chosen by RESNEXT_KERNELS_EMULATE_SCHEDULE:
//      lockstep (default): passes over all threads in ascending order, each resumed once per pass,
//        so warps advance together, one warp-level operation (MMA, shuffle) per pass;
//      warp-serial: blocks in descending order; within a block always the highest-numbered thread
//        that can run, and a thread releasing a barrier yields too: each warp runs alone until all
//        its lanes wait at __syncthreads() (or have returned), the last warp first after every
//        barrier, lanes last first;
//      warp-serial-ascending: the same with blocks, warps and lanes first first.
//    A kernel whose results differ between them has a race: a warp reading shared memory another
//    writes, or overwriting what another still reads, with no __syncthreads() between them (lockstep
//    hides such races between warps that run the same sequence of warp-level operations, and each
//    serial order those where the warp it runs first is the writer), or a block writing outside its
//    own part of the output (which a later block would otherwise overwrite).
//  * __syncthreads() is a barrier over the block's live threads; warp operations (__syncwarp,
//    shuffles, votes, MMA) are barriers over the warp's live lanes with an exchange slot per lane.
//    As on the GPU, every lane named in a full mask must take part: a warp operation that meets a
//    lane which has returned, or lanes at different warp operations, is an error.
//  * __shared__ variables become function-level statics: one copy, reused by every block in turn
//    (the GPU gives no initial values either). Dynamic shared memory is a per-launch buffer filled
//    with a poison pattern before every block, so that a read of shared memory the block never
//    wrote shows up as NaN.
//  * Atomics are plain read-modify-writes: only one fiber runs at any instant.
//  * __half and __nv_bfloat16 are 16-bit structs converting with round-to-nearest-even, as the
//    __float2half_rn / __float2bfloat16_rn intrinsics do.
//  * cp.async: a copy fills its 16 destination bytes with the poison pattern when it is issued and
//    lands (the source read then) when the issuing thread waits for its group, or returns. A read
//    of the destination before that wait, or a copy issued into a buffer other warps still read,
//    shows up as NaN: the hardware gives no ordering in between either. Writing bytes a copy still
//    in flight targets is an error (which lands last is undefined): a store, found when the copy
//    lands, or a copy of the same thread, found when it is issued.
//  * mma.sync.m16n8k16 is computed from the fragments the 32 lanes hold, using the PTX ISA's
//    fragment layouts, so a layout mistake in a kernel gives wrong numbers here as on the GPU.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)
#define __restrict__ __restrict

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};

// ---- 16-bit floating point types -----------------------------------------------------------------

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline uint32_t rk_float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float rk_bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline __half __ushort_as_half(unsigned short bits) { return {bits}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) { return {bits}; }

inline float __bfloat162float(__nv_bfloat16 h) { return rk_bits_float(uint32_t(h.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u = rk_float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                             // nearest, ties to even
  return {uint16_t(u >> 16)};
}

inline float __half2float(__half h) {
  uint32_t sign = uint32_t(h.bits & 0x8000u) << 16, exponent = (h.bits >> 10) & 0x1fu, mantissa = h.bits & 0x3ffu;
  if (exponent == 0x1f) return rk_bits_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    float magnitude = std::ldexp(float(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  return rk_bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}
inline __half __float2half_rn(float f) {
  uint32_t u = rk_float_bits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  float a = std::fabs(f);
  if (std::isnan(f)) return {uint16_t(sign | 0x7e00u)};
  if (a >= 65520.0f) return {uint16_t(sign | 0x7c00u)};  // rounds to infinity
  if (a < std::ldexp(1.0f, -14)) {                       // subnormal range: multiples of 2^-24
    float scaled = std::nearbyint(std::ldexp(a, 24));     // default rounding mode: ties to even
    return {uint16_t(sign | uint16_t(scaled))};
  }
  uint32_t au = rk_float_bits(a);
  au += 0xfffu + ((au >> 13) & 1u);  // round the 13 dropped bits to nearest even
  return {uint16_t(sign | uint16_t(((au >> 23) - 112) << 10 | ((au >> 13) & 0x3ffu)))};
}

// ---- the fiber scheduler ----------------------------------------------------------------------------

namespace emu {

constexpr size_t kFiberStack = 128 * 1024;
constexpr int kExchangeBytes = 32;

struct Barrier {
  int arrived = 0;
  int live = 0;
  uint64_t generation = 0;
  int vote = 0, vote_result = 0;  // for __syncthreads_or: the OR of this round's predicates
  void release_if_complete() {
    if (arrived > 0 && arrived >= live) {
      arrived = 0;
      vote_result = vote;
      vote = 0;
      ++generation;
    }
  }
};

// A 16-byte cp.async: 16 bytes from `from`, or zeros when from is null.
struct AsyncCopy {
  void* to;
  const void* from;
};

struct Fiber {
  ucontext_t context;
  dim3 thread;
  int linear = 0;
  bool done = false;
  const Barrier* waiting_on = nullptr;  // skipped by the scheduler until this barrier releases
  uint64_t waiting_generation = 0;
  std::vector<AsyncCopy> uncommitted;         // cp.async issued since the last commit
  std::deque<std::vector<AsyncCopy>> groups;  // committed groups in flight, oldest first
  const char* warp_operation = "";            // the warp-wide operation this lane last joined
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = -1;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<unsigned char> exchange;  // kExchangeBytes per thread, for warp operations
  const std::function<void()>* body = nullptr;
  std::string error;
  bool yield_on_release = false;  // warp-serial*: the thread completing a barrier returns to the scheduler
};

inline Block* running_block = nullptr;
inline std::vector<unsigned char> dynamic_shared_memory;
inline std::vector<std::unique_ptr<char[]>> fiber_stacks;  // reused by every block and launch

inline Fiber& current_fiber() { return running_block->fibers[running_block->current]; }
inline int lane_id() { return current_fiber().linear % 32; }
inline int warp_id() { return current_fiber().linear / 32; }

inline void wait(Barrier& barrier) {
  Fiber& fiber = current_fiber();
  fiber.waiting_on = &barrier;
  fiber.waiting_generation = barrier.generation;
  ++barrier.arrived;
  barrier.release_if_complete();
  if (barrier.generation == fiber.waiting_generation || running_block->yield_on_release)
    swapcontext(&fiber.context, &running_block->scheduler);
  fiber.waiting_on = nullptr;
}

inline void land(const std::vector<AsyncCopy>& copies) {
  for (const AsyncCopy& copy : copies) {
    // Still the poison written at issue: nobody stored there in between (whose store or copy would
    // land last is undefined on the GPU).
    const auto* bytes = static_cast<const unsigned char*>(copy.to);
    if (std::any_of(bytes, bytes + 16, [](unsigned char b) { return b != 0xff; }))
      throw std::runtime_error("cp.async: destination written while its copy was in flight");
    if (copy.from) std::memcpy(copy.to, copy.from, 16); else std::memset(copy.to, 0, 16);
  }
}

inline void fiber_main() {
  Block& block = *running_block;
  Fiber& fiber = current_fiber();
  try {
    (*block.body)();
    // A returning thread's copies still land.
    for (const auto& group : fiber.groups) land(group);
    land(fiber.uncommitted);
  } catch (const std::exception& e) {
    if (block.error.empty()) block.error = e.what();
  }
  fiber.done = true;
  // uc_link returns to the scheduler.
}

}  // namespace emu

// Plain globals: only one fiber runs at a time, and the scheduler sets them before resuming it.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

enum class Schedule { kLockstep, kWarpSerial, kWarpSerialAscending };  // see the top of this file

inline Schedule schedule_from_environment() {
  const char* schedule = std::getenv("RESNEXT_KERNELS_EMULATE_SCHEDULE");
  if (!schedule || !std::strcmp(schedule, "lockstep")) return Schedule::kLockstep;
  if (!std::strcmp(schedule, "warp-serial")) return Schedule::kWarpSerial;
  if (!std::strcmp(schedule, "warp-serial-ascending")) return Schedule::kWarpSerialAscending;
  throw std::runtime_error("RESNEXT_KERNELS_EMULATE_SCHEDULE must be lockstep, warp-serial or warp-serial-ascending");
}

inline void run_block(Block& block, int threads, dim3 block_dim, Schedule schedule) {
  for (int t = 0; t < threads; ++t) {
    Fiber& fiber = block.fibers[t];
    fiber.linear = t;
    fiber.thread = dim3(t % block_dim.x, (t / block_dim.x) % block_dim.y, t / (block_dim.x * block_dim.y));
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = fiber_stacks[t].get();
    fiber.context.uc_stack.ss_size = kFiberStack;
    fiber.context.uc_link = &block.scheduler;
    makecontext(&fiber.context, fiber_main, 0);
  }
  int live = threads;
  const auto runnable = [&](int t) {
    const Fiber& fiber = block.fibers[t];
    return !fiber.done && !(fiber.waiting_on && fiber.waiting_on->generation == fiber.waiting_generation);
  };
  const auto resume = [&](int t) {
    Fiber& fiber = block.fibers[t];
    block.current = t;
    threadIdx = fiber.thread;
    swapcontext(&block.scheduler, &fiber.context);
    // The first error ends the block: its other threads would go on with a lane missing from
    // their warp operations.
    if (!block.error.empty()) throw std::runtime_error("emulated kernel: " + block.error);
    if (fiber.done) {
      // A returned thread no longer takes part in barriers.
      --live;
      --block.block_barrier.live;
      block.block_barrier.release_if_complete();
      --block.warp_barriers[t / 32].live;
      block.warp_barriers[t / 32].release_if_complete();
    }
  };
  const auto deadlock = [] {
    return std::runtime_error("emulated kernel: deadlock (a barrier that some threads never reach)");
  };
  block.yield_on_release = schedule != Schedule::kLockstep;
  while (live > 0) {
    if (schedule != Schedule::kLockstep) {  // warp-serial: the first thread that can run, in its order
      int i = 0;
      const auto thread_at = [&](int k) { return schedule == Schedule::kWarpSerial ? threads - 1 - k : k; };
      while (i < threads && !runnable(thread_at(i))) ++i;
      if (i == threads) throw deadlock();
      resume(thread_at(i));
      continue;
    }
    bool resumed = false;  // lockstep: one pass, every thread that can run once
    for (int t = 0; t < threads; ++t)
      if (runnable(t)) resumed = true, resume(t);
    if (!resumed) throw deadlock();
  }
}

// Runs body() as a CUDA grid: every block in turn, each with its threads as fibers.
inline void launch(dim3 grid, dim3 block_dim, size_t dynamic_shared_bytes, const std::function<void()>& body) {
  const int threads = int(block_dim.x * block_dim.y * block_dim.z);
  if (threads < 1 || threads > 1024) throw std::runtime_error("emulated launch: invalid block size");
  if (grid.x < 1 || grid.x > 0x7fffffffu || grid.y < 1 || grid.y > 65535 || grid.z < 1 || grid.z > 65535)
    throw std::runtime_error("emulated launch: grid outside CUDA's limits");
  // 48 KB: the most a launch gets without cudaFuncSetAttribute, which the kernels never call.
  if (dynamic_shared_bytes > 48 * 1024) throw std::runtime_error("emulated launch: more than 48 KB of dynamic shared memory");
  const Schedule schedule = schedule_from_environment();
  gridDim = grid;
  blockDim = block_dim;
  // All-ones bits: NaN in every float type. Exactly the launch's bytes in a fresh allocation, so that
  // the AddressSanitizer build catches any access past their end, not only ldmatrix's and cp.async's.
  std::vector<unsigned char>(dynamic_shared_bytes, 0xff).swap(dynamic_shared_memory);
  while (int(fiber_stacks.size()) < threads) fiber_stacks.emplace_back(new char[kFiberStack]);
  const auto order = [&](unsigned i, unsigned n) { return schedule == Schedule::kWarpSerial ? n - 1 - i : i; };
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(order(bx, grid.x), order(by, grid.y), order(bz, grid.z));
        // Fresh poison per block: a block must not read what an earlier block left in shared memory.
        std::fill(dynamic_shared_memory.begin(), dynamic_shared_memory.end(), 0xff);
        Block block;
        block.body = &body;
        block.fibers.resize(threads);
        block.exchange.assign(size_t(threads) * kExchangeBytes, 0);
        block.block_barrier.live = threads;
        block.warp_barriers.resize((threads + 31) / 32);
        for (int t = 0; t < threads; ++t) block.warp_barriers[t / 32].live++;
        running_block = &block;
        try {
          run_block(block, threads, block_dim, schedule);
        } catch (...) {
          running_block = nullptr;
          throw;
        }
        running_block = nullptr;
      }
}

}  // namespace emu

#define RK_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  ::emu::launch((grid), (block), (shared_bytes), [&]() { kernel(__VA_ARGS__); })
#define RK_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::emu::dynamic_shared_memory.data())
#define RK_LAUNCH_ERROR() static_cast<const char*>(nullptr)

// ---- device intrinsics ------------------------------------------------------------------------------

inline void __syncthreads() { emu::wait(emu::running_block->block_barrier); }
inline int __syncthreads_or(int predicate) {
  emu::Barrier& barrier = emu::running_block->block_barrier;
  barrier.vote |= predicate != 0;
  emu::wait(barrier);
  return barrier.vote_result;  // stable until this thread arrives at the next barrier
}
inline void __syncwarp(unsigned = 0xffffffffu) { emu::wait(emu::running_block->warp_barriers[emu::warp_id()]); }

template <typename T>
inline T atomicAdd(T* address, T value) {
  T old = *address;
  *address = old + value;
  return old;
}

namespace emu {
// The kernels' warp-wide operations (full-mask votes and shuffles, ldmatrix, mma.sync: all .aligned)
// need every lane of the warp at the same operation; the GPU leaves anything else undefined (a hang,
// or values from another operation). Here it is an error: called by every lane after publishing its
// part, as the operation's first warp barrier.
inline void join_warp_operation(const char* operation) {
  current_fiber().warp_operation = operation;
  __syncwarp();
  const Block& block = *running_block;
  const int base = warp_id() * 32;
  for (int l = base; l < base + 32 && l < int(block.fibers.size()); ++l) {
    const Fiber& lane = block.fibers[l];
    if (lane.done)
      throw std::runtime_error(std::string(operation) + ": lane " + std::to_string(l - base) +
                               " of the warp has returned; a warp-wide operation needs every lane");
    if (std::strcmp(lane.warp_operation, operation) != 0)
      throw std::runtime_error(std::string("lanes of one warp at different warp-wide operations: ") + operation +
                               " and " + lane.warp_operation);
  }
}

// Every lane publishes `value`, then receives every lane's (its own in place of lanes the block
// does not have).
template <typename T>
inline std::array<T, 32> warp_gather(T value, const char* operation) {
  static_assert(sizeof(T) <= kExchangeBytes, "value too large for the exchange slot");
  Block& block = *running_block;
  const int warp = warp_id();
  std::memcpy(&block.exchange[size_t(current_fiber().linear) * kExchangeBytes], &value, sizeof(T));
  join_warp_operation(operation);
  std::array<T, 32> values;
  for (int lane = 0; lane < 32; ++lane) {
    values[lane] = value;
    if (warp * 32 + lane < int(block.fibers.size()))
      std::memcpy(&values[lane], &block.exchange[size_t(warp * 32 + lane) * kExchangeBytes], sizeof(T));
  }
  __syncwarp();  // nobody overwrites a slot before every lane has read
  return values;
}

// Every lane publishes `value`, then reads the value of lane `source(lane)` of its warp.
template <typename T, typename Source>
inline T warp_exchange(T value, Source source, const char* operation) {
  const std::array<T, 32> values = warp_gather(value, operation);
  const int src = source(lane_id());
  return src >= 0 && src < 32 ? values[src] : value;
}
}  // namespace emu

inline int __any_sync(unsigned, int predicate) {
  const std::array<int, 32> votes = emu::warp_gather(int(predicate != 0), "__any_sync");
  return std::any_of(votes.begin(), votes.end(), [](int vote) { return vote != 0; });
}
template <typename T>
inline T __shfl_sync(unsigned, T value, int source, int width = 32) {
  return emu::warp_exchange(value, [&](int lane) { return (lane / width) * width + source % width; }, "__shfl_sync");
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T value, int mask, int width = 32) {
  return emu::warp_exchange(
      value, [&](int lane) { return (lane ^ mask) < ((lane / width) + 1) * width ? lane ^ mask : lane; },
      "__shfl_xor_sync");
}
template <typename T>
inline T __shfl_down_sync(unsigned, T value, unsigned delta, int width = 32) {
  return emu::warp_exchange(
      value,
      [&](int lane) {
        int src = lane + int(delta);
        return src / width == lane / width ? src : lane;
      },
      "__shfl_down_sync");
}

// ---- cp.async ----------------------------------------------------------------------------------------

namespace emu {
inline void copy_async_16(void* to, const void* from, bool valid) {
  const auto address = reinterpret_cast<uintptr_t>(to);
  const auto shared = reinterpret_cast<uintptr_t>(dynamic_shared_memory.data());
  if (address % 16 != 0 || (valid && reinterpret_cast<uintptr_t>(from) % 16 != 0))
    throw std::runtime_error("cp.async: address not 16-byte aligned");
  if (address < shared || address + 16 > shared + dynamic_shared_memory.size())
    throw std::runtime_error("cp.async: destination outside the block's dynamic shared memory");
  Fiber& fiber = current_fiber();
  const auto overlaps = [&](const std::vector<AsyncCopy>& copies) {
    for (const AsyncCopy& copy : copies) {
      const auto other = reinterpret_cast<uintptr_t>(copy.to);
      if (other < address + 16 && address < other + 16) return true;
    }
    return false;
  };
  bool in_flight = overlaps(fiber.uncommitted);
  for (const auto& group : fiber.groups) in_flight = in_flight || overlaps(group);
  if (in_flight) throw std::runtime_error("cp.async: destination of a copy still in flight");
  std::memset(to, 0xff, 16);
  fiber.uncommitted.push_back({to, valid ? from : nullptr});
}
inline void copy_async_commit() {
  Fiber& fiber = current_fiber();
  fiber.groups.push_back(std::move(fiber.uncommitted));
  fiber.uncommitted.clear();
}
inline void copy_async_wait(int pending) {
  Fiber& fiber = current_fiber();
  while (int(fiber.groups.size()) > pending) {
    land(fiber.groups.front());
    fiber.groups.pop_front();
  }
}
}  // namespace emu

// ---- tensor-core MMA --------------------------------------------------------------------------------

namespace emu {
// D = A(16x16) * B(16x8) + C for one warp, with the m16n8k16 fragment layouts of the PTX ISA
// ("Matrix Fragments for mma.m16n8k16"): with g = lane / 4 and t = lane % 4,
//   A: a[r] holds the pair (row, col), (row, col + 1) with row = g + 8 * (r % 2),
//      col = 2 * t + 8 * (r / 2);
//   B: b[r] holds (k, n), (k + 1, n) with k = 2 * t + 8 * r, n = g;
//   C, D: c[i] is (row, col) with row = g + 8 * (i / 2), col = 2 * t + i % 2.
template <typename Half, float (*ToFloat)(Half)>
inline void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  struct Fragments {
    uint32_t a[4];
    uint32_t b[2];
  };
  Block& block = *running_block;
  Fragments mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  static_assert(sizeof(Fragments) <= kExchangeBytes, "fragments exceed the exchange slot");
  std::memcpy(&block.exchange[size_t(current_fiber().linear) * kExchangeBytes], &mine, sizeof mine);
  join_warp_operation("mma.sync");
  const int lane = lane_id(), base = warp_id() * 32;
  auto fragments_of = [&](int l) {
    Fragments f;
    std::memcpy(&f, &block.exchange[size_t(base + l) * kExchangeBytes], sizeof f);
    return f;
  };
  auto half_of = [](uint32_t reg, int which) {
    Half h;
    uint16_t bits = uint16_t(which ? reg >> 16 : reg & 0xffffu);
    std::memcpy(&h, &bits, 2);
    return ToFloat(h);
  };
  auto a_at = [&](int row, int col) {
    int owner = (row % 8) * 4 + (col % 8) / 2;
    int reg = (row / 8) + 2 * (col / 8);
    return half_of(fragments_of(owner).a[reg], col % 2);
  };
  auto b_at = [&](int k, int n) {
    int owner = n * 4 + (k % 8) / 2;
    return half_of(fragments_of(owner).b[k / 8], k % 2);
  };
  const int g = lane / 4, t = lane % 4;
  float result[4];
  for (int i = 0; i < 4; ++i) {
    int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    float sum = c[i];
    for (int k = 0; k < 16; ++k) sum += a_at(row, k) * b_at(k, col);
    result[i] = sum;
  }
  __syncwarp();
  for (int i = 0; i < 4; ++i) d[i] = result[i];
}
}  // namespace emu

namespace emu {
// ldmatrix.m8n8.xN[.trans].shared.b16: lanes 0 .. 8N-1 each name one 16-byte row in shared memory
// (checked: the GPU faults on anything else). Lane l then reads, of matrix m, the pair at columns
// 2 (l % 4), +1 of the row that lane 8m + l / 4 named; transposed, the value at column l / 4 of the
// rows lanes 8m + 2 (l % 4) and 8m + 2 (l % 4) + 1 named.
template <int N, bool Trans>
inline void ldmatrix(uint32_t (&r)[N], const uint16_t* row) {
  const int lane = lane_id();
  if (lane < 8 * N) {
    const auto address = reinterpret_cast<uintptr_t>(row);
    const auto shared = reinterpret_cast<uintptr_t>(dynamic_shared_memory.data());
    if (address % 16 != 0) throw std::runtime_error("ldmatrix: row address not 16-byte aligned");
    if (address < shared || address + 16 > shared + dynamic_shared_memory.size())
      throw std::runtime_error("ldmatrix: row outside the block's dynamic shared memory");
  }
  for (int m = 0; m < N; ++m) {
    if (!Trans) {
      const uint16_t* source = warp_exchange(row, [m](int l) { return 8 * m + l / 4; }, "ldmatrix");
      std::memcpy(&r[m], source + 2 * (lane % 4), 4);
    } else {
      const uint16_t* first = warp_exchange(row, [m](int l) { return 8 * m + 2 * (l % 4); }, "ldmatrix.trans");
      const uint16_t* second = warp_exchange(row, [m](int l) { return 8 * m + 2 * (l % 4) + 1; }, "ldmatrix.trans");
      r[m] = uint32_t(first[lane / 4]) | uint32_t(second[lane / 4]) << 16;
    }
  }
}
}  // namespace emu
