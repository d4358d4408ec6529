// CPU emulation of CUDA's execution model, enough to run csrc/cuda's kernel source unchanged.
//
// Model:
//  - A launch runs its blocks in parallel across OS threads (at::parallel_for). Blocks never
//    share anything, exactly as on a GPU.
//  - Inside a block every CUDA thread is a user-space fiber (ucontext) with its own stack. The
//    block's scheduler (one per OS thread) resumes the runnable fibers one after another; a fiber
//    runs until it reaches __syncthreads, a warp collective (__shfl_*_sync, __syncwarp) or its end.
//    So between two barriers each thread runs to completion before the next starts: any read of
//    another thread's shared-memory write that is not ordered by a barrier sees the old value.
//  - The order in which the fibers run between barriers is chosen per barrier phase:
//    "forward" (0..n-1), "reverse" (n-1..0) or "shuffle:<seed>" (a seeded permutation per phase
//    and block). A missing barrier therefore changes the result with the schedule.
//    Selected by REST_KERNELS_EMU_SCHEDULE or torch.ops.rest_kernels_emu_test.emu_set_schedule.
//  - Shared memory (REST_SHARED) is a per-block arena filled with 0xFF bytes (NaN in float,
//    half and bfloat16) at block start, so reading a slot nobody wrote shows up as NaN.
//  - Barrier divergence is an error, never a hang: when no fiber can run, either every live
//    thread of the block waits at the same __syncthreads (same source line), or every lane of a
//    warp waits at the same warp collective, or the launch fails with a message saying who waits
//    where (and which threads already exited).
// Include torch headers BEFORE this file: it defines threadIdx & co. as macros.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <source_location>
#include <string>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {

enum class Wait : uint8_t { Runnable, Block, Warp, Exited };

struct ThreadState;  // defined in cuda_emu.cpp
struct BlockState;

struct ThreadView {  // what device code reads through threadIdx / the lane id
  dim3 tid;
  int linear = 0;
};

extern thread_local ThreadView* g_thread;   // the running fiber
extern thread_local dim3 g_block_idx, g_block_dim, g_grid_dim;

// Barriers (called from a fiber). `line` identifies the call site for the divergence check.
void block_barrier(const std::source_location& loc);
void warp_barrier(const std::source_location& loc);
// Exchange slot of the calling lane for warp collectives (double-buffered: one barrier each).
uint64_t* warp_exchange(int& lane_out, uint64_t** read_bank);
void* shared_alloc(size_t bytes, size_t align);

void launch_impl(dim3 grid, dim3 block, const std::function<void()>& body);

// Scheduling policy (process-wide).
void set_schedule(const std::string& spec);
std::string get_schedule();
// mma.sync instructions executed so far (one per warp-wide instruction), process-wide: lets a test
// see which kernels ran on the tensor-core path (csrc/cuda/mma.cuh).
uint64_t mma_executed();
void note_mma();

struct Stream {};

}  // namespace emu

#define threadIdx (::emu::g_thread->tid)
#define blockIdx (::emu::g_block_idx)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define REST_SHARED(TYPE, NAME) \
  TYPE& NAME = *reinterpret_cast<TYPE*>(::emu::shared_alloc(sizeof(TYPE), alignof(TYPE)))

inline void __syncthreads(const std::source_location loc = std::source_location::current()) {
  ::emu::block_barrier(loc);
}
inline void __syncwarp(unsigned = 0xffffffffu, const std::source_location loc = std::source_location::current()) {
  ::emu::warp_barrier(loc);
}

