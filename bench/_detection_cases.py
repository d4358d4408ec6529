"""Benchmark cases for rest.detection: one training step of the ResT backbone with FPN, of RetinaNet
and of Mask R-CNN on it, at detection-size inputs.

A step: forward, loss, backward, AdamW step, everything trainable (torchvision's rule without
backbone weights: trainable BatchNorm, no frozen stage). The backbone's loss is the sum of its FPN
maps' means; a detector's is the sum of its losses on fixed targets (three boxes per image, with
masks for Mask R-CNN). The images are already at the detector's size (min side 800, max 1333), so
torchvision's transform only normalises and pads them (to multiples of 32).
Backends: a fused rest_kernels backend or "reference" (eager PyTorch) for every EMSA and PA of the
backbone; "compile": torch.compile of the backbone (with FPN) pinned to "reference" (the detector's
heads stay eager: torchvision's detectors have data-dependent control flow that graph-breaks).
"""
from __future__ import annotations

import dataclasses

import torch

from bench._cases import FUSED_COMPILED, MODELS, ModelUnavailable, Runner, _compile, dtype_name, model_name
from bench._engines import ENGINES

#: what is trained: the backbone with FPN alone, or a whole detector on it
DETECTION = ("backbone", "retinanet", "maskrcnn")
#: the variants rest.detection builds: every ResT and ResTv2 model ("lite" ... "v2_tiny" ...; bench/_cases.py)
DET_MODELS = MODELS
#: input sizes (height x width): COCO's usual 800 x 1216 batch and the largest the resize allows
DET_INPUTS = {"800x1216": (800, 1216), "800x1333": (800, 1333)}
#: what the backbone keeps for the backward, as backbone options: "default" (the model's own default,
#: mlp_recompute "auto"), "modules" (each MLP kept by its modules, mlp_recompute="none": the fused
#: step before rest/lean_mlp.py) and "lean" (grad_checkpointing: the blocks and the FPN recomputed)
DET_MEMORY = {"default": {}, "modules": dict(mlp_recompute="none"), "lean": dict(grad_checkpointing=True)}


@dataclasses.dataclass(frozen=True)
class DetectionCase:
    what: str           # one of DETECTION
    variant: str        # one of DET_MODELS (e.g. "lite", "v2_tiny")
    input: str          # key of DET_INPUTS
    batch: int
    dtype: torch.dtype
    device: str
    memory: str = "default"  # key of DET_MEMORY

    kind = "detection"
    pass_ = "train"

    @property
    def name(self) -> str:
        return f"{self.what} {model_name(self.variant)}" + ("" if self.memory == "default" else f" [{self.memory}]")

    @property
    def label(self) -> str:
        return f"{self.name} train {self.input} {dtype_name(self.dtype)}"

    def dims(self) -> dict:
        H, W = DET_INPUTS[self.input]
        return dict(B=self.batch, C=3, H=H, W=W)

    def group(self) -> tuple:
        return ("detection", self.what, self.variant, self.input, self.batch, dtype_name(self.dtype), self.device,
                self.memory)


def _targets(batch: int, H: int, W: int, masks: bool, device) -> list[dict]:
    boxes = torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.3, 0.4, 0.9, 0.8], [0.6, 0.05, 0.95, 0.3]]) * torch.tensor(
        [W, H, W, H])
    out = []
    for _ in range(batch):
        t = dict(boxes=boxes.to(device), labels=torch.tensor([1, 2, 3], device=device))
        if masks:
            m = torch.zeros(3, H, W, dtype=torch.uint8, device=device)
            for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
                m[k, y0:y1, x0:x1] = 1
            t["masks"] = m
        out.append(t)
    return out


def detection_runner(case: DetectionCase, backend: str) -> Runner:
    if backend in ENGINES + (FUSED_COMPILED,):
        raise ModelUnavailable(f"{backend}: classification inference rows only; detection rows time a training step")
    try:
        from rest import detection
    except ImportError as e:
        raise ModelUnavailable(f"rest.detection needs torchvision ({e})") from e
    torch.manual_seed(0)  # the same weights on every backend
    pinned = "reference" if backend == "compile" else backend
    variant = model_name(case.variant)
    autocast = case.dtype in (torch.float16, torch.bfloat16)
    param_dtype = torch.float32 if autocast else case.dtype
    H, W = DET_INPUTS[case.input]
    g = torch.Generator().manual_seed(0)
    images = torch.rand(case.batch, 3, H, W, generator=g).to(case.device, param_dtype)
    backbone_kwargs = dict(DET_MEMORY[case.memory], backend=pinned)
    if case.what == "backbone":
        model = detection.rest_fpn_backbone(variant, **backbone_kwargs)
    else:
        build = detection.retinanet_rest if case.what == "retinanet" else detection.maskrcnn_rest
        model = build(variant, num_classes=91, min_size=800, max_size=1333, backbone_kwargs=backbone_kwargs)
    model = model.to(case.device, param_dtype).train()
    if case.what == "backbone":
        net = _compile(model) if backend == "compile" else model

        def loss_of(x):
            return sum(m.float().mean() for m in net(x).values())
        inputs = images
    else:
        if backend == "compile":
            model.backbone = _compile(model.backbone)
        targets = _targets(case.batch, H, W, case.what == "maskrcnn", case.device)

        def loss_of(x):
            return sum(model(list(x), targets).values())
        inputs = images
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def amp():
        return torch.autocast(case.device, dtype=case.dtype, enabled=autocast)

    def run():
        opt.zero_grad(set_to_none=True)
        with amp():
            loss = loss_of(inputs)
        loss.backward()
        opt.step()
        return loss

    def saved():
        from rest_kernels.diagnostics import saved_tensor_bytes
        with torch.enable_grad(), amp():
            out, nbytes = saved_tensor_bytes(loss_of, inputs)
        del out
        return nbytes
    return Runner(run, case.batch, "images/s", saved)
