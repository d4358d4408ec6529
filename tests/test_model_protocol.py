"""The model protocol of ResT and ResTv2 (timm's, as timm's own models have it; rest/backbone.py):
features and head, intermediates and pruning, feature_info, the classifier, gradient checkpointing,
torch.fx tracing and the TorchScript refusal. Every test runs on both families (the `family` fixture).
None of this needs timm; tests/test_timm.py checks timm's tools on it."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import rest
import rest_kernels
from rest import (EMSA, PA, EMSAv2, ResT, ResTV2, rest_base, rest_large, rest_lite, rest_small, restv2_base,
                  restv2_large, restv2_small, restv2_tiny)

X = torch.randn(2, 3, 61, 45, generator=torch.Generator().manual_seed(0))  # not multiples of 32
SIZES = [(16, 12), (8, 6), (4, 3), (2, 2)]  # ceil(61 / r), ceil(45 / r) at strides 4, 8, 16, 32


# a small model of each family: (class, configuration)
FAMILIES = {
    "ResT": (ResT, dict(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 2, 1, 1), qkv_bias=True,
                        apply_transform=True, num_classes=5)),
    "ResTV2": (ResTV2, dict(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 2, 1, 1),
                            num_classes=5)),
}
_family = ["ResT"]


@pytest.fixture(autouse=True, params=list(FAMILIES))
def family(request):
    """Runs every test of this file on each family: small() builds the current one."""
    _family[0] = request.param
    yield request.param
    _family[0] = "ResT"


def small(**kwargs):
    torch.manual_seed(0)
    cls, cfg = FAMILIES[_family[0]]
    return cls(**{**cfg, **kwargs})


def hooked_outputs(model, names):
    """Forward hooks keeping the output of each named module; returns (outputs by name, handles)."""
    modules = dict(model.named_modules())
    out = {}
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: out.__setitem__(n, o)) for n in names]
    return out, handles


# --------------------------------------------------------------------------- features and head
def test_forward_is_the_head_of_the_final_normed_map():
    model = small().eval()
    with torch.no_grad():
        features = model.forward_features(X)
        logits = model(X)
        final, maps = model.forward_intermediates(X)
        pooled = model.forward_head(features, pre_logits=True)
    assert features.shape == (2, 128, *SIZES[3])
    assert model.num_features == model.head_hidden_size == 128
    torch.testing.assert_close(model.forward_head(features), logits, rtol=0, atol=0)
    torch.testing.assert_close(final, features, rtol=0, atol=0)
    torch.testing.assert_close(maps[3], features, rtol=0, atol=0)
    torch.testing.assert_close(pooled, features.mean((2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.head(pooled), logits, rtol=0, atol=0)


def test_unpooled_head_keeps_the_map_nchw():
    model = small(global_pool="").eval()
    with torch.no_grad():
        features = model.forward_features(X)
        logits = model(X)
        assert torch.equal(model.forward_head(features, pre_logits=True), features)
    # the linear head on every pixel's channels: (B, num_classes, H, W)
    assert logits.shape == (2, 5, *SIZES[3])
    for i, j in [(0, 0), (1, 1)]:
        torch.testing.assert_close(logits[:, :, i, j], model.head(features[:, :, i, j]))
    # without a head: the final map itself
    model.reset_classifier(0)
    with torch.no_grad():
        assert torch.equal(model(X), features)
    headless = small(num_classes=0, global_pool="").eval()
    headless.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(headless(X), features)
    # and back to pooled logits
    model.reset_classifier(3, "avg")
    with torch.no_grad():
        assert model(X).shape == (2, 3)


def test_classifier_access_and_reset():
    model = small().double()
    assert model.get_classifier() is model.head and model.head.out_features == 5
    model.reset_classifier(7)
    assert model.get_classifier() is model.head and model.num_classes == 7
    assert model.head.weight.dtype == torch.float64 and torch.all(model.head.bias == 0)
    assert model.global_pool == "avg"
    model.reset_classifier(0)
    assert isinstance(model.head, nn.Identity) and model.num_classes == 0


@pytest.mark.parametrize("call,name", [
    (lambda m: m.reset_classifier(-1), "num_classes"),
    (lambda m: m.reset_classifier(2.5), "num_classes"),
    (lambda m: m.reset_classifier(3, "max"), "global_pool"),
    (lambda m: small(global_pool="token"), "global_pool"),
    (lambda m: m.forward_head(torch.zeros(2, 64, 2, 2)), "x"),
    (lambda m: m.forward_head(torch.zeros(2, 128)), "x"),
    (lambda m: m.set_grad_checkpointing("yes"), "enable"),
])
def test_bad_arguments_name_themselves(call, name):
    with pytest.raises((TypeError, ValueError), match=f"^{name} must"):
        call(small())


# --------------------------------------------------------------------------- intermediates and pruning
def test_forward_intermediates_selects_formats_and_stops():
    model = small().eval()
    with torch.no_grad():
        full = model.forward_intermediates(X, intermediates_only=True)
        assert [tuple(m.shape) for m in full] == [(2, c, *s) for c, s in zip((16, 32, 64, 128), SIZES)]
        last_two = model.forward_intermediates(X, indices=2, intermediates_only=True)
        picked = model.forward_intermediates(X, indices=[0, -1], intermediates_only=True)
        nhwc = model.forward_intermediates(X, indices=(1,), output_fmt="NHWC", intermediates_only=True)
        _, norm_flag = model.forward_intermediates(X, norm=True)
    for got, want in [(last_two, full[2:]), (picked, [full[0], full[3]]), (norm_flag, full)]:
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(nhwc[0], full[1].permute(0, 2, 3, 1))
    # stop_early: nothing after the last wanted stage runs, and the first item is the last map computed
    seen, handles = hooked_outputs(model, ["stage2", model._STAGE_NAMES[2][0], "stage3", "stage4", "norm"])
    with torch.no_grad():
        final, maps = model.forward_intermediates(X, indices=[1], stop_early=True)
    for h in handles:
        h.remove()
    assert set(seen) == {"stage2"} and torch.equal(final, full[1]) and torch.equal(maps[0], full[1])


@pytest.mark.parametrize("kwargs,name", [
    (dict(indices=0), "indices"), (dict(indices=5), "indices"), (dict(indices=[4]), "indices"),
    (dict(indices=[]), "indices"), (dict(indices="all"), "indices"), (dict(indices=[0.5]), "indices"),
    (dict(output_fmt="NLC"), "output_fmt"),
])
def test_forward_intermediates_bad_arguments(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        small().forward_intermediates(X, **kwargs)


def test_prune_intermediate_layers_drops_what_the_maps_do_not_need():
    full = small().eval()
    pruned = small().eval()
    assert pruned.prune_intermediate_layers((0, 2)) == [0, 2]
    keys = set(pruned.state_dict())
    assert not any(k.startswith(("stage4", pruned._STAGE_NAMES[3][0] + ".", "norm", "head")) for k in keys)
    assert keys < set(full.state_dict())
    assert pruned.num_features == pruned.head_hidden_size == 64 and isinstance(pruned.head, nn.Identity)
    assert pruned.num_classes == 0 and pruned.global_pool == ""
    with torch.no_grad():
        want = full.forward_intermediates(X, intermediates_only=True)
        got = pruned.forward_intermediates(X, indices=[0, 2], intermediates_only=True)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[2])
        # the pruned model's features and forward end at its last stage
        assert torch.equal(pruned.forward_features(X), want[2]) and torch.equal(pruned(X), want[2])
    # stage 4 kept: so is the final norm (stage 4's map includes it), also with prune_norm
    kept = small().eval()
    assert kept.prune_intermediate_layers(2, prune_norm=True) == [2, 3]
    assert isinstance(kept.norm, nn.LayerNorm) and kept.num_features == 128
    with torch.no_grad():
        assert torch.equal(kept.forward_intermediates(X, indices=1, intermediates_only=True)[0], want[3])


def test_feature_info_names_the_called_modules_whose_outputs_are_the_maps():
    model = small().eval()
    info = model.feature_info
    assert [(f["num_chs"], f["reduction"]) for f in info] == [(16, 4), (32, 8), (64, 16), (128, 32)]
    seen, handles = hooked_outputs(model, [f["module"] for f in info])
    with torch.no_grad():
        maps = model.forward_intermediates(X, intermediates_only=True)
        seen_in_intermediates = [seen[f["module"]] for f in info]
        seen.clear()
        model(X)  # the plain forward calls them too
    for h in handles:
        h.remove()
    assert all(torch.equal(a, b) for a, b in zip(seen_in_intermediates, maps))
    assert all(torch.equal(seen[f["module"]], m) for f, m in zip(info, maps))


# --------------------------------------------------------------------------- gradient checkpointing
def train_run(model, x, seed=3):
    """A train step's output and gradients: {"output", "input", parameter name: gradient}."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # stochastic depth and dropout draw the same masks in every run
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.square().sum().backward()
    return {"output": out, "input": x.grad, **{n: p.grad for n, p in model.named_parameters()}}