namespace emu {
template <class T, class F>
inline T warp_collective(T v, F src_lane_of, const std::source_location& loc) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "warp collectives move at most 64 bits");
  int lane;
  uint64_t* bank;
  uint64_t* mine = warp_exchange(lane, &bank);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  *mine = bits;
  warp_barrier(loc);  // every lane has deposited its value
  int src = src_lane_of(lane);
  T r;
  std::memcpy(&r, &bank[src], sizeof(T));
  return r;
}
// Every lane's 64-bit value, in lane order (one warp collective: every lane of the warp must call).
inline void warp_gather(uint64_t v, uint64_t out[32], const std::source_location& loc) {
  int lane;
  uint64_t* bank;
  uint64_t* mine = warp_exchange(lane, &bank);
  *mine = v;
  warp_barrier(loc);  // every lane has deposited its value
  std::memcpy(out, bank, 32 * sizeof(uint64_t));
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 as a warp collective:
// D (16 x 8) = A (16 x 16) B (16 x 8) + C, fp32 accumulation, each lane holding the fragments the
// PTX ISA assigns to it ("Matrix fragments for mma.m16n8k16 with floating point type"; lane =
// 4 groupID + threadID_in_group):
//   A: 4 registers of two 16-bit values (a0..a7, the lower index in the low half);
//      a_i is at row groupID + 8 (i in {2,3,6,7}), column 2 threadID_in_group + (i & 1) + 8 (i >= 4)
//   B: 2 registers (b0..b3): row (k) 2 threadID_in_group + (i & 1) + 8 (i >= 2), column groupID
//   C, D: 4 floats (c0..c3): row groupID + 8 (i >= 2), column 2 threadID_in_group + (i & 1)
// The emulation gathers every lane's registers, rebuilds A, B and C from this table (written here
// independently of the kernels' own fragment loaders, csrc/cuda/mma.cuh, so a loader that puts a
// value in the wrong lane or slot gives a wrong product) and computes the calling lane's D.
// ELEM is c10::BFloat16 or c10::Half.
template <class ELEM>
inline void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4],
                         const std::source_location& loc) {
  auto elem = [](uint32_t reg, int half) {
    const uint16_t bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xFFFFu);
    return static_cast<float>(ELEM(bits, typename ELEM::from_bits_t{}));
  };
  uint64_t ga[2][32], gb[32], gc[2][32];
  warp_gather(a[0] | (uint64_t(a[1]) << 32), ga[0], loc);
  warp_gather(a[2] | (uint64_t(a[3]) << 32), ga[1], loc);
  warp_gather(b[0] | (uint64_t(b[1]) << 32), gb, loc);
  uint32_t c01[2], c23[2];
  std::memcpy(c01, c, 8);
  std::memcpy(c23, c + 2, 8);
  warp_gather(c01[0] | (uint64_t(c01[1]) << 32), gc[0], loc);
  warp_gather(c23[0] | (uint64_t(c23[1]) << 32), gc[1], loc);
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    const uint32_t ra[4] = {uint32_t(ga[0][l]), uint32_t(ga[0][l] >> 32), uint32_t(ga[1][l]), uint32_t(ga[1][l] >> 32)};
    for (int i = 0; i < 8; ++i)
      A[g + 8 * ((i >> 1) & 1)][2 * t + (i & 1) + 8 * (i >= 4)] = elem(ra[i >> 1], i & 1);
    const uint32_t rb[2] = {uint32_t(gb[l]), uint32_t(gb[l] >> 32)};
    for (int i = 0; i < 4; ++i) B[2 * t + (i & 1) + 8 * (i >= 2)][g] = elem(rb[i >> 1], i & 1);
    const uint64_t rc[2] = {gc[0][l], gc[1][l]};
    for (int i = 0; i < 4; ++i) {
      const uint32_t bits = uint32_t(rc[i >> 1] >> (32 * (i & 1)));
      std::memcpy(&C[g + 8 * (i >= 2)][2 * t + (i & 1)], &bits, 4);
    }
  }
  const int lane = g_thread->linear % 32;
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >= 2), col = 2 * t + (i & 1);
    float acc = C[row][col];
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    d[i] = acc;
  }
  if (lane == 0) note_mma();
}
}  // namespace emu

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32,
                         const std::source_location loc = std::source_location::current()) {
  return ::emu::warp_collective(v, [&](int lane) {
    int src = lane ^ lane_mask;
    return (src / width == lane / width) ? src : lane;
  }, loc);
}
template <class T>
inline T __shfl_sync(unsigned, T v, int src_lane, int width = 32,
                     const std::source_location loc = std::source_location::current()) {
  return ::emu::warp_collective(v, [&](int lane) { return (lane / width) * width + (src_lane % width); }, loc);
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32,
                          const std::source_location loc = std::source_location::current()) {
  return ::emu::warp_collective(v, [&](int lane) {
    int src = lane + static_cast<int>(delta);
    return (src / width == lane / width) ? src : lane;
  }, loc);
}

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
