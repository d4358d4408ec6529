"""Build of the compiled extension `rest_kernels._C`.

One extension holds every compiled op, compiled for the baseline of the architecture (it loads and
runs on any CPU of it):
  csrc/registration.cpp   the op schemas (TORCH_LIBRARY) and the build record
  csrc/cpu_dispatch.cpp   the `cpu` backend's ops (CPU dispatch key): checks, then the kernel build below
  csrc/emu/*.cpp          the CUDA kernels' own source run by the CPU emulation (`cuda-emu`)
  csrc/cuda/*.cu          the `cuda` backend's kernels (CUDA dispatch key), only when CUDA is built
and the `cpu` backend's kernels (csrc/cpu/*.cpp) are built once per instruction-set level into
libraries of their own, rest_kernels/_cpu_kernels_<isa>.so: on x86-64 "avx512bf16" (-march=x86-64-v4
-mavx512bf16: bfloat16 dot products, VDPBF16PS), "avx512" (-march=x86-64-v4) and "avx2"
(-march=x86-64-v3), elsewhere "generic". The extension picks the best one this CPU can run when the
first cpu op runs (REST_KERNELS_CPU_ISA=avx512bf16|avx512|avx2|generic picks one;
csrc/cpu/kernels.h says why libraries of their own).

Switches (environment variables):
  MAX_JOBS                  parallel compile jobs (honoured by torch's ninja build)
  TORCH_CUDA_ARCH_LIST      CUDA architectures; default: the visible GPU's, else "8.0;9.0"
  REST_KERNELS_CUDA         "1" forces the CUDA part (fails if it cannot be built),
                            "0" skips it; default: built when torch has CUDA and nvcc is found
  REST_KERNELS_CPU_ARCH     one cpu kernel build with this -march instead of the per-level builds
                            (e.g. "native"). The load-time check covers only the level that -march
                            implies (AVX-512 with or without BF16, AVX2): a build using more (native
                            on a CPU with, say, AMX) is for the machines it was built for, not for
                            copying
  REST_KERNELS_PTXAS_VERBOSE=1  print registers / shared memory / spills of every CUDA kernel
  REST_KERNELS_DEBUG=1      -O0 -g builds
"""
import glob
import os
import platform
import shutil
import subprocess
import sys

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def log(msg):
    print(f"[rest-kernels build] {msg}", file=sys.stderr, flush=True)


def find_cuda_home():
    """CUDA toolkit root: CUDA_HOME / CUDA_PATH, else the directory of nvcc, else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.exists(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.environ[var]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "include", "cuda.h")):
            return home
    return None


def decide_cuda():
    """Return (build_cuda, reason)."""
    switch = os.environ.get("REST_KERNELS_CUDA", "").strip()
    if switch == "0":
        return False, "REST_KERNELS_CUDA=0"
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build")
    home = find_cuda_home()
    if home is None:
        problems.append("nvcc was not found (set CUDA_HOME)")
    if problems:
        if switch == "1":
            raise RuntimeError("REST_KERNELS_CUDA=1 but the CUDA part cannot be built: " + "; ".join(problems))
        return False, "; ".join(problems)
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home
    return True, f"torch CUDA {torch.version.cuda}, nvcc in {home}"


def cuda_arch_list():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"], "TORCH_CUDA_ARCH_LIST"
    if torch.cuda.is_available():
        archs = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(archs), "visible GPUs"
    return DEFAULT_CUDA_ARCHS, "default (no GPU visible)"


def torch_cuda_extra_includes():
    """torch's CUDA headers include cusparse.h and friends; a bare toolkit may lack them, while the
    nvidia wheels installed with torch carry them (site-packages/nvidia/cu*/include)."""
    found = []
    for base in sys.path:
        for inc in sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "include"))):
            if os.path.exists(os.path.join(inc, "cusparse.h")):
                found.append(inc)
    return found[:1]


def cdefine(name, value):
    return f'-D{name}="{value}"'


def cpu_kernel_builds():
    """[(isa, march, extra features)], best first: the instruction-set builds of the cpu kernels,
    compiled with -march=<march> -m<feature>... csrc/cpu_dispatch.cpp's `missing_features` lists the
    CPU features each isa needs, and must name everything these flags let the compiler use."""
    march = os.environ.get("REST_KERNELS_CPU_ARCH", "").strip()
    if march:
        return [(isa_of_march(march), march, [])]
    if platform.machine().lower() in ("x86_64", "amd64"):
        return [("avx512bf16", "x86-64-v4", ["avx512bf16"]), ("avx512", "x86-64-v4", []),
                ("avx2", "x86-64-v3", [])]
    return [("generic", "", [])]


def target_flags(march, features):
    return ([f"-march={march}"] if march else []) + [f"-m{f}" for f in features]


def target_name(march, features):
    """The build's target in one word, as the extension reports it ("x86-64-v4+avx512bf16"). No spaces
    or '-' options: it is also a macro value on nvcc's command line, which splits such values."""
    return "+".join([march or "default"] + list(features))


