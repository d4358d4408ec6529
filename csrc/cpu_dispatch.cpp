// The extension's CPU ops (rest_kernels_C::emsa_fwd / emsa_bwd / pa_fwd / pa_bwd / add_layer_norm /
// pack_linear_weight / packed_linear / depthwise_conv2d on the CPU key): the argument checks of op_checks.h, then the
// kernels of the cpu kernel build chosen for this CPU.
//
// The kernels of csrc/cpu are built once per instruction-set level into libraries of their own
// (csrc/cpu/kernels.h says why). This file, compiled for the baseline of the architecture like the
// rest of rest_kernels._C, chooses one on first use:
//   - the builds this extension has are listed at build time (REST_CPU_KERNEL_BUILDS, best first) and
//     lie next to this library as _cpu_kernels_<isa>.<python extension suffix>;
//   - REST_KERNELS_CPU_ISA=avx512bf16|avx512|avx2|generic asks for one of them ("auto" or unset: the best one this
//     CPU can run);
//   - a build is loaded only when the CPU has every feature its -march lets the compiler use
//     (GCC's __builtin_cpu_supports, which also checks that the OS saves the AVX / AVX-512 registers).
// When none can be used the ops raise with the reason (which instruction sets are missing), and the
// Python backend reports the same reason as why `cpu` is unavailable: never a SIGILL.
#include <dlfcn.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdlib>
#include <filesystem>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "op_checks.h"

#ifndef REST_CPU_KERNEL_BUILDS
#define REST_CPU_KERNEL_BUILDS ""
#endif

namespace rest_cpu_dispatch {
namespace {

using rest_cpu::KernelTable;

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, sep);)
    if (!item.empty()) out.push_back(item);
  return out;
}

std::string join(const std::vector<std::string>& items, const char* sep) {
  std::string out;
  for (const auto& s : items) out += (out.empty() ? "" : sep) + s;
  return out;
}

// The CPU features a build's code may use and that this CPU lacks (empty: it can run the build).
// avx2 is x86-64-v3's list, avx512 adds x86-64-v4's (GCC's definitions of the two levels), avx512bf16
// adds AVX512-BF16 (setup.py builds it with -march=x86-64-v4 -mavx512bf16).
std::vector<std::string> missing_features(const std::string& isa) {
  std::vector<std::string> missing;
  if (isa == "generic") return missing;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#define REST_NEED(feature) \
  if (!__builtin_cpu_supports(feature)) missing.push_back(feature);
  const bool avx512 = isa == "avx512" || isa == "avx512bf16";
  if (isa == "avx2" || avx512) {
    REST_NEED("avx") REST_NEED("avx2") REST_NEED("fma") REST_NEED("bmi") REST_NEED("bmi2") REST_NEED("f16c")
    REST_NEED("lzcnt") REST_NEED("movbe")
  }
  if (avx512) {
    REST_NEED("avx512f") REST_NEED("avx512bw") REST_NEED("avx512vl") REST_NEED("avx512dq") REST_NEED("avx512cd")
  }
  if (isa == "avx512bf16") REST_NEED("avx512bf16")
#undef REST_NEED
  if (isa != "avx2" && !avx512) missing.push_back("an instruction set named '" + isa + "'");
#else
  missing.push_back(isa + " (this is not an x86 CPU)");
#endif
  return missing;
}

// The folder of this library (rest_kernels/), where the kernel builds lie.
std::filesystem::path this_library_folder() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&missing_features), &info) == 0 || info.dli_fname == nullptr) return {};
  return std::filesystem::path(info.dli_fname).parent_path();
}

std::filesystem::path build_file(const std::string& isa) {
  const std::string stem = "_cpu_kernels_" + isa + ".";
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(this_library_folder(), ec)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind(stem, 0) == 0 && name.size() > 3 && name.compare(name.size() - 3, 3, ".so") == 0)
      return entry.path();
  }
  return {};
}

struct State {
  std::mutex mutex;
  bool initialised = false;
  std::map<std::string, const KernelTable*> loaded;
  const KernelTable* selected = nullptr;
  std::string reason;  // why nothing is selected
};

State& state() {
  static State s;
  return s;
}

// Loads the build `isa` (once) and returns its table, or throws with the reason it cannot be used.
const KernelTable* load_build(State& s, const std::string& isa) {
  if (auto it = s.loaded.find(isa); it != s.loaded.end()) return it->second;
  const auto builds = split(REST_CPU_KERNEL_BUILDS, ',');
  TORCH_CHECK_VALUE(std::find(builds.begin(), builds.end(), isa) != builds.end(), "rest_kernels: no '", isa,
                    "' build of the cpu kernels in this extension (it has: ", join(builds, ", "), ")");
  const auto missing = missing_features(isa);
  TORCH_CHECK(missing.empty(), "rest_kernels: this CPU cannot run the ", isa, " build of the cpu kernels: it lacks ",
              join(missing, ", "));
  const auto path = build_file(isa);
  TORCH_CHECK(!path.empty(), "rest_kernels: the ", isa, " build of the cpu kernels (_cpu_kernels_", isa,
              ".*.so) is missing from ", this_library_folder().string(), "; rebuild with `pip install -e .`");
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  TORCH_CHECK(handle != nullptr, "rest_kernels: cannot load ", path.string(), ": ", dlerror());
  auto entry = reinterpret_cast<const KernelTable* (*)()>(dlsym(handle, "rest_cpu_kernel_table"));
  TORCH_CHECK(entry != nullptr, "rest_kernels: ", path.string(), " has no rest_cpu_kernel_table");
  const KernelTable* table = entry();
  TORCH_CHECK(table->version == rest_cpu::kKernelTableVersion && std::string(table->isa) == isa, "rest_kernels: ",
              path.string(), " is a ", table->isa, " build of kernel table version ", table->version, ", expected ",
              isa, " and version ", rest_cpu::kKernelTableVersion, "; rebuild with `pip install -e .`");
  s.loaded[isa] = table;
  return table;
}

