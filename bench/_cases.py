"""What the benchmark measures: ResT's stage shapes, the op and model cases, and their callables.

Shapes follow ResT v1 (Zhang & Yang, 2021) and ResTv2 (2022), which share them: a stride-4 stem,
then stride-2 patch embeddings; stage i has dims[i] channels, heads[i] heads (d = dims[i] / heads[i])
and its keys and values come from a depthwise conv of kernel sr+1, stride sr, padding sr//2 (sr = 8,
4, 2, 1). ResT lite and small share their stage shapes (dims 64..512); ResT base and large and
ResTv2 tiny, small and base theirs (dims 96..768); ResTv2 large has its own (dims 128..1024, heads
2..16). So the op shapes are listed per family, not per variant. ResT mixes heads where a stage has
several ("emsa-mix"); ResTv2 never does (plain "emsa" at every stage).

A "runner" is what the timing and memory code calls: a zero-argument function doing one forward
(inference, no autograd) or one forward plus backward (or, for the models, one training step),
built for one backend. Backend names: the fused backends of rest_kernels, "reference" (eager
PyTorch with the official math), "compile" (torch.compile of the reference, pinned to it) and
"fused-compiled" (the fused model as rest.compile_for_inference deploys it: model inference rows on
the CPU).
"""
from __future__ import annotations

import dataclasses
import importlib
import warnings

import torch

import rest_kernels

from bench import _engines

# --------------------------------------------------------------------------- ResT shapes
# v1 / v2: whether ResT (v1) / ResTv2 variants run at these shapes
FAMILIES = {
    "lite/small": dict(dims=(64, 128, 256, 512), heads=(1, 2, 4, 8), sr=(8, 4, 2, 1), v1=True, v2=False),
    "base/large": dict(dims=(96, 192, 384, 768), heads=(1, 2, 4, 8), sr=(8, 4, 2, 1), v1=True, v2=True),
    "v2-large": dict(dims=(128, 256, 512, 1024), heads=(2, 4, 8, 16), sr=(8, 4, 2, 1), v1=False, v2=True),
}
VARIANT_FAMILY = {"lite": "lite/small", "small": "lite/small", "base": "base/large", "large": "base/large",
                  "v2_tiny": "base/large", "v2_small": "base/large", "v2_base": "base/large", "v2_large": "v2-large"}
#: the models: ResT's "lite" ... (rest.rest_lite ...), ResTv2's "v2_tiny" ... (rest.restv2_tiny ...)
MODELS = ("lite", "small", "base", "large", "v2_tiny", "v2_small", "v2_base", "v2_large")


def model_name(model: str) -> str:
    """The rest constructor of a MODELS entry: rest_lite, ..., restv2_tiny, ..."""
    return "rest" + model if model.startswith("v2_") else f"rest_{model}"
#: input resolutions: ImageNet classification and a detection-size input (COCO-style 800 x 1216)
INPUTS = {"224": (224, 224), "det": (800, 1216)}

OPS = ("emsa", "emsa-mix", "pa")
OP_HELP = {"emsa": "emsa_attention without the head mix (plain softmax attention)",
           "emsa-mix": "emsa_attention with the head mix + InstanceNorm (ResT's apply_transform)",
           "pa": "pa_gate"}
PASSES = ("fwd", "fwd+bwd")
MODEL_MODES = ("infer", "train")


