// Task scheduling for the cpu backend's kernels.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace rest_cpu {

// Runs fn(task, state) for every task in [0, n) on at::parallel_for's threads. Tasks are handed out
// dynamically from an atomic counter, so a thread slowed down by another process (a shared machine)
// does not hold the others up as a static split would. Each thread makes its own `state` (its block
// buffers) once. Determinism: a task's results must depend only on its index (every task writes its
// own outputs or partials), never on which thread ran it or in which order; then results are bitwise
// identical for any number of threads.
template <typename MakeState, typename Fn>
void parallel_tasks(int64_t n, MakeState make_state, Fn fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      auto state = make_state();
      for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) fn(t, state);
    }
  });
}

}  // namespace rest_cpu