def isa_of_march(march):
    """The level a -march implies, as csrc/cpu/kernels.h's REST_CPU_ISA names it (asked of the compiler)."""
    cxx = os.environ.get("CXX", "c++")
    try:
        macros = subprocess.run([cxx, f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull], check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"REST_KERNELS_CPU_ARCH={march}: {cxx} cannot compile for it ({e})") from None
    defined = {line.split()[1] for line in macros.splitlines() if line.startswith("#define ")}
    if {"__AVX512F__", "__AVX512BW__", "__AVX512VL__", "__AVX512DQ__", "__AVX512CD__"} <= defined:
        return "avx512bf16" if "__AVX512BF16__" in defined else "avx512"
    if {"__AVX2__", "__FMA__"} <= defined:
        return "avx2"
    return "generic"


def cpu_kernel_sources(isa):
    """csrc/cpu/*.cpp as seen by one build: a wrapper file per source under build/, so that each build
    compiles to object files of its own (setuptools shares one temporary folder between extensions)."""
    folder = os.path.join(ROOT, "build", "cpu_kernel_sources", isa)
    os.makedirs(folder, exist_ok=True)
    wrappers = []
    for src in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))):
        wrapper = os.path.join(folder, os.path.basename(src))
        text = f'// generated by setup.py: the {isa} build of csrc/cpu/{os.path.basename(src)}\n#include "cpu/{os.path.basename(src)}"\n'
        if not os.path.exists(wrapper) or open(wrapper).read() != text:
            with open(wrapper, "w") as f:
                f.write(text)
        wrappers.append(os.path.relpath(wrapper, ROOT))
    return wrappers


def main():
    build_cuda, cuda_reason = decide_cuda()
    debug = os.environ.get("REST_KERNELS_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    builds = cpu_kernel_builds()

    sources = ["csrc/registration.cpp", "csrc/cpu_dispatch.cpp"]
    sources += sorted(glob.glob("csrc/emu/*.cpp"))

    archs, arch_source = cuda_arch_list() if build_cuda else ("", "")
    info = {
        "REST_BUILT_TORCH": torch.__version__,
        "REST_BUILT_CUDA": torch.version.cuda if build_cuda else "",
        "REST_BUILT_ARCHS": archs,
        "REST_CPU_KERNEL_BUILDS": ",".join(isa for isa, _, _ in builds),
        "REST_BUILT_CPU_MARCHES": ",".join(target_name(march, extra) for _, march, extra in builds),
    }
    # No -march here: rest_kernels._C must load on every CPU of the architecture.
    cxx = opt + ["-std=c++20", "-fopenmp", "-fno-math-errno"] + [cdefine(k, v) for k, v in info.items()]
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra_link = ["-fopenmp", "-ldl"]

    if build_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        include_dirs += torch_cuda_extra_includes()
        nvcc = opt + ["-std=c++20", "-lineinfo", "--expt-relaxed-constexpr", "-DREST_WITH_CUDA=1"]
        nvcc += [cdefine(k, v) for k, v in info.items()]
        if os.environ.get("REST_KERNELS_PTXAS_VERBOSE") == "1":
            nvcc.append("-Xptxas=-v")
        cxx.append("-DREST_WITH_CUDA=1")
        ext = cpp_extension.CUDAExtension(
            "rest_kernels._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=extra_link)
        log(f"building CPU + CUDA extension ({cuda_reason}); archs {archs} ({arch_source})")
    else:
        ext = cpp_extension.CppExtension(
            "rest_kernels._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx}, extra_link_args=extra_link)
        log(f"building CPU-only extension: CUDA part skipped ({cuda_reason})")

    # The cpu kernels, one library per instruction-set level. Hidden symbols: each library keeps its
    # own copies of every inline function (none compiled for AVX-512 can serve another library).
    kernel_exts = []
    for isa, march, extra in builds:
        flags = opt + ["-std=c++20", "-fopenmp", "-fno-math-errno", "-fvisibility=hidden",
                       "-fvisibility-inlines-hidden", cdefine("REST_CPU_MARCH", target_name(march, extra))]
        flags += target_flags(march, extra)
        kernel_exts.append(cpp_extension.CppExtension(
            f"rest_kernels._cpu_kernels_{isa}", cpu_kernel_sources(isa), include_dirs=include_dirs,
            extra_compile_args={"cxx": flags}, extra_link_args=["-fopenmp"]))
    log("cpu kernel builds: " + ", ".join(f"{isa} ({' '.join(target_flags(m, e)) or 'default target'})"
                                          for isa, m, e in builds))

    setup(
        ext_modules=[ext] + kernel_exts,
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
