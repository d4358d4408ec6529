// The machine's float32 FMA limit, for the README's "how far from the FMA limit" statements: every
// thread runs 12 independent chains of vector FMAs (enough to cover the FMA latency on two pipes) at
// the width the cpu backend's kernels use (csrc/cpu/simd.h: 64 bytes with AVX-512, 32 with AVX2).
//
//   g++ -O2 -march=native -pthread -I"$(python -c 'import torch.utils.cpp_extension as c; print(c.include_paths()[0])')" \
//       bench/fma_peak.cpp -o /tmp/fma_peak && /tmp/fma_peak 2
// (torch's include path: csrc/cpu/simd.h includes c10's BFloat16).
//
// Prints GFLOP/s (an FMA counts as 2 FLOPs) summed over the threads.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "../csrc/cpu/simd.h"

using V = rest_cpu::vec_t<float>;
constexpr int kLanes = rest_cpu::Simd<float>::W;

static double chains(long iters) {
  const V m = rest_cpu::vset<float>(1.0000001f), c = rest_cpu::vset<float>(1e-7f);
  V a0 = m * 0.f, a1 = m * 1.f, a2 = m * 2.f, a3 = m * 3.f, a4 = m * 4.f, a5 = m * 5.f, a6 = m * 6.f,
    a7 = m * 7.f, a8 = m * 8.f, a9 = m * 9.f, a10 = m * 10.f, a11 = m * 11.f;
  const auto t0 = std::chrono::steady_clock::now();
  for (long k = 0; k < iters; ++k) {
    a0 = a0 * m + c; a1 = a1 * m + c; a2 = a2 * m + c; a3 = a3 * m + c; a4 = a4 * m + c; a5 = a5 * m + c;
    a6 = a6 * m + c; a7 = a7 * m + c; a8 = a8 * m + c; a9 = a9 * m + c; a10 = a10 * m + c; a11 = a11 * m + c;
  }
  const auto t1 = std::chrono::steady_clock::now();
  const V s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
  if (s[0] == 12345.f) std::printf(" ");  // keeps the chains live
  return std::chrono::duration<double>(t1 - t0).count();
}

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
  if (threads < 1) {
    std::fprintf(stderr, "usage: fma_peak [threads >= 1]\n");
    return 2;
  }
  const long iters = 200000000;
  std::vector<double> seconds(threads);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back([&seconds, t, iters] { seconds[t] = chains(iters); });
  for (auto& t : pool) t.join();
  double gflops = 0;
  for (double s : seconds) gflops += 2.0 * kLanes * 12 * iters / s / 1e9;
  std::printf("%d thread(s), %d-lane float32 vectors: %.1f GFLOP/s\n", threads, kLanes, gflops);
  return 0;
}
