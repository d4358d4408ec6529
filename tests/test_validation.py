"""One validation boundary (rest_kernels/_validation.py): the same bad input gets the same exception,
type and message, on every backend and every call path, and each call is validated exactly once."""
import pytest
import torch

import rest_kernels
from conftest import require_backend
from rest_kernels import _validation
from rest_kernels.backends.registry import BACKENDS


def _emsa_args(**over):
    g = torch.Generator().manual_seed(0)
    a = dict(q=torch.randn(2, 2, 5, 4, generator=g), k=torch.randn(2, 2, 3, 4, generator=g),
             v=torch.randn(2, 2, 3, 4, generator=g), mix_weight=torch.randn(2, 2, generator=g), scale=0.5, eps=1e-5)
    a.update(over)
    return a


def _pa_args(**over):
    g = torch.Generator().manual_seed(1)
    a = dict(x=torch.randn(2, 3, 5, 6, generator=g), weight=torch.randn(3, 1, 3, 3, generator=g),
             bias=torch.randn(3, generator=g))
    a.update(over)
    return a


BAD_EMSA = {
    "q-int": dict(q=torch.ones(2, 2, 5, 4, dtype=torch.int32)),
    "k-head-dim": dict(k=torch.randn(2, 2, 3, 5)),
    "v-float64": dict(v=torch.randn(2, 2, 3, 4, dtype=torch.float64)),
    "mix-3x3": dict(mix_weight=torch.randn(3, 3)),
    "no-keys": dict(k=torch.randn(2, 2, 0, 4), v=torch.randn(2, 2, 0, 4)),
    "eps-nan": dict(eps=float("nan")),
    "scale-inf": dict(scale=float("inf")),
    "v-meta": dict(v=torch.randn(2, 2, 3, 4, device="meta")),
}
BAD_PA = {
    "x-3d": dict(x=torch.randn(3, 5, 6)),
    "weight-5x5": dict(weight=torch.randn(3, 1, 5, 5)),
    "bias-float64": dict(bias=torch.randn(3, dtype=torch.float64)),
    "weight-int": dict(weight=torch.ones(3, 1, 3, 3, dtype=torch.int64)),
}


def _emsa_paths(name, a):
    """Every way of calling EMSA on backend `name`: the public function, the custom op, the backend."""
    return {
        "emsa_attention": lambda: rest_kernels.emsa_attention(a["q"], a["k"], a["v"], a["mix_weight"], scale=a["scale"],
                                                              eps=a["eps"], backend=name),
        "custom op": lambda: torch.ops.rest_kernels.emsa_fwd(a["q"], a["k"], a["v"], a["mix_weight"], None, a["scale"],
                                                             a["eps"], name),
        "backend": lambda: BACKENDS[name].emsa_forward(a["q"], a["k"], a["v"], a["mix_weight"], a["scale"], a["eps"]),
    }


def _pa_paths(name, a):
    return {
        "pa_gate": lambda: rest_kernels.pa_gate(a["x"], a["weight"], a["bias"], backend=name),
        "custom op": lambda: torch.ops.rest_kernels.pa_fwd(a["x"], a["weight"], a["bias"], name),
        "backend": lambda: BACKENDS[name].pa_forward(a["x"], a["weight"], a["bias"]),
    }


def _outcome(call):
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the point is which exception
        return type(e), str(e)
    return None, "no exception"


BAD = [("emsa", c) for c in sorted(BAD_EMSA)] + [("pa", c) for c in sorted(BAD_PA)]


@pytest.mark.parametrize("op,case", BAD, ids=lambda x: x)
def test_bad_input_same_error_on_every_backend_and_path(op, case):
    # every registered backend, available here or not: validation comes before any backend work
    paths, args = (_emsa_paths, _emsa_args(**BAD_EMSA[case])) if op == "emsa" else (_pa_paths, _pa_args(**BAD_PA[case]))
    outcomes = {(name, path): _outcome(call) for name in BACKENDS for path, call in paths(name, args).items()}
    distinct = set(outcomes.values())
    assert len(distinct) == 1, "\n".join(f"{k}: {v}" for k, v in outcomes.items())
    (etype, message), = distinct
    assert etype in (TypeError, ValueError), (etype, message)