def stage_grids(height: int, width: int) -> list[tuple[int, int]]:
    """Token grids (H_i, W_i) of the 4 stages: the stem halves twice (3x3, stride 2, pad 1 rounds
    up), each patch embedding halves again (2x2, stride 2, rounds down)."""
    h, w = -(-(-(-height // 2)) // 2), -(-(-(-width // 2)) // 2)
    grids = [(h, w)]
    for _ in range(3):
        h, w = h // 2, w // 2
        grids.append((h, w))
    return grids


def reduced(n: int, sr: int) -> int:
    """Output length of the spatial-reduction conv (kernel sr+1, stride sr, padding sr//2)."""
    return n if sr == 1 else (n + 2 * (sr // 2) - (sr + 1)) // sr + 1


@dataclasses.dataclass(frozen=True)
class StageShape:
    """One ResT stage at one input: the EMSA problem (h, N, M, d) and the PA map (C, H, W)."""
    label: str          # e.g. "224-s1-lite/small"
    input: str          # key of INPUTS
    stage: int          # 1..4
    family: str
    h: int
    N: int
    M: int
    d: int
    C: int
    H: int
    W: int


def stage_shapes() -> list[StageShape]:
    """Every stage of every family at every input, identical problems listed once."""
    shapes, seen = [], set()
    for inp, (height, width) in INPUTS.items():
        for family, cfg in FAMILIES.items():
            for i, (H, W) in enumerate(stage_grids(height, width)):
                sr, C, h = cfg["sr"][i], cfg["dims"][i], cfg["heads"][i]
                M = reduced(H, sr) * reduced(W, sr)
                s = StageShape(f"{inp}-s{i + 1}-{family}", inp, i + 1, family, h, H * W, M, C // h, C, H, W)
                key = (s.h, s.N, s.M, s.d, s.C, s.H, s.W)
                if key not in seen:
                    seen.add(key)
                    shapes.append(s)
    return shapes


def in_model(op: str, shape: StageShape) -> bool:
    """Whether a model runs this op at this stage: ResT mixes heads only where there are several
    (rest/modules.py: apply_transform and num_heads > 1), so its stage 1 runs plain emsa; ResTv2 runs
    plain emsa everywhere."""
    family = FAMILIES[shape.family]
    if op == "pa":
        return True
    if op == "emsa-mix":
        return family["v1"] and shape.h > 1
    return family["v2"] or shape.h == 1


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class OpCase:
    op: str             # one of OPS
    pass_: str          # one of PASSES
    shape: StageShape
    batch: int
    dtype: torch.dtype
    device: str
    channels_last: bool = False  # PA only: the map channels-last, as the models run it on the CPU

    kind = "op"

    @property
    def name(self) -> str:
        return self.op

    @property
    def label(self) -> str:
        layout = " channels-last" if self.channels_last else ""
        return f"{self.op} {self.pass_} {self.shape.label}{layout} {dtype_name(self.dtype)}"

    def dims(self) -> dict:
        s = self.shape
        if self.op == "pa":
            return dict(B=self.batch, C=s.C, H=s.H, W=s.W)
        return dict(B=self.batch, h=s.h, N=s.N, M=s.M, d=s.d)

    def group(self) -> tuple:
        """Rows of one group are the same work on different backends (compared side by side)."""
        return ("op", self.op, self.pass_, self.shape.label, self.batch, dtype_name(self.dtype), self.device,
                self.channels_last)


@dataclasses.dataclass(frozen=True)
class ModelCase:
    model: str          # one of MODELS
    mode: str           # one of MODEL_MODES
    batch: int
    image: int
    dtype: torch.dtype
    device: str

    kind = "model"

    @property
    def name(self) -> str:
        return model_name(self.model)

    @property
    def pass_(self) -> str:
        return self.mode

    @property
    def label(self) -> str:
        return f"{model_name(self.model)} {self.mode} {self.image}px {dtype_name(self.dtype)}"

    def dims(self) -> dict:
        return dict(B=self.batch, C=3, H=self.image, W=self.image)

    def group(self) -> tuple:
        return ("model", self.model, self.mode, self.batch, self.image, dtype_name(self.dtype), self.device)


# --------------------------------------------------------------------------- runners
@dataclasses.dataclass
class Runner:
    fn: object                      # () -> anything; one call = one measured unit of work
    items: int                      # throughput items per call (1 call, or B images)
    unit: str                       # "calls/s" or "images/s"
    saved_bytes: object = None      # () -> int, bytes autograd saves for backward (None: n/a)
    settings: dict | None = None    # a deployment engine's settings, reported with its row


def _compile(fn):
    # A fresh compilation per case: shapes are static within a case, and dynamo's caches (keyed by
    # code object) are reset so one case's guards and recompile limit don't leak into the next.
    torch._dynamo.reset()
    warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")  # dynamo on the registry's cache
    return torch.compile(fn, dynamic=False)


def _emsa_fn(backend):
    name = "reference" if backend == "compile" else backend

    def emsa(q, k, v, w, b):
        return rest_kernels.emsa_attention(q, k, v, w, b, backend=name)
    return _compile(emsa) if backend == "compile" else emsa


def _pa_fn(backend):
    name = "reference" if backend == "compile" else backend

    def pa(x, w, b):
        return rest_kernels.pa_gate(x, w, b, backend=name)
    return _compile(pa) if backend == "compile" else pa


def op_inputs(case: OpCase, requires_grad: bool, seed: int = 0):
    """Inputs as the model produces them, and the tensors to differentiate (empty for fwd).

    EMSA: q, k, v are strided views of the projection outputs ((B,N,h*d) and (B,M,2*h*d)), the
    mix weight and bias are the 1x1 conv's parameters (float32, as in the model). PA: a contiguous
    (B,C,H,W) map and the depthwise conv's parameters."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dev, dt, s, B = case.device, case.dtype, case.shape, case.batch

    def randn(*shape, dtype=dt):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=dev, dtype=dtype)

    if case.op == "pa":
        conv = torch.nn.Conv2d(s.C, s.C, 3, padding=1, groups=s.C)
        x = randn(B, s.C, s.H, s.W)
        if case.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        w = conv.weight.detach().to(dev, dt)
        b = conv.bias.detach().to(dev, dt)
        args = [x, w, b]
        leaves = args
    else:
        h, N, M, d = s.h, s.N, s.M, s.d
        q = randn(B, N, h * d).view(B, N, h, d).transpose(1, 2)
        kv = randn(B, M, 2 * h * d).view(B, M, 2, h, d)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        if case.op == "emsa-mix":
            conv = torch.nn.Conv2d(h, h, 1)
            w = conv.weight.detach().to(dev)
            b = conv.bias.detach().to(dev)
        else:
            w = b = None
        args = [q, k, v, w, b]
        leaves = [t for t in args if t is not None]
    if requires_grad:
        # detach() keeps the strides: the leaves are the model's views, not contiguous copies
        # (and a channels-last map channels-last)
        leaves = [t.detach().requires_grad_(True) for t in leaves]
        it = iter(leaves)
        args = [next(it) if t is not None else None for t in args]
    return args, (leaves if requires_grad else [])


def _grad_like_model(op, out):
    """dout with the layout the model's backward hands the op. EMSA's output is consumed as
    out.transpose(1, 2).reshape(B, N, C), so its gradient arrives (B, N, h, d)-contiguous; PA's
    output feeds a flatten, so its gradient is contiguous."""
    if op == "pa":
        return torch.randn(out.shape, dtype=torch.float32, device=out.device).to(out.dtype)
    g = torch.randn(out.transpose(1, 2).shape, dtype=torch.float32, device=out.device).to(out.dtype)
    return g.transpose(1, 2)


def op_runner(case: OpCase, backend: str) -> Runner:
    fn = _pa_fn(backend) if case.op == "pa" else _emsa_fn(backend)
    if case.pass_ == "fwd":
        args, _ = op_inputs(case, requires_grad=False)

        def run():
            with torch.no_grad():
                return fn(*args)
        return Runner(run, 1, "calls/s")

    args, leaves = op_inputs(case, requires_grad=True)
    state = {}

    def run():
        out = fn(*args)
        if "dout" not in state:
            state["dout"] = _grad_like_model(case.op, out)
        return torch.autograd.grad(out, leaves, state["dout"])

    def saved():
        from rest_kernels.diagnostics import saved_tensor_bytes
        with torch.enable_grad():
            out, nbytes = saved_tensor_bytes(fn, *args)
        del out
        return nbytes
    return Runner(run, 1, "calls/s", saved)


def model_constructor(model: str):
    """(constructor, None), or (None, why it cannot be had): imported lazily, so the op rows
    work in a checkout that has no models yet."""
    name = model_name(model)
    try:
        module = importlib.import_module("rest")
    except Exception as e:  # report, don't crash
        return None, f"`import rest` failed ({type(e).__name__}: {e})"
    ctor = getattr(module, name, None)
    if ctor is None:
        return None, f"rest.{name} does not exist in this checkout"
    return ctor, None


def _model_and_data(case: ModelCase, backend: str, param_dtype: torch.dtype):
    """The case's model (the same weights on every backend: the official init from seed 0), its
    images and labels."""
    ctor, reason = model_constructor(case.model)
    if ctor is None:
        raise ModelUnavailable(reason)
    torch.manual_seed(0)
    model = ctor(backend=backend).to(device=case.device, dtype=param_dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(case.batch, 3, case.image, case.image, generator=g).to(case.device, param_dtype)
    labels = torch.randint(0, 1000, (case.batch,), generator=g).to(case.device)
    return model, images, labels


def reference_logits(case: ModelCase) -> torch.Tensor:
    """The float64 logits of the case's model and images (the official math): what every inference
    row's output is checked against before it is timed."""
    model, images, _ = _model_and_data(case, "reference", torch.float64)
    with torch.no_grad():
        return model.eval()(images)


def engine_runner(case: ModelCase, engine: str) -> Runner:
    """ONNX Runtime or OpenVINO running rest.export_onnx's file of the case's model (bench/_engines.py);
    Runner.settings holds the engine's settings."""
    reason = _engines.case_reason(engine, case)
    if reason is not None:
        raise ModelUnavailable(reason)
    model, images, _ = _model_and_data(case, "reference", torch.float32)
    path = _engines.exported(model.eval(), (case.name, case.image), case.image)
    fn, settings = _engines.runner(engine, path, images, case.dtype, torch.get_num_threads())
    return Runner(fn, case.batch, "images/s", settings=settings)


#: the fused model compiled for inference (rest.compile_for_inference): CPU model inference rows only
FUSED_COMPILED = "fused-compiled"


def compiled_inference_runner(case) -> Runner:
    """rest.compile_for_inference of the case's model on the `cpu` backend (a bfloat16 model for
    bfloat16 rows, as runs_cast_model); its first call compiles (timed apart: first_call_s)."""
    if case.kind != "model" or case.mode != "infer":
        raise ModelUnavailable(f"{FUSED_COMPILED}: rest.compile_for_inference is for whole-model inference rows only")
    if case.device != "cpu":
        raise ModelUnavailable(f"{FUSED_COMPILED}: measured on the CPU only (its compiled graph calls the "
                               "cpu kernels); this run is on " + case.device)
    if case.dtype not in (torch.float32, torch.bfloat16):
        raise ModelUnavailable(f"{FUSED_COMPILED}: float32 and bfloat16 models only, not {dtype_name(case.dtype)}")
    model, images, _ = _model_and_data(case, "cpu", torch.float32)
    cast = runs_cast_model(case, FUSED_COMPILED)  # float32 rows: the float32 model
    net = importlib.import_module("rest").compile_for_inference(model.eval(), dtype=case.dtype if cast else None)
    images = images.to(case.dtype)
    return Runner(lambda: net(images), case.batch, "images/s",
                  settings=dict(torch_compile=f"dynamic={net.dynamic}; inductor's freezing and cpp_wrapper on "
                                              "around each call; the cpu kernels called by the graph directly; "
                                              "guards skipped for an input signature already run "
                                              "(rest.compile_for_inference)"))


def runs_cast_model(case, backend: str) -> bool:
    """Whether the row runs its model cast to the case's dtype instead of under autocast: the fused
    model's bfloat16 CPU inference, as deployed (rest.optimize_for_inference(model, dtype=torch.bfloat16):
    weights cast once, rest/inference.py says why). Eager and torch.compile stay under autocast, the
    official mixed-precision recipe; engines are separate (their precision hints)."""
    return (case.kind == "model" and case.mode == "infer" and case.dtype == torch.bfloat16 and case.device == "cpu"
            and backend not in ("reference", "compile") and backend not in _engines.ENGINES)  # FUSED_COMPILED too


def model_runner(case: ModelCase, backend: str) -> Runner:
    cast = runs_cast_model(case, backend)
    autocast = case.dtype in (torch.float16, torch.bfloat16) and not cast
    # float16 / bfloat16: mixed precision (autocast) as one trains and serves these models; float32
    # and float64: the whole model in that dtype
    param_dtype = torch.float32 if (autocast or cast) else case.dtype
    model, images, labels = _model_and_data(case, "reference" if backend == "compile" else backend, param_dtype)
    net = _compile(model) if backend == "compile" else model

    def amp():
        return torch.autocast(case.device, dtype=case.dtype, enabled=autocast)

    if case.mode == "infer":
        model.eval()
        if backend not in ("reference", "compile"):
            # a fused model runs inference as deployed: BatchNorms folded into the convolutions
            # (rest.optimize_for_inference; the engines fold theirs too); the reference stays the
            # official modules
            net = importlib.import_module("rest").optimize_for_inference(model, dtype=case.dtype if cast else None)
            images = images.to(case.dtype) if cast else images

        def run():
            with torch.no_grad(), amp():
                return net(images)
        return Runner(run, case.batch, "images/s")

    model.train()
    # ResT's recipe uses AdamW; its state is created by the first (warm-up) step, before any measurement
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def run():
        opt.zero_grad(set_to_none=True)
        with amp():
            loss = torch.nn.functional.cross_entropy(net(images).float(), labels)
        loss.backward()
        opt.step()
        return loss

    def saved():
        from rest_kernels.diagnostics import saved_tensor_bytes
        with torch.enable_grad(), amp():
            out, nbytes = saved_tensor_bytes(net, images)
        del out
        return nbytes
    return Runner(run, case.batch, "images/s", saved)


class ModelUnavailable(RuntimeError):
    """The model constructor cannot be imported here (the row is skipped with this reason)."""


def runner(case, backend: str) -> Runner:
    if backend in _engines.ENGINES:
        return engine_runner(case, backend)
    if backend == FUSED_COMPILED:
        return compiled_inference_runner(case)
    return op_runner(case, backend) if case.kind == "op" else model_runner(case, backend)
