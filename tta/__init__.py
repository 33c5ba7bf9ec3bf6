"""Test-time adaptation of PyTorch models: ``model = tta.adapt(model)``."""

from tta.api import Adapted, adapt, choose_method
from tta.registry import available_methods, build_method, register_method

__all__ = ["Adapted", "adapt", "available_methods", "build_method", "choose_method", "register_method"]
__version__ = "0.1.0"
