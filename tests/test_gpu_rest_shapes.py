"""The GPU backends at ResT's real problem sizes: forward and backward of emsa_attention and pa_gate on
backend "triton" and "cuda" against "reference", in float32, float16 and bfloat16.

Shapes: every stage of both shape families (lite/small: head dim 64; base/large: 96), at 224 x 224 with
batches 1 and 64 and at a detection-size 800 x 1216 input with batch 1, as bench/_cases.py lists them
(the table the benchmark measures): EMSA (h, N, M, d) = (1, 3136, 49), (2, 784, 49), (4, 196, 49),
(8, 49, 49) at 224 px and (1, 60800, 950), (2, 15200, 950), (4, 3800, 950), (8, 950, 950) at the
detection size; the head mix where ResT has it (h > 1); PA on the stage's (C, H, W) map with a bias.
q, k, v are the strided views rest.EMSA produces. The other GPU modules (test_cuda_gpu.py,
test_triton_backend.py) check awkward sizes and the custom-op plumbing at small shapes; this one runs
the grids, key-block loops and float32 accumulations at the lengths ResT gives them.

Tolerances are conformance.py's: float32 within 1e-4 of the tensor's scale against float64; float16 and
bfloat16 by the flash-attention rule (the error against float64 at most twice the reference's own error
in that dtype, plus rounding). A shape a backend refuses with a reason (the triton head mix in float32
beyond its shared-memory limit: h 8, d 96) is skipped with that reason, as "auto" would fall back.

GPU only: skipped without a CUDA device (and under the Triton interpreter). About 300 cases; on one GPU
run them in parallel, e.g. `python -m pytest tests/test_gpu_rest_shapes.py -n 8 --dist loadgroup` (what
scripts/gpu_check.sh does): Triton compiles each kernel configuration once per process.
"""
import os
import sys

import pytest
import torch

from support import conformance
from conftest import require_backend
from rest_kernels.backends.registry import BACKENDS as REGISTRY
from rest_kernels.backends.triton_backend import interpreter_on

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: `bench`
from bench._cases import stage_shapes  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or interpreter_on(),
                                 reason="needs a CUDA device (and the Triton interpreter off)")]

BACKENDS = ("triton", "cuda")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: batches per input: 1 and 64 (a training batch) at 224 px, 1 at the detection size
BATCHES = {"224": (1, 64), "det": (1,)}

try:  # pytest-xdist: one worker per Triton kernel configuration (see _params)
    import xdist  # noqa: F401
    HAVE_XDIST = True
except ImportError:
    HAVE_XDIST = False


def _params(op):
    """(shape, batch, dtype, backend) cases. Under pytest-xdist with --dist loadgroup the triton cases of
    one stage and dtype (the same kernel configuration at every batch and input size) go to one worker,
    which compiles that configuration once instead of every worker compiling it."""
    params = []
    for shape in stage_shapes():
        for batch in BATCHES[shape.input]:
            for dtype in DTYPES:
                for backend in BACKENDS:
                    dt = str(dtype).replace("torch.", "")
                    group = f"{op}-{backend}-{dt}-{shape.family}-s{shape.stage}"
                    marks = [pytest.mark.xdist_group(group)] if HAVE_XDIST and backend == "triton" else []
                    params.append(pytest.param(shape, batch, dtype, backend, marks=marks,
                                               id=f"{shape.label.replace('/', '_')}-B{batch}-{dt}-{backend}"))
    return params


@pytest.mark.parametrize("shape,batch,dtype,backend", _params("emsa"))
def test_emsa_forward_backward(shape, batch, dtype, backend):
    require_backend(backend)
    mix = shape.h > 1  # ResT mixes heads wherever it has several (rest/modules.py)
    q = torch.empty(batch, shape.h, shape.N, shape.d, dtype=dtype, device="cuda")
    k = torch.empty(batch, shape.h, shape.M, shape.d, dtype=dtype, device="cuda")
    w = torch.empty(shape.h, shape.h, device="cuda") if mix else None
    # the backend's own answer for this call and its backward (on a GPU the triton backend compiles
    # the call for the device and refuses what does not fit it)
    reason = REGISTRY[backend].emsa_unsupported_reason(q, k, k, w, needs_backward=True)
    if reason is not None:
        pytest.skip(reason)
    conformance.check_emsa_op(backend, batch, shape.h, shape.N, shape.M, shape.d, dtype, mix=mix, device="cuda")


@pytest.mark.parametrize("shape,batch,dtype,backend", _params("pa"))
def test_pa_forward_backward(shape, batch, dtype, backend):
    require_backend(backend)
    x = torch.empty(batch, shape.C, shape.H, shape.W, dtype=dtype, device="cuda")
    reason = REGISTRY[backend].pa_unsupported_reason(x, torch.empty(shape.C, 1, 3, 3, dtype=dtype, device="cuda"),
                                                     torch.empty(shape.C, dtype=dtype, device="cuda"),
                                                     needs_backward=True)
    if reason is not None:
        pytest.skip(reason)
    conformance.check_pa_op(backend, batch, shape.C, shape.H, shape.W, dtype, bias=True, device="cuda")