def assert_equal_runs(got, want):
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_grad_checkpointing_gives_the_same_outputs_and_gradients(monkeypatch, family):
    model = small(drop_path_rate=0.2, **(dict(drop_rate=0.1) if family == "ResT" else {})).train()
    plain = train_run(model, X)
    calls = []
    real = rest.layers.checkpoint
    monkeypatch.setattr(rest.layers, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.set_grad_checkpointing()
    assert all(stage.grad_checkpointing for _, stage in model._stage_pairs())
    checkpointed = train_run(model, X)
    assert len(calls) == sum(model.depths)  # every block ran under the checkpoint
    assert_equal_runs(checkpointed, plain)
    with torch.no_grad():  # nothing to save: no checkpoint
        model.eval()(X)
    assert len(calls) == sum(model.depths)
    model.set_grad_checkpointing(False)
    train_run(model.train(), X)
    assert len(calls) == sum(model.depths)


# --------------------------------------------------------------------------- torch.fx
LEAF_CALLS = {"attention", "position_gate", "linear", "batch_norm_2d", "to_model_layout", "_layer_norm_last_dim"}


VARIANT_BUILDERS = {"ResT": [rest_lite, rest_small, rest_base, rest_large],
                    "ResTV2": [restv2_tiny, restv2_small, restv2_base, restv2_large]}


@pytest.mark.parametrize("variant", range(4), ids=["lite/tiny", "small", "base", "large"])
def test_symbolic_trace_equals_eager_bitwise(variant, family):
    if family == "ResTV2" and variant in (1, 2):
        # the suite's time: ResTv2-S and -B are ResTv2-T's modules with more blocks (-L has its own widths)
        pytest.skip("ResTv2-S / -B: the modules of ResTv2-T, more of them")
    model = VARIANT_BUILDERS[family][variant]().eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    traced = torch.fx.symbolic_trace(model)
    leaves = {n.target.__name__ for n in traced.graph.nodes if n.op == "call_function"
              and getattr(n.target, "__module__", "").startswith("rest.")}
    assert leaves == LEAF_CALLS
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


def test_symbolic_trace_trains_like_eager_and_decides_when_it_runs():
    model = small()
    traced = torch.fx.symbolic_trace(model.train())
    assert_equal_runs(train_run(traced, X), train_run(model, X))
    # the backend, layout and GEMM choices are made when the traced module runs, as in eager
    model.eval()
    traced = torch.fx.symbolic_trace(model)
    with rest_kernels.use_backend("reference"), torch.no_grad():
        assert torch.equal(traced(X), model(X))


# --------------------------------------------------------------------------- TorchScript
@pytest.mark.parametrize("module", [lambda: small(), lambda: EMSA(8, 2), lambda: EMSAv2(8, 2, sr_ratio=2), lambda: PA(8)],
                         ids=["model", "EMSA", "EMSAv2", "PA"])
def test_torchscript_is_refused_with_the_reason(module):
    with pytest.raises(RuntimeError, match=r"does not support TorchScript.*deprecated"):
        torch.jit.script(module())
