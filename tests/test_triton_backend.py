"""The `triton` backend: official cases, op-level checks, statistics, opcheck, saved bytes,
torch.compile / torch.export as single nodes.

Without a GPU everything runs on the CPU under TRITON_INTERPRET=1 (tests/conftest.py). The same
checks run on device "cuda" (marked `gpu`) when a GPU is present; then the interpreter is off and
the CPU variants skip (the backend serves one device type per process).
"""
import pytest
import torch

from support import conformance
import rest_kernels
from conftest import require_backend
from rest_kernels.backends.registry import BackendUnavailableError
from rest_kernels.backends.triton_backend import interpreter_on


@pytest.fixture(autouse=True)
def _triton_available():
    require_backend("triton")


DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreter_on(), reason="triton serves CPU tensors only "
                                                                               "under TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or interpreter_on(),
                                                                    reason="needs a CUDA device (interpreter off)")]),
]
LOWP = [torch.float16, torch.bfloat16]


# --------------------------------------------------------------------------- official cases
# --------------------------------------------------------------------------- op level, awkward sizes
#  (B, h, N, M, d, mix, layout): N, M of 1; odd and non-power-of-two head dims; M spanning several
#  key blocks (the interpreter's key block is 64 or 128 wide, a GPU's 32 or 64); N not a multiple
#  of the query block; every layout rest.EMSA and users produce.
EMSA_CASES = [
    (1, 1, 1, 1, 3, False, "model"),
    (1, 1, 1, 3, 3, True, "contiguous"),       # one query row
    (1, 2, 4, 1, 5, True, "model"),            # one key: P = 1, var = 0, out = 0
    (2, 3, 37, 11, 5, True, "model"),
    (2, 3, 37, 11, 5, False, "transposed"),
    (1, 2, 70, 300, 96, True, "transposed"),   # d = 96, M over several key blocks
    (2, 1, 65, 140, 8, True, "model"),         # h = 1 with a mix (a scalar weight)
    (1, 2, 50, 130, 16, False, "contiguous"),
    (1, 8, 20, 9, 4, True, "model"),           # 8 heads mixed
    (1, 8, 49, 49, 96, True, "model"),         # 8 heads of dim 96 (stage-4-like)
    (1, 2, 130, 950, 32, True, "model"),       # detection-like M ~ 1000
]


def _case_id(c):
    return "B{}h{}N{}M{}d{}-{}-{}".format(*c[:5], "mix" if c[5] else "plain", c[6])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32] + LOWP, ids=str)
@pytest.mark.parametrize("case", EMSA_CASES, ids=_case_id)
def test_emsa_op(case, dtype, device):
    B, h, N, M, d, mix, layout = case
    if device == "cuda":  # GPU resource limits (shared memory) are reasons, not failures
        from rest_kernels.backends.registry import BACKENDS
        q = torch.empty(B, h, N, d, dtype=dtype, device=device)
        reason = BACKENDS["triton"].emsa_unsupported_reason(q, q, q, torch.empty(h, h) if mix else None)
        if reason is not None:
            pytest.skip(reason)
    conformance.check_emsa_op("triton", B, h, N, M, d, dtype, mix=mix, layout=layout, device=device)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_emsa_op_detection_size(device):
    # ResT-lite stage 1 at a 760 x 1280 detection input: N = 190 x 80 = 15200, M = 950 (sr 4), 2 heads.
    # On a GPU the whole map. Under the interpreter the whole map took 14 min, a quarter of CI's
    # time (the suite ran past CI's limit): there a stripe of 52 x 80 rows, N = 4160, with the whole
    # key length. Each program does what it does on the whole map: the forward's programs walk all
    # 950 keys unsplit (enough query blocks that the plan does not split the key range, asserted
    # below) and the backward's key-block programs walk their query ranges; more rows only add
    # programs running the same code on other rows.
    N = 15200 if device == "cuda" else 4160
    if device == "cpu":
        from rest_kernels.triton import emsa_fwd
        for n in (N, 15200):
            q = torch.empty(1, 2, n, 64, device="meta")
            assert emsa_fwd.forward_plan(q, 950, True, one_pass=True).splits == 1
    conformance.check_emsa_op("triton", 1, 2, N, 950, 64, torch.float32, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_emsa_op_sharp_logits(device):
    # Large logits: the online max matters (a naive exp overflows), rows close to one-hot.
    conformance.check_emsa_op("triton", 2, 2, 33, 150, 8, torch.float32, device=device, logit_scale=12.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32] + LOWP, ids=str)
