"""ResT model zoo on rest_kernels' fused ops: the official architecture, init and state_dict keys."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .models import ResT, rest_base, rest_large, rest_lite, rest_small
from .modules import EMSA, PA

__all__ = ["ResT", "EMSA", "PA", "rest_lite", "rest_small", "rest_base", "rest_large",
           "load_checkpoint", "save_checkpoint", "CheckpointError"]
