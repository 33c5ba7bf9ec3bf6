"""The method protocol every adaptation method implements.

A method does two things:

* :meth:`Method.convert` once, at wrap time, on the model copy the wrapper owns: replace or
  configure layers, pick trainable parameters, build optimizers;
* :meth:`Method.step` once per incoming batch: adapt and return the prediction for the batch
  (for optimizing methods, the output of the forward before the parameter update).

Roles decide how methods compose (``"unmix_tns+sar"``): a ``statistics`` method replaces the
normalization layers; an ``objective`` or ``output`` method runs the step on whatever layers
it finds. A composite converts with the statistics method first, then the other one, and
steps with the other one. Statistics layers update at most once per step, from the step's
first forward (see :class:`tta.layers.base.AdaptiveNorm`): under SAR, which forwards twice
per batch, the perturbed second forward normalizes with the same statistics but does not move
them again (the official code would update twice).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

STATISTICS = "statistics"
OBJECTIVE = "objective"
OUTPUT = "output"
NONE = "none"


@dataclasses.dataclass
class NoHparams:
    """A method without hyperparameters."""


class Method:
    """Base class of adaptation methods. Subclasses set ``name``, ``role`` and ``Hparams``."""

    name: ClassVar[str]
    role: ClassVar[str] = NONE
    Hparams: ClassVar[type] = NoHparams
    #: statistics method an objective method runs on when used alone (TENT: "norm")
    default_statistics: ClassVar[str | None] = None
    #: whether S independent streams can share one batched forward
    supports_streams: ClassVar[bool] = False

    def __init__(self, num_streams: int = 1, **hparams: Any) -> None:
        valid = [field.name for field in dataclasses.fields(self.Hparams)]
        unknown = sorted(set(hparams) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown hyperparameter(s) {unknown} for method {self.name!r}; "
                f"valid: {valid or 'none'}"
            )
        if num_streams != 1 and not self.supports_streams:
            raise ValueError(f"method {self.name!r} does not support num_streams > 1")
        self.num_streams = num_streams
        self.hparams = self.Hparams(**hparams)
        self.validate()

    def validate(self) -> None:
        """Check hyperparameter values; raise ``ValueError`` naming the bad one."""

    def convert(self, model: nn.Module) -> nn.Module:
        return model

    def step(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The prediction :meth:`step` would return, without changing any state."""
        with torch.no_grad():
            return model(x)

    @property
    def episodic(self) -> bool:
        """Whether the wrapper restores the initial state before every batch."""
        return bool(getattr(self.hparams, "episodic", False))

    def extra_state(self) -> dict[str, Any]:
        """State that is not in the module state dict (optimizer state, scalars)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    def describe(self) -> str:
        fields = dataclasses.asdict(self.hparams)
        inner = ", ".join(f"{key}={value!r}" for key, value in fields.items())
        return f"{self.name}({inner})"


def require_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
