"""One conformance module for every backend, generated from the backends' declarations.

For each registered backend and each device type it serves in this process (rest_kernels/backends:
`device_type`, `dtypes`), every dtype it declares runs the shared checks of tests/support/conformance.py:
the official attention and PA cases (float64 and float32 against the official fixtures), the
statistics contract, torch.library.opcheck of the custom ops, and gradcheck where float64 is
declared. A backend that is not usable here skips with its own reason. Backend-specific tests (tile
boundaries, thread schedules, compile graphs) stay in the backend's own test file.
"""
import pytest
import torch

from support import conformance
from conftest import require_backend
from rest_kernels.backends.registry import BACKENDS
from support.reference_data import attention_cases


def _device_types(backend):
    if backend.name == "reference" or not backend.device_type:  # any device: the CPU, and a GPU where there is one
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [backend.device_type]


def _params(dtypes_wanted):
    """(backend, device, dtype) for every backend, every device type it serves here, every dtype
    of `dtypes_wanted` it declares (the reference declares none: it serves every floating dtype)."""
    params = []
    for name, b in BACKENDS.items():
        for device in _device_types(b):
            for dtype in dtypes_wanted:
                if name != "reference" and dtype not in b.dtypes:
                    continue
                marks = [pytest.mark.gpu] if device == "cuda" else []
                params.append(pytest.param(name, device, dtype, marks=marks,
                                           id=f"{name}-{device}-{str(dtype).replace('torch.', '')}"))
    return params


def _usable(name, device, mix=False, pa=False):
    """Skips what this backend does not serve here (unavailable, no GPU) or at all (its declarations:
    the `sdpa` backend serves neither the head mix nor PA)."""
    require_backend(name)
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if (mix and not BACKENDS[name].serves_mix) or (pa and not BACKENDS[name].serves_pa):
        pytest.skip(f"{name} declares that it does not serve {'PA' if pa else 'the head mix'}")


def _served_attention_cases(name):
    """The official attention cases `name` serves: all, or those without the head mix (one head)."""
    return None if BACKENDS[name].serves_mix else [c for c in attention_cases() if c["config"]["num_heads"] == 1]


@pytest.mark.parametrize("name,device,dtype", _params((torch.float64, torch.float32)))
def test_official_attention_cases(name, device, dtype):
    _usable(name, device)
    conformance.check_attention_cases(name, dtype, _served_attention_cases(name), device=device)


@pytest.mark.parametrize("name,device,dtype", _params((torch.float64, torch.float32)))
def test_official_pa_cases(name, device, dtype):
    _usable(name, device, pa=True)
    conformance.check_pa_cases(name, dtype, device=device)


@pytest.mark.parametrize("mix", [True, False])
@pytest.mark.parametrize("name,device,dtype", _params((torch.float64, torch.float32, torch.bfloat16)))
def test_statistics(name, device, dtype, mix):
    _usable(name, device, mix=mix)
    # M = 140: several key tiles of every tiled backend
    conformance.check_emsa_stats(name, 2, 3, 29, 140, 8, dtype, mix=mix, device=device)


@pytest.mark.parametrize("mix", [True, False])
@pytest.mark.parametrize("name,device,dtype", _params((torch.float32, torch.float64, torch.bfloat16)))
def test_opcheck_emsa(name, device, dtype, mix):
    _usable(name, device, mix=mix)
    conformance.opcheck_emsa(name, dtype, device=device, mix=mix)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name,device,dtype", _params((torch.float32,)))
def test_opcheck_pa(name, device, dtype, bias, channels_last):
    _usable(name, device, pa=True)
    conformance.opcheck_pa(name, dtype, device=device, bias=bias, channels_last=channels_last)


@pytest.mark.parametrize("mix", [True, False])
@pytest.mark.parametrize("name,device,dtype", _params((torch.float64,)))
def test_gradcheck_emsa(name, device, dtype, mix):
    _usable(name, device, mix=mix)
    conformance.gradcheck_emsa(name, mix=mix, device=device)
    conformance.gradcheck_emsa(name, mix=mix, B=2, h=3, N=7, M=5, d=2, device=device)
