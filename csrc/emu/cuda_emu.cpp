// The fiber scheduler behind csrc/emu/cuda_emu.h (see the model described there).
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <ucontext.h>

#include <algorithm>
#include <exception>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <vector>

#include "emu/cuda_emu.h"

namespace emu {

thread_local ThreadView* g_thread = nullptr;
thread_local dim3 g_block_idx, g_block_dim, g_grid_dim;

namespace {

constexpr size_t kStackBytes = 64 * 1024;
constexpr size_t kSharedBytes = 228 * 1024;  // the largest shared memory of a block on sm_90

struct Fiber {
  ThreadView view;
  ucontext_t ctx;
  Wait wait = Wait::Runnable;
  uint32_t site_line = 0;
  const char* site_file = "";
  size_t shared_off = 0;
  unsigned collectives = 0;  // warp collectives done by this lane (selects the exchange bank)
  char* stack = nullptr;
};

// One per OS thread: the block it is running.
struct BlockRun {
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::unique_ptr<unsigned char[]> shared;
  std::vector<uint64_t> exchange;  // [warp][bank 2][lane 32]
  ucontext_t sched;
  Fiber* cur = nullptr;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;  // thrown inside a fiber; rethrown by the scheduler on its own stack
};
thread_local BlockRun* t_run = nullptr;

// Process-wide schedule: 0 forward, 1 reverse, 2 shuffle(seed).
std::atomic<int> g_mode{-1};
std::atomic<uint64_t> g_seed{0};
std::mutex g_mode_mutex;

void init_schedule_from_env() {
  if (g_mode.load() >= 0) return;
  std::lock_guard<std::mutex> lock(g_mode_mutex);
  if (g_mode.load() >= 0) return;
  const char* env = std::getenv("REST_KERNELS_EMU_SCHEDULE");
  set_schedule(env ? env : "forward");
}

[[noreturn]] void fail(const std::string& msg) { TORCH_CHECK(false, "cuda-emu: ", msg); }

Fiber& current() { return *t_run->cur; }

void yield_to_scheduler(Wait w, const std::source_location& loc) {
  Fiber& f = current();
  f.wait = w;
  f.site_line = loc.line();
  f.site_file = loc.file_name();
  swapcontext(&f.ctx, &t_run->sched);
}

void fiber_entry() {
  // An exception must not unwind through makecontext's frame: park it for the scheduler.
  try {
    (*t_run->body)();
  } catch (...) {
    t_run->error = std::current_exception();
  }
  t_run->cur->wait = Wait::Exited;
  // returning resumes uc_link: the scheduler
}

std::string describe(const std::vector<Fiber>& fibers) {
  std::ostringstream os;
  int shown = 0;
  for (const Fiber& f : fibers) {
    if (shown++ >= 8) { os << " ..."; break; }
    os << " [thread " << f.view.linear << ": ";
    switch (f.wait) {
      case Wait::Exited: os << "exited"; break;
      case Wait::Block: os << "__syncthreads at line " << f.site_line; break;
      case Wait::Warp: os << "warp collective at line " << f.site_line; break;
      default: os << "runnable"; break;
    }
    os << "]";
  }
  return os.str();
}

void run_block(BlockRun& run, unsigned block_linear) {
  const int n = static_cast<int>(run.fibers.size());
  std::memset(run.shared.get(), 0xFF, kSharedBytes);  // poison: NaN in every float format
  std::fill(run.exchange.begin(), run.exchange.end(), ~uint64_t(0));
  for (int t = 0; t < n; ++t) {
    Fiber& f = run.fibers[t];
    f.wait = Wait::Runnable;
    f.shared_off = 0;
    f.collectives = 0;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &run.sched;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  const int mode = g_mode.load();
  std::mt19937_64 rng(g_seed.load() * 0x9E3779B97F4A7C15ull + block_linear);
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  if (mode == 1) std::reverse(order.begin(), order.end());
  const int nwarps = (n + 31) / 32;
  for (;;) {
    if (mode == 2) std::shuffle(order.begin(), order.end(), rng);
    for (int t : order) {
      Fiber& f = run.fibers[t];
      if (f.wait != Wait::Runnable) continue;
      run.cur = &f;
      g_thread = &f.view;
      swapcontext(&run.sched, &f.ctx);
      if (run.error) {
        std::exception_ptr e = run.error;
        run.error = nullptr;
        std::rethrow_exception(e);
      }
    }
    // Nobody can run: release a barrier whose every participant has arrived, or report divergence.
    bool released = false, all_exited = true;
    for (int w = 0; w < nwarps; ++w) {
      int lo = w * 32, hi = std::min(n, lo + 32);
      int at_warp = 0, live = 0;
      uint32_t line = 0;
      bool same = true;
      for (int t = lo; t < hi; ++t) {
        const Fiber& f = run.fibers[t];
        if (f.wait != Wait::Exited) { ++live; all_exited = false; }
        if (f.wait == Wait::Warp) {
          if (at_warp++ == 0) line = f.site_line; else same &= (f.site_line == line);
        }
      }
      if (at_warp == 0) continue;
      if (at_warp != live || !same) {
        std::vector<Fiber> lanes(run.fibers.begin() + lo, run.fibers.begin() + hi);
        fail("warp collective divergence in block " + std::to_string(block_linear) + ", warp " +
             std::to_string(w) + ":" + describe(lanes));
      }
      for (int t = lo; t < hi; ++t)
        if (run.fibers[t].wait == Wait::Warp) run.fibers[t].wait = Wait::Runnable;
      released = true;
    }
    if (all_exited) return;
    if (released) continue;
    uint32_t line = 0;
    bool first = true, ok = true;
    for (const Fiber& f : run.fibers) {
      if (f.wait != Wait::Block) { ok = false; break; }
      if (first) { line = f.site_line; first = false; } else if (f.site_line != line) { ok = false; break; }
    }
    if (!ok) {
      fail("barrier divergence in block " + std::to_string(block_linear) +
           " (not every thread reached the same __syncthreads):" + describe(run.fibers));
    }
    for (Fiber& f : run.fibers) f.wait = Wait::Runnable;
  }
}

BlockRun& block_run_for(int nthreads) {
  thread_local BlockRun run;
  if (static_cast<int>(run.fibers.size()) != nthreads) {
    run.fibers.assign(nthreads, Fiber{});
    while (static_cast<int>(run.stacks.size()) < nthreads)
      run.stacks.emplace_back(new char[kStackBytes]);
    for (int t = 0; t < nthreads; ++t) run.fibers[t].stack = run.stacks[t].get();
    run.exchange.assign(static_cast<size_t>((nthreads + 31) / 32) * 64, 0);
  }
  if (!run.shared) run.shared.reset(new unsigned char[kSharedBytes]);
  return run;
}

}  // namespace

void block_barrier(const std::source_location& loc) { yield_to_scheduler(Wait::Block, loc); }
void warp_barrier(const std::source_location& loc) { yield_to_scheduler(Wait::Warp, loc); }

uint64_t* warp_exchange(int& lane_out, uint64_t** read_bank) {
  Fiber& f = current();
  const int warp = f.view.linear / 32, lane = f.view.linear % 32;
  uint64_t* bank = &t_run->exchange[(static_cast<size_t>(warp) * 2 + (f.collectives & 1)) * 32];
  ++f.collectives;
  lane_out = lane;
  *read_bank = bank;
  return &bank[lane];
}

void* shared_alloc(size_t bytes, size_t align) {
  Fiber& f = current();
  size_t off = (f.shared_off + align - 1) / align * align;
  if (off + bytes > kSharedBytes) fail("shared memory of a block exceeds 228 KiB");
  f.shared_off = off + bytes;
  return t_run->shared.get() + off;
}

void launch_impl(dim3 grid, dim3 block, const std::function<void()>& body) {
  init_schedule_from_env();
  const int64_t nthreads = int64_t(block.x) * block.y * block.z;
  TORCH_CHECK(nthreads >= 1 && nthreads <= 1024, "cuda-emu: block of ", nthreads, " threads");
  const int64_t nblocks = int64_t(grid.x) * grid.y * grid.z;
  if (nblocks == 0) return;
  at::parallel_for(0, nblocks, 1, [&](int64_t begin, int64_t end) {
    BlockRun& run = block_run_for(static_cast<int>(nthreads));
    BlockRun* saved = t_run;
    t_run = &run;
    run.body = &body;
    for (int t = 0; t < nthreads; ++t) {
      Fiber& f = run.fibers[t];
      f.view.linear = t;
      f.view.tid = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
    }
    g_block_dim = block;
    g_grid_dim = grid;
    for (int64_t bl = begin; bl < end; ++bl) {
      g_block_idx = dim3(bl % grid.x, (bl / grid.x) % grid.y, bl / (int64_t(grid.x) * grid.y));
      run_block(run, static_cast<unsigned>(bl));
    }
    t_run = saved;
    g_thread = nullptr;
  });
}

void set_schedule(const std::string& spec) {
  if (spec == "forward") {
    g_mode = 0;
  } else if (spec == "reverse") {
    g_mode = 1;
  } else if (spec.rfind("shuffle", 0) == 0) {
    uint64_t seed = 0;
    if (spec.size() > 8 && spec[7] == ':') seed = std::stoull(spec.substr(8));
    g_seed = seed;
    g_mode = 2;
  } else {
    TORCH_CHECK(false, "cuda-emu: unknown schedule '", spec, "' (forward, reverse, shuffle:<seed>)");
  }
}

namespace {
std::atomic<uint64_t> g_mma_executed{0};
}
uint64_t mma_executed() { return g_mma_executed.load(std::memory_order_relaxed); }
void note_mma() { g_mma_executed.fetch_add(1, std::memory_order_relaxed); }

std::string get_schedule() {
  init_schedule_from_env();
  int m = g_mode.load();
  return m == 0 ? "forward" : m == 1 ? "reverse" : "shuffle:" + std::to_string(g_seed.load());
}

}  // namespace emu