@pytest.fixture
def count_validations(monkeypatch):
    counts = {"emsa": 0, "pa": 0}
    check_emsa, check_pa = _validation._check_emsa_args, _validation._check_pa_args

    def emsa(*a, **kw):
        counts["emsa"] += 1
        return check_emsa(*a, **kw)

    def pa(*a, **kw):
        counts["pa"] += 1
        return check_pa(*a, **kw)

    monkeypatch.setattr(_validation, "_check_emsa_args", emsa)
    monkeypatch.setattr(_validation, "_check_pa_args", pa)
    return counts


@pytest.mark.parametrize("backend", ["reference", "cpu", "cuda-emu", "triton"])
def test_each_call_is_validated_once(backend, count_validations):
    require_backend(backend)
    if BACKENDS[backend].device_type != "cpu" and backend != "reference":
        pytest.skip(f"{backend} does not serve CPU tensors here")
    a, p = _emsa_args(), _pa_args()
    for path, call in _emsa_paths(backend, a).items():
        count_validations["emsa"] = 0
        call()
        assert count_validations["emsa"] == 1, f"{backend} {path}: validated {count_validations['emsa']} times"
    for path, call in _pa_paths(backend, p).items():
        count_validations["pa"] = 0
        call()
        assert count_validations["pa"] == 1, f"{backend} {path}: validated {count_validations['pa']} times"


def test_a_problem_is_taken_only_by_the_very_same_call():
    # the hand-off matches arguments by identity: an equal but different tensor is validated anew
    a = _emsa_args()
    p = _validation.validate_emsa(a["q"], a["k"], a["v"], a["mix_weight"], None, 0.5, 1e-5)
    with _validation.handing_off(p):
        assert _validation.emsa_problem(a["q"], a["k"], a["v"], p.mix_weight, None, 0.5, 1e-5) is p
        other = _validation.emsa_problem(a["q"].clone(), a["k"], a["v"], p.mix_weight, None, 0.5, 1e-5)
        assert other is not p
        with pytest.raises(ValueError, match="eps must be finite"):
            _validation.emsa_problem(a["q"], a["k"], a["v"], p.mix_weight, None, 0.5, float("nan"))
    assert _validation.emsa_problem(a["q"], a["k"], a["v"], p.mix_weight, None, 0.5, 1e-5) is not p


@pytest.mark.parametrize("backend", ["reference", "cpu", "cuda-emu", "triton"])
def test_without_the_mix_the_backward_takes_empty_or_former_statistics(backend):
    """rsq and rstd are empty without the mix (rest_kernels/backends/stats.py); the (B,h,N) / (B,h)
    tensors the former contract returned are accepted too, unread: the same gradients."""
    require_backend(backend)
    if BACKENDS[backend].device_type != "cpu" and backend != "reference":
        pytest.skip(f"{backend} does not serve CPU tensors here")
    a = _emsa_args(mix_weight=None)
    out, lse, rsq, rstd = torch.ops.rest_kernels.emsa_fwd(a["q"], a["k"], a["v"], None, None, 0.5, 1e-5, backend)
    assert rsq.shape == rstd.shape == (0,)
    dout = torch.randn_like(out)
    bwd = torch.ops.rest_kernels.emsa_bwd
    empty = bwd(dout, a["q"], a["k"], a["v"], None, out, lse, rsq, rstd, 0.5, 1e-5, backend)
    former = bwd(dout, a["q"], a["k"], a["v"], None, out, lse, torch.zeros(2, 2, 5), torch.zeros(2, 2), 0.5, 1e-5,
                 backend)
    for x, y in zip(empty, former):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match=r"rsq must have shape \(0,\)"):
        bwd(dout, a["q"], a["k"], a["v"], None, out, lse, torch.zeros(2, 2, 4), rstd, 0.5, 1e-5, backend)
