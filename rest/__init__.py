"""ResT model zoo on rest_kernels' fused ops (the models are added in rest/models.py)."""
from .modules import EMSA, PA

__all__ = ["EMSA", "PA"]
