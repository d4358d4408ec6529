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
