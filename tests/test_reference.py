"""The reference backend (the official math) against the official float64 fixtures."""
import pytest
import torch

import conformance


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attention_cases_reference(dtype):
    conformance.check_attention_cases("reference", dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pa_cases_reference(dtype):
    conformance.check_pa_cases("reference", dtype)


@pytest.mark.parametrize("mix", [True, False])
def test_reference_stats_contract_consistent(mix):
    # The reference's own statistics: lse is a log-sum-exp, rstd follows from rsq.
    from rest_kernels.backends.registry import BACKENDS
    q, k, v, w, _ = conformance.emsa_inputs(2, 3, 7, 5, 4, torch.float64, mix)
    out, lse, rsq, rstd = BACKENDS["reference"].emsa_forward(q, k, v, w.detach() if mix else None, 0.5, 1e-5)
    assert lse.shape == (2, 3, 7) and rsq.shape == (2, 3, 7) and rstd.shape == (2, 3)
    if mix:
        var = rsq.sum(-1) / (7 * 5) - 1 / 25
        torch.testing.assert_close(rstd, torch.rsqrt(var + 1e-5).float())
