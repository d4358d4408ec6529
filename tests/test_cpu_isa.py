"""The cpu kernels' instruction-set builds (csrc/cpu/kernels.h, the table each build exports from
csrc/cpu/kernel_table.cpp, and csrc/cpu_dispatch.cpp, which loads one): one build per x86 level
(AVX-512 with BF16, AVX-512, AVX2), the best one this CPU can run chosen at load time, never one it
cannot run; and the suite's op-level and model-gradient tests passing on every build this CPU can run, so that a
tolerance holding for one kind of CPU only is caught on an AVX-512 machine too."""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import rest_kernels
from rest_kernels import _extension
from support.cpu_builds import every_build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X86 = platform.machine().lower() in ("x86_64", "amd64")
ENV = "REST_KERNELS_CPU_ISA"

# What each build's target lets the compiler use (GCC's x86-64-v3 / -v4, + AVX512-BF16), by
# /proc/cpuinfo's names.
NEEDS = {
    "avx2": {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "abm", "movbe"},
    "generic": set(),
}
NEEDS["avx512"] = NEEDS["avx2"] | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}
NEEDS["avx512bf16"] = NEEDS["avx512"] | {"avx512_bf16"}


@pytest.fixture(scope="module")
def status():
    s = _extension.cpu_kernels_status()
    if s is None:
        pytest.skip(f"no compiled extension: {_extension.unavailable_reason()}")
    return s


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    except OSError:
        pytest.skip("no /proc/cpuinfo")


def test_builds_are_the_x86_levels(status):
    if os.environ.get("REST_KERNELS_CPU_ARCH"):
        pytest.skip("built with REST_KERNELS_CPU_ARCH (one build of that -march)")
    assert status["builds"] == (["avx512bf16", "avx512", "avx2"] if X86 else ["generic"])


def test_what_this_cpu_can_run_agrees_with_cpuinfo(status):
    flags = cpu_flags()
    for isa in status["builds"]:
        lacking = sorted(NEEDS[isa] - flags)
        assert (status["runnable"][isa] is None) == (not lacking), (isa, status["runnable"][isa], lacking)


def test_the_widest_runnable_build_is_chosen_unless_one_is_asked_for(status):
    requested = os.environ.get(ENV, "auto") or "auto"
    assert status["selected"] == (_extension.runnable_cpu_builds()[0] if requested == "auto" else requested)
    assert status["reason"] is None
    assert rest_kernels.available_backends()["cpu"] is None


def test_a_build_this_cpu_cannot_run_is_refused_with_what_it_lacks(status):
    with pytest.raises(ValueError, match="no 'sse9' build of the cpu kernels"):
        _extension.select_cpu_kernels("sse9")
    for isa in status["builds"]:
        if status["runnable"][isa] is not None:  # e.g. the AVX-512 builds on an AVX2 CPU
            with pytest.raises(RuntimeError, match=f"cannot run the {isa} build.*lacks avx512(f|bf16)"):
                _extension.select_cpu_kernels(isa)
    assert _extension.cpu_kernels_status()["selected"] == status["selected"]  # the choice is kept