// First use: REST_KERNELS_CPU_ISA, else the first build (best first) this CPU can run.
void initialise(State& s) {
  if (s.initialised) return;
  s.initialised = true;
  const char* env = std::getenv("REST_KERNELS_CPU_ISA");
  const std::string requested = env != nullptr && *env != '\0' ? env : "auto";
  const auto candidates = requested == "auto" ? split(REST_CPU_KERNEL_BUILDS, ',') : std::vector{requested};
  std::vector<std::string> reasons;
  for (const auto& isa : candidates) {
    try {
      s.selected = load_build(s, isa);
      return;
    } catch (const c10::Error& e) {
      reasons.push_back(e.what_without_backtrace());
    }
  }
  s.reason = (requested == "auto" ? "" : "REST_KERNELS_CPU_ISA=" + requested + ": ") +
             (reasons.empty() ? std::string("this extension was built without cpu kernels") : join(reasons, "; "));
}

const KernelTable& kernels() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  initialise(s);
  TORCH_CHECK(s.selected != nullptr, s.reason);
  return *s.selected;
}

rest_cpu::Tensors4 emsa_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const rest_cpu::OptTensor& w, double scale, double eps) {
  return kernels().emsa_fwd(q, k, v, w, scale, eps);
}
rest_cpu::Tensors4 emsa_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const rest_cpu::OptTensor& w, const at::Tensor& out, const at::Tensor& lse,
                            const at::Tensor& rsq, const at::Tensor& rstd, double scale, double eps) {
  return kernels().emsa_bwd(dout, q, k, v, w, out, lse, rsq, rstd, scale, eps);
}
at::Tensor pa_fwd(const at::Tensor& x, const at::Tensor& weight, const rest_cpu::OptTensor& bias) {
  return kernels().pa_fwd(x, weight, bias);
}
rest_cpu::Tensors3 pa_bwd(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& weight,
                          const rest_cpu::OptTensor& bias) {
  return kernels().pa_bwd(dout, x, weight, bias);
}
std::tuple<at::Tensor, at::Tensor> add_layer_norm(const at::Tensor& x, const rest_cpu::OptTensor& residual,
                                                  const rest_cpu::OptTensor& weight, const rest_cpu::OptTensor& bias,
                                                  double eps) {
  return kernels().add_layer_norm(x, residual, weight, bias, eps);
}
at::Tensor pack_linear_weight(const at::Tensor& weight) { return kernels().pack_linear_weight(weight); }
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const rest_cpu::OptTensor& bias,
                         int64_t out_features, bool gelu) {
  return kernels().packed_linear(x, packed, bias, out_features, gelu);
}
at::Tensor depthwise_conv2d(const at::Tensor& x, const at::Tensor& taps, const rest_cpu::OptTensor& bias,
                            at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding) {
  return kernels().depthwise_conv2d(x, taps, bias, kernel_size, stride, padding);
}

}  // namespace

// For Python (registration.cpp binds these): what is selected and why, and a switch for tests and
// comparisons (`rest_kernels._extension.select_cpu_kernels`).
py::dict cpu_kernels_status() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  initialise(s);
  py::dict d;
  d["builds"] = split(REST_CPU_KERNEL_BUILDS, ',');
  d["selected"] = s.selected ? py::cast(std::string(s.selected->isa)) : py::none();
  d["march"] = s.selected ? py::cast(std::string(s.selected->march)) : py::none();
  d["reason"] = s.selected ? py::none() : py::cast(s.reason);
  py::dict runnable;
  for (const auto& isa : split(REST_CPU_KERNEL_BUILDS, ',')) {
    const auto missing = missing_features(isa);
    runnable[py::str(isa)] = missing.empty() ? py::none() : py::cast("lacks " + join(missing, ", "));
  }
  d["runnable"] = runnable;  // per build: None, or why this CPU cannot run it
  return d;
}

void select_cpu_kernels(const std::string& isa) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  initialise(s);
  s.selected = load_build(s, isa);  // throws (and keeps the current choice) when it cannot be used
}

}  // namespace rest_cpu_dispatch

TORCH_LIBRARY_IMPL(rest_kernels_C, CPU, m) {
  m.impl("emsa_fwd", &rest_checks::checked_emsa_fwd<&rest_cpu_dispatch::emsa_fwd>);
  m.impl("emsa_bwd", &rest_checks::checked_emsa_bwd<&rest_cpu_dispatch::emsa_bwd>);
  m.impl("pa_fwd", &rest_checks::checked_pa_fwd<&rest_cpu_dispatch::pa_fwd>);
  m.impl("pa_bwd", &rest_checks::checked_pa_bwd<&rest_cpu_dispatch::pa_bwd>);
  m.impl("add_layer_norm", &rest_checks::checked_add_layer_norm<&rest_cpu_dispatch::add_layer_norm>);
  m.impl("pack_linear_weight", &rest_checks::checked_pack_linear_weight<&rest_cpu_dispatch::pack_linear_weight>);
  m.impl("packed_linear", &rest_checks::checked_packed_linear<&rest_cpu_dispatch::packed_linear>);
  m.impl("depthwise_conv2d", &rest_checks::checked_depthwise_conv2d<&rest_cpu_dispatch::depthwise_conv2d>);
}
