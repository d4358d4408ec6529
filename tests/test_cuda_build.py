"""The built extension's CUDA code: every kernel compiled for every requested arch (sm_80 and sm_90
by default), no local-memory spills in the hot kernels. Needs no GPU; skipped when the extension
was built without its CUDA part."""
import os
import sys

import pytest

from rest_kernels import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import cuda_resources  # noqa: E402


@pytest.fixture(scope="module")
def usage():
    info = _extension.build_info()
    if info is None or not info.get("with_cuda"):
        pytest.skip("the extension was built without CUDA")
    if cuda_resources.find_tool("cuobjdump") is None:
        pytest.skip("cuobjdump not found")
    return cuda_resources.resource_usage(_extension.load()[0].__file__), cuda_resources.built_archs()


def test_default_archs_built(usage):
    rows, archs = usage
    if os.environ.get("TORCH_CUDA_ARCH_LIST") is None and "sm_80" in archs:
        assert {"sm_80", "sm_90"} <= set(archs)
    assert archs, "build record names no CUDA arch"


def test_every_kernel_for_every_arch_without_spills(usage):
    rows, archs = usage
    assert cuda_resources.problems(rows, archs) == []
    for fam in cuda_resources.FAMILIES:
        have = {r["arch"] for r in rows if r["family"] == fam}
        assert set(archs) <= have, f"{fam}: archs {sorted(have)}"


def test_mma_selftest_runs_on_tensor_cores(usage):
    """rk::mma_16816 (csrc/cuda/mma.cuh) is an HMMA in the SASS of every built arch, with no FFMA
    doing its products (the self-test kernel has no other arithmetic)."""
    _, archs = usage
    counts = cuda_resources.sass_counts(_extension.load()[0].__file__)
    for arch in archs:
        c = counts[("mma_selftest_kernel", arch)]
        assert c["HMMA"] >= 2 and c["FFMA"] == 0, (arch, c)  # one per instantiation: bf16, fp16



def test_emsa_16bit_products_on_tensor_cores(usage):
    """The fp16 / bf16 forward and backward (csrc/cuda/emsa_mma.cuh) do every product (QK^T, P V,
    dO V^T, dS K, dS^T Q, Y^T dO) as HMMA on every built arch, and FFMA only for the element-wise work. Why the bound: a lane holds 16 logits of a tile
    (four m16n8 fragments); the element-wise work on them (the head mix S += w L, the softmax and
    centred statistics, the exp range reductions) is a few FFMA per logit, about 40 per kernel
    instantiation as built (forward and backward). A product left on SIMT would need 16 FFMA per logit for every 16-wide
    head-dim chunk (256 per chunk), so at most 8 FFMA per held logit (128 per instantiation) fails if
    any product falls back to FFMA."""
    rows, archs = usage
    counts = cuda_resources.sass_counts(_extension.load()[0].__file__)
    for arch in archs:
        for fam in ("emsa_stats_mma_kernel", "emsa_fwd_mma_kernel", "emsa_bwd_mma_kernel"):
            c = counts[(fam, arch)]
            kernels = sum(1 for r in rows if r["family"] == fam and r["arch"] == arch)
            # at least 4 head-dim chunks (d_pad >= 64) x 4 n-tiles of logits per instantiation
            assert kernels > 0 and c["HMMA"] >= 16 * kernels, (fam, arch, c, kernels)
            assert c["FFMA"] <= 8 * 16 * kernels, (fam, arch, c, kernels)
