"""ResT and ResTv2 model zoo on rest_kernels' fused ops: the official architecture, init and state_dict keys."""
from .cpu_allocator import tune_cpu_allocator
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .export import export_onnx
from .inference import CompiledInference, compile_for_inference, optimize_for_inference
from .models import ResT, rest_base, rest_large, rest_lite, rest_small
from .models_v2 import ResTV2, restv2_base, restv2_large, restv2_small, restv2_tiny
from .modules import EMSA, PA, EMSAv2

__all__ = ["ResT", "EMSA", "PA", "rest_lite", "rest_small", "rest_base", "rest_large",
           "ResTV2", "EMSAv2", "restv2_tiny", "restv2_small", "restv2_base", "restv2_large",
           "load_checkpoint", "save_checkpoint", "CheckpointError", "export_onnx", "optimize_for_inference",
           "compile_for_inference", "CompiledInference",
           "tune_cpu_allocator"]

# timm integration: register the variants in timm's model registry when timm is installed (no hard
# dependency). A broken timm install must not break `import rest`: it is skipped with a warning.
try:
    import timm as _timm  # noqa: F401
except ImportError:
    _timm = None
if _timm is not None:
    try:
        from . import timm_integration  # noqa: F401
    except Exception as _e:  # noqa: BLE001  (an incompatible timm version: any error at import)
        import warnings as _warnings
        _warnings.warn(f"rest: timm is installed but registering ResT in it failed ({type(_e).__name__}: {_e}); "
                       "timm.create_model('rest_*') will not work", RuntimeWarning, stacklevel=2)
