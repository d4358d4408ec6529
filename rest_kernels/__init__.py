"""rest-kernels: fused kernels for ResT's EMSA attention and PA gate.

    rest_kernels.emsa_attention(q, k, v, mix_weight=None, mix_bias=None, *, scale=None, eps=1e-5, backend=None)
    rest_kernels.pa_gate(x, weight, bias=None, *, backend=None)
    rest_kernels.emsa_attention_map(q, k, mix_weight=None, mix_bias=None, *, scale=None, eps=1e-5)
    rest_kernels.use_backend(name)          # context manager: default backend of this thread
    rest_kernels.available_backends()       # {name: None or the reason it is unusable here}
    rest_kernels.check_backend_name(name)   # name, or TypeError / ValueError listing the backends
"""
from .backends.reference import emsa_reference, pa_reference
from .backends.registry import (BackendUnavailableError, available_backends, check_backend_name, default_backend,
                                use_backend)
from .ops import direct_kernels_in_traces, emsa_attention, emsa_attention_map, pa_gate

__all__ = [
    "emsa_attention", "pa_gate", "use_backend", "available_backends", "default_backend",
    "BackendUnavailableError", "emsa_reference", "pa_reference", "emsa_attention_map", "check_backend_name",
    "direct_kernels_in_traces",
]
__version__ = "0.1.0"
