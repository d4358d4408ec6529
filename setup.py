"""Build of the compiled extension `rest_kernels._C`.

One extension holds every compiled op:
  csrc/registration.cpp   the op schemas (TORCH_LIBRARY) and the build record
  csrc/cpu/*.cpp          the `cpu` backend's kernels (CPU dispatch key)
  csrc/emu/*.cpp          the CUDA kernels' own source run by the CPU emulation (`cuda-emu`)
  csrc/cuda/*.cu          the `cuda` backend's kernels (CUDA dispatch key), only when CUDA is built

Switches (environment variables):
  MAX_JOBS                  parallel compile jobs (honoured by torch's ninja build)
  TORCH_CUDA_ARCH_LIST      CUDA architectures; default: the visible GPU's, else "8.0;9.0"
  REST_KERNELS_CUDA         "1" forces the CUDA part (fails if it cannot be built),
                            "0" skips it; default: built when torch has CUDA and nvcc is found
  REST_KERNELS_CPU_ARCH     value for -march= of the CPU kernels (default "native"; "" for none)
  REST_KERNELS_PTXAS_VERBOSE=1  print registers / shared memory / spills of every CUDA kernel
  REST_KERNELS_DEBUG=1      -O0 -g builds
"""
import glob
import os
import shutil
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


def main():
    build_cuda, cuda_reason = decide_cuda()
    debug = os.environ.get("REST_KERNELS_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    march = os.environ.get("REST_KERNELS_CPU_ARCH", "native")

    sources = ["csrc/registration.cpp"]
    sources += sorted(glob.glob("csrc/cpu/*.cpp"))
    sources += sorted(glob.glob("csrc/emu/*.cpp"))

    archs, arch_source = cuda_arch_list() if build_cuda else ("", "")
    info = {
        "REST_BUILT_TORCH": torch.__version__,
        "REST_BUILT_CUDA": torch.version.cuda if build_cuda else "",
        "REST_BUILT_ARCHS": archs,
        "REST_BUILT_CPU_ARCH": march,
    }
    cxx = opt + ["-std=c++20", "-fopenmp", "-fno-math-errno"] + [cdefine(k, v) for k, v in info.items()]
    if march:
        cxx.append(f"-march={march}")
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra_link = ["-fopenmp"]

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

    setup(
        ext_modules=[ext],
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
