"""ONNX export of ResT and ResTv2 models: the fused EMSA / PA ops written out as standard ONNX operators.

ONNX runtimes know nothing of rest_kernels' custom ops, so the exported graph must hold the official
math as standard operators (MatMul, Conv, Softmax, Sigmoid, and for ResTv2 DepthToSpace...). The backend registry already picks
the `reference` math while torch.onnx.is_in_onnx_export() is true, and the reference then writes the
attention in its export form (rest_kernels.backends.reference.emsa_export_form: the InstanceNorm of
the softmax map as rstd * ((P - 1/M) v) with the centred statistic, which the engines' float32
evaluates as accurately as PyTorch, where their InstanceNormalization cancels on near-uniform maps).
export_onnx additionally pins the `reference` backend for the duration of the export, so the file is
the same whichever exporter runs (torch.onnx.export's dynamo exporter, default since torch 2.9 and
needing onnxscript, or the TorchScript one with dynamo=False) and whatever backend the model's
modules were pinned to.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

import rest_kernels

from .checkpoint import unwrap_model

__all__ = ["export_onnx"]


def _pinned_backends(model: nn.Module):
    from .modules import EMSA, PA, EMSAv2
    return [(m, m.backend) for m in model.modules() if isinstance(m, (EMSA, EMSAv2, PA))]


def export_onnx(model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor | None = None, *,
                dynamic_batch: bool | None = None, dynamic_size: bool | None = None, dynamo: bool = True,
                opset_version: int | None = None,
                input_name: str = "images", output_name: str = "logits", **export_kwargs) -> str:
    """Export `model` (in eval mode) to the ONNX file `path` with the EMSA / PA ops as standard ONNX
    operators; returns the path.

    example_input: a (B, 3, H, W) tensor to trace with (default: 2 x 3 x 224 x 224 on the model's
    device and dtype). dynamic_batch, dynamic_size: the batch dimension, and the image's height and
    width, stay free in the file (default: both, with the dynamo exporter; the TorchScript exporter
    bakes the example's sizes into the graph, so its file has the example's fixed shape).
    dynamo: torch.onnx.export's exporter (True: the torch.export-based one, needs onnxscript;
    False: the TorchScript-based one). Further keyword arguments go to torch.onnx.export.
    The model is put in eval mode (BatchNorm on running statistics) and restored afterwards.
    """
    path = os.fspath(path)
    model = unwrap_model(model)
    if example_input is None:
        ref = next(model.parameters())
        example_input = torch.randn(2, 3, 224, 224, device=ref.device, dtype=ref.dtype)
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
        raise ValueError("example_input must be a (B, 3, H, W) tensor, got "
                         + (f"shape {tuple(example_input.shape)}" if isinstance(example_input, torch.Tensor)
                            else type(example_input).__name__))
    dynamic_batch = dynamo if dynamic_batch is None else dynamic_batch
    dynamic_size = dynamo if dynamic_size is None else dynamic_size
    for name, flag in (("dynamic_batch", dynamic_batch), ("dynamic_size", dynamic_size)):
        if flag and not dynamo:
            raise ValueError(f"{name} needs the dynamo exporter (dynamo=True): the TorchScript exporter "
                             "bakes the example's sizes into the graph")
    if dynamic_batch and example_input.shape[0] == 1:
        # torch.export specialises size-1 dimensions: trace with two copies of the example instead
        example_input = torch.cat([example_input, example_input])
    was_training = model.training
    pinned = _pinned_backends(model)
    kwargs = dict(input_names=[input_name], output_names=[output_name], dynamo=dynamo)
    if opset_version is not None:
        kwargs["opset_version"] = opset_version
    dims = {}
    if dynamic_batch:
        dims[0] = torch.export.Dim("batch", min=1, max=1 << 16)
    if dynamic_size:  # any size the model takes in PyTorch: its sizes are computed, not assumed
        dims[2] = torch.export.Dim("height", min=1, max=1 << 16)
        dims[3] = torch.export.Dim("width", min=1, max=1 << 16)
    if dims:
        kwargs["dynamic_shapes"] = {"x": dims}
    kwargs.update(export_kwargs)
    try:
        model.eval()
        for m, _ in pinned:  # modules pinned to a fused backend: the official math for the export
            m.backend = "reference"
        with rest_kernels.use_backend("reference"), torch.no_grad():
            torch.onnx.export(model, (example_input,), path, **kwargs)
    finally:
        for m, backend in pinned:
            m.backend = backend
        model.train(was_training)
    return path
