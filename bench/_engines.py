"""The deployment engines a user would pick instead of running ResT in PyTorch: ONNX Runtime and
OpenVINO, running the file rest.export_onnx writes (CPU, model inference rows only).

Settings, as the engines document their best for a CPU (and written into each row, "engine_settings"):
- ONNX Runtime: the CPU execution provider, every graph optimisation (ORT_ENABLE_ALL), intra-op
  threads = the benchmark's threads (torch.get_num_threads()), one inter-op thread, sequential
  execution. Its CPU provider computes in float32 only: no bfloat16 rows.
- OpenVINO: the CPU plugin, INFERENCE_NUM_THREADS = the benchmark's threads, the performance hint
  of the case (LATENCY for batch 1; THROUGHPUT otherwise, the batch split over the plugin's optimal
  number of asynchronous requests, as THROUGHPUT is meant to be used) and INFERENCE_PRECISION_HINT
  stated: f32 for float32 rows (OpenVINO's default on CPUs with avx512_bf16 or AMX is bf16, which a
  float32 row must not get), bf16 for bfloat16 rows (only where the CPU has native bf16; the plugin
  would otherwise silently compute in f32).
The file: rest.export_onnx of the same model (float32 weights, free batch, the case's image size),
written once per model and reused for every batch and dtype.
"""
from __future__ import annotations

import importlib
import logging
import os
import tempfile

import numpy as np
import torch

ENGINES = ("onnxruntime", "openvino")
_INSTALL = {"onnxruntime": "pip install onnxruntime onnx onnxscript (the 'onnx' extra)",
            "openvino": "pip install openvino onnx onnxscript (the 'openvino' extra)"}


def unavailable_reason(engine: str, device: str) -> str | None:
    """Why `engine` can have no row at all in this run (None: it can)."""
    if device != "cpu":
        return f"{engine} rows run on the CPU; this run is on {device} (--device)"
    for module in (engine, "onnx", "onnxscript"):
        try:
            importlib.import_module(module)
        except Exception as e:  # ImportError, or a broken install
            return f"{module} cannot be imported ({type(e).__name__}: {e}); {_INSTALL[engine]}"
    return None


def case_reason(engine: str, case) -> str | None:
    """Why `engine` cannot run this case (None: it can)."""
    if case.kind != "model" or case.mode != "infer":
        return "deployment engines run whole exported models for inference (model infer rows) only"
    if case.dtype == torch.bfloat16:
        if engine == "onnxruntime":
            return "ONNX Runtime's CPU execution provider computes in float32 only (no bfloat16 inference mode)"
        import openvino as ov
        if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            return "this CPU has no native bf16 (OpenVINO would run f32 under a bf16 hint)"
        return None
    if case.dtype != torch.float32:
        return f"benchmarked in float32 and bfloat16 only, not {case.dtype}"
    return None


_exports: dict = {}


def exported(model: torch.nn.Module, key, image: int) -> str:
    """The ONNX file of `model` (float32, free batch), written once per key for the process."""
    if key not in _exports:
        folder = tempfile.mkdtemp(prefix="rest_bench_onnx_")
        path = os.path.join(folder, f"{key[0]}.onnx")
        import rest
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        example = torch.randn(2, 3, image, image)
        rest.export_onnx(model.float(), path, example, dynamic_size=False)
        _exports[key] = path
    return _exports[key]


def runner(engine: str, path: str, images: torch.Tensor, dtype: torch.dtype, threads: int):
    """(fn, settings): fn() runs one batch and returns the logits as a torch tensor."""
    x = images.float().numpy()
    if engine == "onnxruntime":
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        settings = dict(version=ort.__version__, provider="CPUExecutionProvider", graph_optimization_level="ORT_ENABLE_ALL",
                        intra_op_num_threads=threads, inter_op_num_threads=1, execution_mode="ORT_SEQUENTIAL")

        def run():
            return torch.from_numpy(session.run(None, {name: x})[0])
        return run, settings

    import openvino as ov
    precision = "bf16" if dtype == torch.bfloat16 else "f32"
    hint = "LATENCY" if x.shape[0] == 1 else "THROUGHPUT"
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": threads}
    compiled = ov.Core().compile_model(path, "CPU", config)
    settings = dict(version=ov.__version__, device="CPU", **config,
                    NUM_STREAMS=int(compiled.get_property("NUM_STREAMS")))
    if hint == "LATENCY":
        request = compiled.create_infer_request()

        def run():
            return torch.from_numpy(request.infer({0: x})[0].copy())
        return run, settings
    n = max(1, min(x.shape[0], int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))))
    chunks = [np.ascontiguousarray(c) for c in np.array_split(x, n)]
    queue = ov.AsyncInferQueue(compiled, n)
    results = [None] * n

    def done(request, i):
        results[i] = request.get_output_tensor(0).data.copy()
    queue.set_callback(done)
    settings["async_requests"] = n

    def run():
        for i, chunk in enumerate(chunks):
            queue.start_async({0: chunk}, i)
        queue.wait_all()
        return torch.from_numpy(np.concatenate(results))
    return run, settings
