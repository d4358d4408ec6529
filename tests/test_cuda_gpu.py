"""The `cuda` backend on a real GPU: the same checks as tests/test_cuda_emu.py on device "cuda".
Skipped without a GPU (or without the extension's CUDA part)."""
import pytest
import torch

from conftest import require_backend
from test_cuda_emu import SHAPES as EMU_SHAPES
from support.conformance import check_emsa_op, check_pa_op

pytestmark = pytest.mark.gpu
BACKEND = "cuda"


@pytest.fixture(autouse=True)
def _needs_backend():
    require_backend(BACKEND)


# The emulated tests' shapes, plus a full ResT stage-1 problem that is too slow to emulate.
SHAPES = EMU_SHAPES + [(2, 1, 3136, 49, 64)]


@pytest.mark.parametrize("mix", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}h{}N{}M{}d{}".format(*s))
def test_emsa_op_float32(shape, mix):
    check_emsa_op(BACKEND, *shape, torch.float32, mix=mix, device="cuda")


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("mix", [True, False])
def test_emsa_op_layouts(layout, mix):
    check_emsa_op(BACKEND, 2, 3, 35, 34, 24, torch.float32, mix=mix, layout=layout, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 37, 45, 32), (1, 2, 40, 17, 96), (2, 2, 784, 49, 64)],
                         ids=lambda s: "B{}h{}N{}M{}d{}".format(*s))
@pytest.mark.parametrize("mix", [True, False])
def test_emsa_op_low_precision(shape, dtype, mix):
    check_emsa_op(BACKEND, *shape, dtype, mix=mix, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_pa_op(dtype, bias):
    check_pa_op(BACKEND, 2, 5, 7, 9, dtype, bias=bias, device="cuda")
    check_pa_op(BACKEND, 1, 64, 56, 56, dtype, bias=bias, device="cuda", channels_last=True)


def test_gpu_matches_emulation():
    """The GPU and the emulation run the same source: results agree to float32 rounding."""
    require_backend("cuda-emu")
    from support.conformance import emsa_inputs
    q, k, v, w, _ = emsa_inputs(2, 3, 37, 45, 24, torch.float32, True, "model")
    ops = torch.ops.rest_kernels_C
    args = (q.detach(), k.detach(), v.detach(), w.detach().float())
    emu = ops.emsa_fwd_emu(*args, 24 ** -0.5, 1e-5)
    gpu = ops.emsa_fwd(*(t.cuda() for t in args), 24 ** -0.5, 1e-5)
    for a, b in zip(emu, gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_mma_fragment_layout_matches_the_hardware(dtype):
    """csrc/cuda/mma.cuh's fragment loaders against the GPU's own mma.sync: D = A B exactly (small
    integers), the check the emulation cannot make of itself."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-4, 5, (16, 16), generator=g).to(dtype)
    b = torch.randint(-4, 5, (16, 8), generator=g).to(dtype)
    d = torch.ops.rest_kernels_selftest.mma_fragments(a.cuda(), b.cuda(), 0)
    assert torch.equal(d.cpu(), a.float() @ b.float())