def test_an_unusable_request_makes_the_backend_unavailable_not_a_crash(status):
    code = (
        "import torch, rest_kernels\n"
        "from rest_kernels import _extension\n"
        "reason = rest_kernels.available_backends()['cpu']\n"
        "assert reason is not None and 'no \\'sse9\\' build' in reason, reason\n"
        "q = torch.randn(1, 2, 5, 4, generator=torch.Generator().manual_seed(0))\n"
        "try:\n"
        "    torch.ops.rest_kernels_C.emsa_fwd(q, q, q, None, 0.5, 1e-5)\n"
        "except RuntimeError as e:\n"
        "    assert 'sse9' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('the raw op ran without kernels')\n"
        "out = rest_kernels.emsa_attention(q, q, q)  # 'auto' falls back (sdpa for plain attention)\n"
        # another float32 evaluation of the same softmax attention: equal up to float32 rounding
        # (torch.testing's float32 default, 1.3e-6 relative); allclose's 1e-8 absolute had failed on
        # an unseeded draw
        "torch.testing.assert_close(out, rest_kernels.emsa_attention(q, q, q, backend='reference'))\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, ENV: "sse9"}, capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_runnable_build_computes_the_same_results(status, dtype):
    """Each build against the reference (the builds differ in vector width, hence in summation order:
    float64 to 1e-12, float32 to 1e-5 relative)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 37, 24, generator=g, dtype=dtype) for _ in range(3))
    w, b = torch.randn(2, 2, generator=g, dtype=dtype), torch.randn(2, generator=g, dtype=dtype)
    x, pw, pb = torch.randn(2, 5, 9, 11, generator=g, dtype=dtype), torch.randn(5, 1, 3, 3, generator=g, dtype=dtype), \
        torch.randn(5, generator=g, dtype=dtype)
    want = (rest_kernels.emsa_attention(q, k, v, w, b, backend="reference"),
            rest_kernels.pa_gate(x, pw, pb, backend="reference"))
    tol = 1e-12 if dtype == torch.float64 else 1e-5

    def check(isa):
        got = (rest_kernels.emsa_attention(q, k, v, w, b, backend="cpu"), rest_kernels.pa_gate(x, pw, pb, backend="cpu"))
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=tol, atol=tol * e.abs().max().item(), msg=lambda m: f"{isa}: {m}")

    every_build(check)


def _instructions(path: str) -> str:
    if shutil.which("objdump") is None:
        pytest.skip("objdump not found")
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.skipif(not X86, reason="x86 instruction sets")
def test_the_extension_itself_uses_no_avx(status):
    """rest_kernels._C is compiled for the baseline, so it loads on any x86-64 CPU; only the kernel
    builds use wider vectors, and each is loaded only where the CPU has them."""
    asm = _instructions(_extension.load()[0].__file__)
    assert "%ymm" not in asm and "%zmm" not in asm


@pytest.mark.skipif(not X86, reason="x86 instruction sets")
def test_each_build_uses_its_own_vector_width(status):
    if os.environ.get("REST_KERNELS_CPU_ARCH"):
        pytest.skip("built with REST_KERNELS_CPU_ARCH")
    folder = os.path.dirname(_extension.load()[0].__file__)
    files = {isa: [f for f in os.listdir(folder) if f.startswith(f"_cpu_kernels_{isa}.") and f.endswith(".so")]
             for isa in status["builds"]}
    bf16 = _instructions(os.path.join(folder, files["avx512bf16"][0]))
    avx512 = _instructions(os.path.join(folder, files["avx512"][0]))
    avx2 = _instructions(os.path.join(folder, files["avx2"][0]))
    assert "vdpbf16ps" in bf16  # the bfloat16 EMSA forward's products (csrc/cpu/bf16_dot_gemm.h)
    assert "%zmm" in avx512
    # no AVX512-BF16 instruction where the CPU may lack it (its three: VDPBF16PS, VCVTNE(2)PS2BF16)
    assert not re.search(r"\bv(dpbf16ps|cvtneps2bf16|cvtne2ps2bf16)\b", avx512)
    assert "%ymm" in avx2 and "%zmm" not in avx2 and "{k" not in avx2  # no AVX-512 registers or masks


# The tests that carry the numerical bounds of the cpu kernels: the op-level ones and the models'
# float32 rules (float64 agrees to ~1e-15 whatever the vector width, so its model cases are not
# repeated). They run again in a child process on every other build this CPU can run (on a CPU with
# AVX512-BF16: the avx512 and avx2 builds), so a bound that holds for one kind of CPU only fails here too.
OTHER_BUILD_TESTS = [
    "tests/test_cpu_backend.py", "tests/test_batchnorm.py",
    "tests/test_models.py::test_lite_train_mode_gradients_match_official[float32]",
    *(f"tests/test_models.py::test_tiny_model_matches_official[float32-{size}]" for size in ("224x224", "64x96")),
    *(f"tests/test_models.py::test_eval_logits_match_official[float32-{v}]"
      for v in ("rest_lite", "rest_small", "rest_base", "rest_large")),
    "tests/test_models.py::test_default_backend_agrees_with_reference[float32]",
    "tests/test_models.py::test_cpu_float32_models_run_channels_last",
]


@pytest.mark.slow
def test_op_and_model_gradient_tests_pass_on_every_other_build(status):
    others = [isa for isa in _extension.runnable_cpu_builds() if isa != status["selected"]]
    if not others:
        pytest.skip(f"this CPU runs one build only ({status['selected']})")
    for isa in others:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *OTHER_BUILD_TESTS],
                           env={**os.environ, ENV: isa}, capture_output=True, text=True, cwd=ROOT, timeout=3600)
        tail = "\n".join(r.stdout.splitlines()[-15:])
        assert r.returncode == 0, f"{ENV}={isa}:\n{tail}\n{r.stderr[-2000:]}"
        assert " passed" in tail and "failed" not in tail, tail
