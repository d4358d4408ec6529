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
    dO V^T, dS K, dS^T Q, Y^T dO) as HMMA on every built arch, and FFMA only for the element-wise
    work, kernel by kernel. Why the FFMA bound: the element-wise work on the logits a lane holds (8
    or 16 of a tile) -- the head mix (up to 8 FMAs per logit and output head, at two places in the
    mixed dk / dv kernel), the softmax and centred statistics, the exp range reductions -- is at
    most 257 FFMA per instantiation as built (static counts, sm_80 = sm_90). One product of a 16-row
    tile over a 64-wide head dim left on SIMT is 8 logits x 64 = 512 FFMA per lane once unrolled
    (the products' loops are), so at most 384 per kernel fails if any product falls back to FFMA;
    the emulated mma counts (tests/test_cuda_emu.py) hold each call to the products of the tiling."""
    rows, archs = usage
    counts = cuda_resources.sass_counts(_extension.load()[0].__file__, by="kernel")
    families = ("emsa_stats_mma_kernel", "emsa_fwd_mma_kernel", "emsa_bwd_mma_kernel")
    for arch in archs:
        for fam in families:
            kernels = [r["kernel"] for r in rows if r["family"] == fam and r["arch"] == arch]
            assert kernels, (fam, arch)
            for kernel in kernels:
                c = counts[(kernel, arch)]
                # a product's head-dim loop is unrolled by 2 chunks: at least one such step of
                # 4 n-tiles (or of 2 n-tiles in two products)
                assert c["HMMA"] >= 8, (kernel, arch, c)
                assert c["FFMA"] <= 384, (kernel, arch, c)

def test_simt_products_read_shared_memory_16_bytes_at_a_time(usage):
    """The SIMT EMSA kernels (float32; 16-bit calls mixing more than 8 heads in the backward) form
    their logits and dO V^T with tile_dot (csrc/cuda/emsa_kernels.cuh), which reads 4 head-dim columns
    of each staged row per 16-byte shared load: 9 loads feed 32 FMAs, where 32-bit loads fed 8 and
    bound the loop by shared memory; their P V-like products (axpy_row) read 4 accumulators' columns
    per 16-byte load. Every such kernel on every built arch has at least one step of tile_dot
    (9 LDS.128) in its SASS."""
    rows, archs = usage
    counts = cuda_resources.sass_counts(_extension.load()[0].__file__, by="kernel")
    for arch in archs:
        for fam in ("emsa_stats_kernel", "emsa_fwd_kernel", "emsa_bwd_kernel"):
            kernels = [r["kernel"] for r in rows if r["family"] == fam and r["arch"] == arch]
            assert kernels, (fam, arch)
            for kernel in kernels:
                assert counts[(kernel, arch)]["LDS.128"] >= 9, (kernel, arch, counts[(kernel, arch)])