@pytest.mark.parametrize("case", [(2, 3, 5, 7, True, False), (1, 2, 1, 1, False, False),
                                  (2, 4, 9, 70, True, True), (1, 3, 33, 2, True, False)],
                         ids=lambda c: "B{}C{}H{}W{}-bias{}-cl{}".format(*c))
def test_pa_op(case, dtype, device):
    B, C, H, W, bias, channels_last = case
    conformance.check_pa_op("triton", B, C, H, W, dtype, bias=bias, device=device, channels_last=channels_last)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("view", ["strided", "offset"])
def test_pa_strided_bias_and_weight_views(view, device):
    # The kernels index bias and the 3x3 taps as dense arrays (b_ptr + c, w_ptr + c * 9 + t): a
    # strided bias view (every other element of a longer tensor) used to be read as if contiguous,
    # giving wrong outputs and gradients. Views with a storage offset must work too.
    C = 5
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, C, 6, 7, generator=g).to(device).requires_grad_(True)
    if view == "strided":
        bias_base = torch.randn(2 * C, generator=g).to(device)
        weight_base = torch.randn(C, 1, 3, 6, generator=g).to(device)
        bias, weight = bias_base[::2], weight_base[..., ::2]
    else:
        bias = torch.randn(C + 1, generator=g).to(device)[1:]
        weight = torch.randn(C * 9 + 1, generator=g).to(device)[1:].view(C, 1, 3, 3)
    bias, weight = bias.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    out = rest_kernels.pa_gate(x, weight, bias, backend="triton")
    grads = torch.autograd.grad(out, (x, weight, bias), torch.ones_like(out))
    ref = rest_kernels.pa_reference(x, weight, bias)
    ref_grads = torch.autograd.grad(ref, (x, weight, bias), torch.ones_like(ref))
    conformance.assert_close_scaled(out, ref, 1e-5, f"pa out, {view} bias/weight")
    for name, got, want in zip(("x", "weight", "bias"), grads, ref_grads):
        conformance.assert_close_scaled(got, want, 1e-4, f"pa grad {name}, {view} bias/weight")


# --------------------------------------------------------------------------- custom-op plumbing
def test_float64_refused_with_reason():
    # The kernels take float32 / float16 / bfloat16 (fp32 accumulation); float64 gradcheck is the
    # reference's and the compiled backends' job. Asked by name, triton says why it cannot serve.
    device = "cpu" if interpreter_on() else "cuda"
    q = torch.randn(1, 1, 3, 4, dtype=torch.float64, device=device)
    with pytest.raises(BackendUnavailableError, match="float64"):
        rest_kernels.emsa_attention(q, q, q, backend="triton")
    with pytest.raises(BackendUnavailableError, match="float64"):
        rest_kernels.pa_gate(torch.randn(1, 2, 3, 3, dtype=torch.float64, device=device),
                             torch.randn(2, 1, 3, 3, dtype=torch.float64, device=device), backend="triton")


