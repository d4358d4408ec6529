"""Backends declare what they serve as data, and a refusal lists every reason derived from it."""
import pytest
import torch

from rest_kernels.backends.registry import BACKENDS


def _meta(*shape, dtype=torch.float64):
    return torch.empty(*shape, dtype=dtype, device="meta")


@pytest.mark.parametrize("name", [n for n, b in BACKENDS.items() if b.max_batch_heads is not None])
def test_every_declared_limit_is_a_reason_at_once(name):
    b = BACKENDS[name]
    B, h, d = b.max_batch_heads + 1, 1, (b.max_head_dim or 0) + 1
    q = _meta(B, h, 3, d)
    reasons = b.emsa_not_supported_reasons(q, q, q, None)
    assert any("serves" in r for r in reasons)                 # meta is not its device type
    assert any("supports dtypes" in r for r in reasons)        # float64
    assert any("head dims up to" in r for r in reasons)
    assert any("batch x heads up to" in r for r in reasons)
    assert b.emsa_unsupported_reason(q, q, q, None) == "; ".join(reasons)


def test_mix_heads_limit_is_declared_and_enforced():
    t = BACKENDS["triton"]
    h = t.max_mix_heads + 1
    q = _meta(1, h, 3, 8, dtype=torch.float32)
    assert any("head mix for up to" in r for r in t.emsa_not_supported_reasons(q, q, q, _meta(h, h)))
    assert not any("head mix" in r for r in t.emsa_not_supported_reasons(q, q, q, None))
    d = t.max_mix_head_dim + 1  # a head dim it fuses without the mix, not with it
    q = _meta(1, 2, 3, d, dtype=torch.float32)
    assert any(f"head dims up to {t.max_mix_head_dim}, got {d}" in r
               for r in t.emsa_not_supported_reasons(q, q, q, _meta(2, 2)))
    assert not any("head dims" in r for r in t.emsa_not_supported_reasons(q, q, q, None))


def test_reference_serves_everything():
    q = _meta(2, 3, 4, 5)
    assert BACKENDS["reference"].emsa_not_supported_reasons(q, q, q, _meta(3, 3)) == []
    assert BACKENDS["reference"].pa_unsupported_reason(_meta(1, 2, 3, 3), _meta(2, 1, 3, 3), None) is None


@pytest.mark.parametrize("name", list(BACKENDS))
def test_declarations_have_the_declared_types(name):
    b = BACKENDS[name]
    assert all(isinstance(d, torch.dtype) for d in b.dtypes)
    for limit in (b.max_head_dim, b.max_mix_heads, b.max_mix_head_dim, b.max_batch_heads):
        assert limit is None or (isinstance(limit, int) and limit > 0)


@pytest.mark.parametrize("triton_v,numpy_v,refused", [("3.6.0", "2.4.6", True), ("3.8.0", "2.4.6", False),
                                                        ("3.6.0", "2.3.1", False), ("3.10.1", "2.5.0", False)])
def test_interpreter_refuses_a_known_bad_triton_numpy_pair(monkeypatch, triton_v, numpy_v, refused):
    triton = pytest.importorskip("triton")
    import numpy
    from rest_kernels.backends import triton_backend
    monkeypatch.setattr(triton, "__version__", triton_v)
    monkeypatch.setattr(numpy, "__version__", numpy_v)
    reason = triton_backend._interpreter_incompatibility()
    assert (reason is not None) == refused
    if refused:
        assert triton_v in reason and numpy_v in reason and "Triton >= 3.8" in reason


def test_sdpa_declares_plain_attention_on_any_device_and_no_pa():
    sdpa = BACKENDS["sdpa"]
    assert sdpa.device_type == "" and not sdpa.serves_mix and not sdpa.serves_pa and sdpa.auto_device_type is None
    q = _meta(2, 3, 5, 4)
    assert sdpa.emsa_not_supported_reasons(q, q, q, None) == []  # any device: meta too
    (reason,) = sdpa.emsa_not_supported_reasons(q, q, q, _meta(3, 3))
    assert "plain softmax attention only" in reason
    assert "attention only, not pa_gate" in sdpa.pa_unsupported_reason(_meta(1, 2, 3, 3), _meta(2, 1, 3, 3), None)
    # every reason at once: a refused dtype and the mix
    assert len(sdpa.emsa_not_supported_reasons(q.to(torch.int32), q, q, _meta(3, 3))) == 2
