"""The model zoo's use of rest_kernels (issue 17, item 7): rest/ reaches rest_kernels only through its
public API (the names of rest_kernels.__all__), so the kernels' internals can change without breaking
the models; every public name is documented in docs/api.md.
"""
from __future__ import annotations

import ast
import pathlib

import torch
import torch.nn.functional as F

import rest_kernels
from rest import EMSA

ROOT = pathlib.Path(__file__).resolve().parents[1]
PUBLIC = set(rest_kernels.__all__) | {"__version__"}


# --------------------------------------------------------------------------- public API only
def private_uses(source: str, filename: str = "<string>") -> list[str]:
    """Every use in `source` of a rest_kernels name that is not public: an import of a submodule
    (import rest_kernels.x, from rest_kernels.x import y), a non-public name imported from the package
    (from rest_kernels import _y), or an attribute of the package that is not public
    (rest_kernels.backends...)."""
    tree = ast.parse(source, filename)
    aliases = set()  # the names the package is bound to in this module
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("rest_kernels."):
                    found.append(f"{filename}:{node.lineno}: import {a.name}")
                elif a.name == "rest_kernels":
                    aliases.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("rest_kernels."):
                found.append(f"{filename}:{node.lineno}: from {node.module} import ...")
            elif node.module == "rest_kernels":
                found += [f"{filename}:{node.lineno}: from rest_kernels import {a.name}"
                          for a in node.names if a.name not in PUBLIC]
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr not in PUBLIC):
            found.append(f"{filename}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_the_checker_finds_private_uses():
    bad = ("import rest_kernels.ops\n"
           "import rest_kernels as rk\n"
           "from rest_kernels.backends.registry import check_name\n"
           "from rest_kernels import _validation, emsa_attention\n"
           "rk.backends.reference.attention_map\n"
           "rk.pa_gate\n")
    found = private_uses(bad)
    assert len(found) == 4, found
    assert all(s in " ".join(found) for s in ("rest_kernels.ops", "backends.registry", "_validation",
                                               "rk.backends"))
    good = "import rest_kernels\nfrom rest_kernels import use_backend\nrest_kernels.emsa_attention_map\n"
    assert private_uses(good) == []


def test_models_import_only_the_public_rest_kernels_api():
    files = sorted((ROOT / "rest").rglob("*.py"))
    assert files
    found = [use for f in files for use in private_uses(f.read_text(), str(f.relative_to(ROOT)))]
    assert found == [], "rest/ uses rest_kernels internals:\n" + "\n".join(found)


def test_every_public_name_is_documented():
    doc = (ROOT / "docs" / "api.md").read_text()
    missing = [name for name in rest_kernels.__all__ if f"rest_kernels.{name}" not in doc]
    assert missing == [], f"rest_kernels.__all__ names missing from docs/api.md: {missing}"


# --------------------------------------------------------------------------- attn_drop path
def test_attention_dropout_uses_the_public_attention_map(monkeypatch):
    """EMSA with attn_drop in training drops out rest_kernels.emsa_attention_map's map; in eval (or
    with attn_drop 0) the fused op runs and the map is never formed."""
    calls = []
    real = rest_kernels.emsa_attention_map

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rest_kernels, "emsa_attention_map", spy)
    torch.manual_seed(0)
    attn = EMSA(16, 2, qkv_bias=True, attn_drop=0.5, sr_ratio=2, apply_transform=True).double()
    x = torch.randn(2, 6 * 5, 16, dtype=torch.float64)
    with torch.no_grad():
        attn.eval()(x, 6, 5)
    assert calls == []
    attn.train()
    torch.manual_seed(3)
    got = attn(x, 6, 5)
    assert len(calls) == 1
    # the same computation written out, with the same dropout mask
    B, N, C, h = 2, 30, 16, 2
    q = attn.q(x).view(B, N, h, C // h).transpose(1, 2)
    m = attn.sr_norm(attn.sr(x.transpose(1, 2).reshape(B, C, 6, 5)).flatten(2).transpose(1, 2))
    kv = attn.kv(m).view(B, m.shape[1], 2, h, C // h)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    torch.manual_seed(3)
    amap = real(q, k, attn.transform_conv.weight, attn.transform_conv.bias, scale=attn.scale,
                eps=attn.transform_norm.eps)
    out = (F.dropout(amap, 0.5, True) @ v).transpose(1, 2).reshape(B, N, C)
    torch.testing.assert_close(got, attn.proj(out))
    got.sum().backward()
    assert attn.transform_conv.weight.grad is not None and attn.q.weight.grad is not None
