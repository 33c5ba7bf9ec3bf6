"""Test-time adaptation of PyTorch models: ``model = tta.adapt(model)``."""

from tta import methods as _builtin_methods  # noqa: F401  (registers the built-in methods)
from tta.api import Adapted, AutoChoice, adapt, choose_method
from tta.registry import available_methods, register_method, registered_methods
from tta.spec import MethodSpec, build_method, hparams

__all__ = [
    "Adapted",
    "AutoChoice",
    "MethodSpec",
    "adapt",
    "available_methods",
    "build_method",
    "choose_method",
    "hparams",
    "register_method",
    "registered_methods",
]
__version__ = "0.1.0"