def test_head_dim_limit_is_a_reason():
    from rest_kernels.backends.registry import BACKENDS
    q = torch.empty(1, 1, 2, 300)
    assert "head dims up to" in BACKENDS["triton"].emsa_unsupported_reason(q, q, q, None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mix", [True, False])
def test_backward_deterministic(mix, device):
    q, k, v, w, b = conformance.emsa_inputs(2, 3, 40, 150, 8, torch.float32, mix, "model", device)
    leaves = [t for t in (q, k, v, w) if t is not None]
    runs = []
    for _ in range(2):
        out = rest_kernels.emsa_attention(q, k, v, w, b, backend="triton")
        runs.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mixed_forward_head_groups_give_the_same_bits(dtype, device):
    """The mixed forward's output-head groups (rest_kernels/triton/_common.py:group_logits) sum each
    head's logits over the input heads in the same order with the same operations whatever G is:
    G = 1, 2 and 4 (h = 3: the last group of 2 and the group of 4 hold padded heads) give the
    same output and statistics, bit for bit. On a GPU batch 128, so that the grid keeps
    FWD_TARGET_PROGRAMS programs with G = 4 and the groups run (the interpreter always groups)."""
    from rest_kernels.triton import emsa_fwd, tiles
    batch = 128 if device == "cuda" else 2
    q, k, v, w, _ = conformance.emsa_inputs(batch, 3, 40, 100, 8, dtype, True, "model", device)
    low = dtype != torch.float32
    key = tiles.key_name("fwd_mix", "16" if low else "32", 16, 4)
    base = emsa_fwd.forward_plan(q, 100, True).tiles
    runs = []
    for g in (1, 2, 4):
        with tiles.overriding({key: tiles.Tiles(base.BN, base.BM, base.num_warps, base.num_stages, 0, g)}):
            assert emsa_fwd.forward_plan(q, 100, True).G == g
            runs.append(emsa_fwd.emsa_forward(q, k, v, w.reshape(3, 3).float(), 8 ** -0.5, 1e-5))
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            assert torch.equal(a, c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mixed_forward_key_split(dtype, device, monkeypatch):
    """The mixed forward with its key range split over programs (rest_kernels/triton/emsa_fwd.py
    forward_plan: one pass per range, _flash_range_kernel, its partial statistics and output sums
    merged in a fixed order by _flash_merge_kernel) against the same call unsplit (two passes):
    one split per key block vs none, the statistics to fp32 rounding (the same updates, merged
    range by range) and the output to its dtype's; each bitwise repeatable. M = 300 spans 3 of the
    interpreter's key blocks (5 of a GPU's), the last partial."""
    from rest_kernels.triton import emsa_fwd
    q, k, v, w, _ = conformance.emsa_inputs(1, 3, 40, 300, 8, dtype, True, "model", device)
    w = w.reshape(3, 3).float()
    runs = {}
    for target in (1, 10 ** 9):  # FWD_TARGET_PROGRAMS: never split / split as far as the key blocks go
        monkeypatch.setattr(emsa_fwd, "FWD_TARGET_PROGRAMS", target)
        plan = emsa_fwd.forward_plan(q, 300, True, one_pass=True)
        assert (plan.splits > 1) == (target > 1) == plan.one_pass
        if plan.splits > 1:
            assert plan.splits * plan.blocks_per_split >= -(-300 // plan.tiles.BM) > plan.splits - 1
        first, again = (emsa_fwd.emsa_forward(q, k, v, w, 8 ** -0.5, 1e-5) for _ in range(2))
        for a, c in zip(first, again):
            assert torch.equal(a, c), "a split forward is bitwise repeatable"
        runs[plan.splits] = first
    (one, split), = [(runs[1], runs[s]) for s in runs if s > 1]
    eps = torch.finfo(dtype).eps
    for name, a, c in zip(("out", "lse", "rsq", "rstd"), one, split):
        tol = (eps if name == "out" else torch.finfo(torch.float32).eps) * 16  # a few roundings
        err = ((a.float() - c.float()).abs().max() / c.float().abs().max()).item()
        assert err <= tol, f"{name}: {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("device", DEVICES)
def test_one_pass_forward_keeps_the_two_pass_accuracy(device, monkeypatch):
    """The one-pass split forward forms out = rstd (P v - vbar) from fp32 sums instead of
    multiplying by (P - 1/M) after a statistics pass; rstd (up to eps^-1/2 = 316 for near-uniform
    maps) amplifies whatever that difference of two sums loses. Near-uniform maps (small logits)
    and values with a large common mean (v + 10) are the hard case: against the float64 reference
    the one-pass forward's error is held to 4x the two-pass forward's (measured 0.5-2x under the
    interpreter, float32; the shift by vref keeps the sums at the size of v's spread), where
    without the shift it would grow with v's mean times rstd."""
    from rest_kernels.triton import emsa_fwd
    torch.manual_seed(0)
    B, H, N, M, D = 1, 3, 40, 300, 16
    errs = {}
    for logit_scale in (0.05, 1.0):
        q = (torch.randn(B, H, N, D) * logit_scale).to(device)
        k = torch.randn(B, H, M, D).to(device)
        v = (torch.randn(B, H, M, D) + 10.0).to(device)
        w = torch.randn(H, H).to(device)
        ref = rest_kernels.emsa_reference(q.double(), k.double(), v.double(), w.double().reshape(H, H, 1, 1),
                                          None, D ** -0.5, 1e-5)
        for target in (1, 10 ** 9):
            monkeypatch.setattr(emsa_fwd, "FWD_TARGET_PROGRAMS", target)
            assert emsa_fwd.forward_plan(q, M, True, one_pass=True).one_pass == (target > 1)
            out = emsa_fwd.emsa_forward(q, k, v, w, D ** -0.5, 1e-5)[0]
            errs[logit_scale, target] = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    for logit_scale in (0.05, 1.0):
        two_pass, one_pass = errs[logit_scale, 1], errs[logit_scale, 10 ** 9]
        assert one_pass <= 4 * max(two_pass, torch.finfo(torch.float32).eps), (logit_scale, one_pass, two_pass)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_backward_row_terms_from_split_key_range(device, monkeypatch):
    """bf16: where the forward plan splits the key range, the backward's fp32 rebuild of O goes
    straight into the row terms (emsa_fwd.output_row_terms: the ranges' partials summed and dotted
    with dO in one kernel, no O buffer); unsplit, O is rebuilt into an fp32 buffer and then
    dotted. The two differ only in the order of delta's fp32 sums: the bf16 gradients to one
    rounding of their own (under the interpreter they are equal), dW (fp32) to a few fp32
    roundings of its size (measured 3.3e-7); each path is bitwise repeatable."""
    from rest_kernels.triton import emsa_bwd, emsa_fwd
    dtype = torch.bfloat16
    q, k, v, w, _ = conformance.emsa_inputs(1, 3, 40, 300, 8, dtype, True, "model", device)
    w = w.reshape(3, 3).float()
    scale, eps = 8 ** -0.5, 1e-5
    out, lse, rsq, rstd = emsa_fwd.emsa_forward(q, k, v, w, scale, eps)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    took = []  # the target of each call that went through output_row_terms
    real = emsa_bwd.output_row_terms
    monkeypatch.setattr(emsa_bwd, "output_row_terms", lambda *a: took.append(emsa_fwd.FWD_TARGET_PROGRAMS) or real(*a))
    grads = {}
    for target in (1, 10 ** 9):  # FWD_TARGET_PROGRAMS: never split / split as far as the key blocks go
        monkeypatch.setattr(emsa_fwd, "FWD_TARGET_PROGRAMS", target)
        first, again = (emsa_bwd.emsa_backward(dout, q, k, v, w, out, lse, rsq, rstd, scale, eps)
                        for _ in range(2))
        for a, c in zip(first, again):
            assert torch.equal(a, c), "bitwise repeatable"
        grads[target] = first
    assert took == [10 ** 9, 10 ** 9], "the split backward, twice, and only it, went through output_row_terms"
    for name, a, c in zip(("dq", "dk", "dv", "dW"), grads[1], grads[10 ** 9]):
        tol = torch.finfo(dtype).eps if name != "dW" else 1e-5
        err = ((a.float() - c.float()).abs().max() / c.float().abs().max()).item()
        assert err <= tol, f"{name}: {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("arch", [80, 86, 90])
def test_forward_plan_splits_only_in_one_pass(arch, monkeypatch):
    """emsa_forward runs its two-pass branch (statistics, then attention_output on the same plan)
    wherever forward_plan(one_pass=True) does not return a one-pass plan; attention_output runs
    unsplit plans only. So that plan is one-pass or unsplit at every shape, also where the
    "fwd_split" row falls back to the unsplit "fwd" row and the "fwd_mix" row (the backward's
    rebuild, one_pass=False) would split: e.g. sm_86 bf16, d = 96, h = 3, N = 71, M = 484 (the
    first version of the split row terms recomputed the plan in attention_output, which got the
    split one there)."""
    from rest_kernels.triton import emsa_fwd, tiles
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU's rule, not the interpreter's
    monkeypatch.setattr(tiles, "target_arch", lambda: arch)
    seen_split_rebuild_with_unsplit_forward = False
    for d in (64, 96):
        for h in (2, 3, 8):
            for N in (1, 50, 71, 200, 950):
                for M in (1, 49, 300, 484, 950):
                    q = torch.empty(1, h, N, d, dtype=torch.bfloat16, device="meta")
                    fwd = emsa_fwd.forward_plan(q, M, True, one_pass=True)
                    assert fwd.one_pass or fwd.splits == 1, (d, h, N, M, fwd)
                    rebuild = emsa_fwd.forward_plan(q, M, True)
                    assert not rebuild.one_pass
                    seen_split_rebuild_with_unsplit_forward |= not fwd.one_pass and rebuild.splits > 1
    if arch == 86:
        assert seen_split_rebuild_with_unsplit_forward, "the case this test is about occurs in the sweep"


def test_forward_plan_fills_the_gpu_at_detection_size(monkeypatch):
    """On the sm_90 table (also under the interpreter): ResT-Base stages 3-4 at 800 x 1216, batch 1
    (4 / 8 heads of dim 64, N = 3800 / 950, M = 950) keep output-head groups and fill one wave of
    programs (between half of FWD_TARGET_PROGRAMS and all of it) instead of one output head per
    program: the forward's own call (one_pass) on the "fwd_split" row, split where its groups
    leave fewer programs (stage 4; stage 3 fills the wave unsplit), the backward's rebuild of O on
    the "fwd_mix" row, split; a 224 px batch-64 call is not split; a one-key-block call at batch 1
    gives up the group (more programs)."""
    from rest_kernels.triton import emsa_fwd, tiles
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU's rule, not the interpreter's
    monkeypatch.setattr(tiles, "target_arch", lambda: 90)
    for h, N, M in ((4, 3800, 950), (8, 950, 950)):
        q = torch.empty(1, h, N, 64, dtype=torch.bfloat16, device="meta")
        for one_pass, family in ((False, "fwd_mix"), (True, "fwd_split")):
            t = tiles.tiles_for(family, True, 64, arch=90, hp=h)
            plan = emsa_fwd.forward_plan(q, M, True, one_pass=one_pass)
            assert plan.G == t.G > 1 and plan.tiles == t and plan.one_pass == one_pass
            grid = plan.grid(q)
            programs = grid[0] * grid[1] * grid[2]
            assert emsa_fwd.FWD_TARGET_PROGRAMS // 2 <= programs <= emsa_fwd.FWD_TARGET_PROGRAMS
            assert one_pass or plan.splits > 1
            assert (plan.splits - 1) * plan.blocks_per_split < -(-M // t.BM), "no empty key range"
    q = torch.empty(64, 8, 49, 64, dtype=torch.bfloat16, device="meta")
    assert emsa_fwd.forward_plan(q, 49, True, one_pass=True).splits == 1
    assert not emsa_fwd.forward_plan(q, 49, True, one_pass=True).one_pass
    q = torch.empty(1, 8, 49, 64, dtype=torch.bfloat16, device="meta")
    for one_pass in (False, True):
        assert emsa_fwd.forward_plan(q, 49, True, one_pass) == emsa_fwd.ForwardPlan(tiles.tiles_for("fwd", True, 64, arch=90), 1)


# --------------------------------------------------------------------------- memory
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mix", [True, False])
def test_saved_for_backward_has_no_map(mix, device):
    B, h, N, M, d = 2, 2, 60, 50, 4
    q, k, v, w, b = conformance.emsa_inputs(B, h, N, M, d, torch.float32, mix, "model", device)
    out, saved = conformance.saved_tensors_of(rest_kernels.emsa_attention, q, k, v, w, b, backend="triton")
    assert saved, "nothing saved: the probe did not see the custom op's autograd"
    for t in saved:
        assert t.numel() < B * h * N * M, f"saved a tensor of shape {tuple(t.shape)}: as large as the N x M map"
    _, nbytes = conformance.saved_tensor_bytes(rest_kernels.emsa_attention, q, k, v, w, b, backend="triton")
    # q (views of its projection), k and v (one kv storage), out, lse, rsq, rstd, W: all O((N + M) d)
    assert nbytes < 4 * B * h * N * M


# --------------------------------------------------------------------------- compile / export
def _fn(q, k, v, w, b, x, pw, pb):
    y = rest_kernels.emsa_attention(q, k, v, w, b, backend="triton")
    return y.sum(-1, keepdim=True) + 0.0, rest_kernels.pa_gate(x, pw, pb, backend="triton")


def _inputs(device):
    q, k, v, w, b = conformance.emsa_inputs(2, 2, 9, 5, 8, torch.float32, True, "model", device)
    x = torch.randn(2, 3, 5, 6, device=device, requires_grad=True)
    pw = torch.randn(3, 1, 3, 3, device=device, requires_grad=True)
    pb = torch.randn(3, device=device, requires_grad=True)
    return q, k, v, w, b, x, pw, pb


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_single_nodes(device):
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    args = _inputs(device)
    compiled = torch.compile(_fn, backend=counting_backend, fullgraph=True)
    got = compiled(*args)
    expected = _fn(*args)
    assert len(graphs) == 1, f"{len(graphs)} graphs: a graph break"
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.rest_kernels.emsa_fwd.default) == 1, targets
    assert targets.count(torch.ops.rest_kernels.pa_fwd.default) == 1, targets
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)
    # the compiled function differentiates through the custom ops' registered backward
    g_c = torch.autograd.grad(sum(t.sum() for t in got), [args[0], args[3], args[5]])
    g_e = torch.autograd.grad(sum(t.sum() for t in expected), [args[0], args[3], args[5]])
    for a, e in zip(g_c, g_e):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_aot_eager_matches(device):
    # aot_eager traces forward and backward with the fake implementations of the custom ops
    torch._dynamo.reset()
    args = _inputs(device)
    got = torch.compile(_fn, backend="aot_eager", fullgraph=True)(*args)
    expected = _fn(*args)
    leaves = [args[0], args[1], args[2], args[3], args[5], args[6], args[7]]
    g_c = torch.autograd.grad(sum(t.sum() for t in got), leaves)
    g_e = torch.autograd.grad(sum(t.sum() for t in expected), leaves)
    for a, e in zip(list(got) + list(g_c), list(expected) + list(g_e)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


class _Small(torch.nn.Module):
    def __init__(self, h=2):
        super().__init__()
        self.mix = torch.nn.Parameter(torch.randn(h, h) / h)
        self.pa = torch.nn.Conv2d(3, 3, 3, padding=1, groups=3)

    def forward(self, q, k, v, x):
        y = rest_kernels.emsa_attention(q, k, v, self.mix, backend="triton")
        return y, rest_kernels.pa_gate(x, self.pa.weight, self.pa.bias, backend="triton")


@pytest.mark.parametrize("device", DEVICES)
def test_export_single_nodes(device):
    m = _Small().to(device)
    q, k, v = (t.detach() for t in conformance.emsa_inputs(2, 2, 9, 5, 8, torch.float32, False, "model", device)[:3])
    x = torch.randn(2, 3, 5, 6, device=device)
    ep = torch.export.export(m, (q, k, v, x))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.rest_kernels.emsa_fwd.default) == 1, targets
    assert targets.count(torch.ops.rest_kernels.pa_fwd.default) == 1, targets
    for a, e in zip(ep.module()(q, k, v, x), m(q, k, v, x)):
        torch.testing.assert_close(a, e)
