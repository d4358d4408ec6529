"""The reference backend (the official math) against the official float64 fixtures."""
import pytest
import torch

from support import conformance


@pytest.mark.parametrize("mix", [True, False])
def test_reference_stats_contract_consistent(mix):
    # The reference's own statistics (rest_kernels/backends/stats.py): lse is the log-mean-exp of the
    # logits, rsq the centred row sum of squares, rstd follows from rsq; no rsq or rstd without the mix.
    import math
    from rest_kernels.backends.reference import attention_map, mixed_logits
    from rest_kernels.backends.registry import BACKENDS
    q, k, v, w, _ = conformance.emsa_inputs(2, 3, 7, 5, 4, torch.float64, mix)
    w = w.detach() if mix else None
    with torch.no_grad():
        out, lse, rsq, rstd = BACKENDS["reference"].emsa_forward(q, k, v, w, 0.5, 1e-5)
        s = mixed_logits(q, k, w, None, 0.5)
    assert lse.dtype == torch.float64
    torch.testing.assert_close(lse, torch.logsumexp(s, -1) - math.log(5))
    if mix:
        assert rsq.shape == (2, 3, 7) and rstd.shape == (2, 3)
        p = torch.softmax(s, -1)
        torch.testing.assert_close(rsq, ((p - 1 / 5) ** 2).sum(-1))
        torch.testing.assert_close(rstd, torch.rsqrt(p.var(dim=(-2, -1), unbiased=False) + 1e-5))
        with torch.no_grad():  # and the normalised map is (P - 1/M) rstd
            torch.testing.assert_close(attention_map(q, k, w, None, 0.5, 1e-5), (p - 1 / 5) * rstd[..., None, None])
    else:
        assert rsq.shape == (0,) and rstd.shape == (0,)
