"""One general composition: a statistics method under an objective or output method."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tta.methods.base import STATISTICS, Method
from tta.surgery import find_norm_layers


def check_parts(statistics: Any, method: Any) -> None:
    """Raise ``ValueError`` unless ``statistics`` (a method or its class) is a statistics
    method and ``method`` is not one."""
    if statistics.role != STATISTICS:
        raise ValueError(f"the first part of a composition must be a statistics method, got {statistics.name!r}")
    if method.role == STATISTICS:
        raise ValueError(f"cannot stack two statistics methods ({statistics.name!r}, {method.name!r})")


class Composite(Method):
    """``"<statistics>+<method>"``: convert with both (statistics first), step with the second.

    It holds no state of its own: the state is its parts' (:meth:`parts`), which the guard,
    ``state_dict()`` and ``.to()`` visit."""

    def __init__(self, statistics: Method, method: Method, *, implicit: bool = False, seed: int | None = None) -> None:
        check_parts(statistics, method)
        self.statistics = statistics
        self.method = method
        # An objective used alone ("tent") runs on its default statistics method ("norm") when
        # the model has BatchNorm layers, and directly on GroupNorm/LayerNorm models otherwise.
        self.implicit = implicit
        self.name = method.name if implicit else f"{statistics.name}+{method.name}"  # type: ignore[misc]
        self.role = method.role  # type: ignore[misc]
        self.num_streams = method.num_streams
        self.hparams = method.hparams
        if seed is not None:
            self.set_seed(seed)

    @property
    def episodic(self) -> bool:
        return self.method.episodic

    def convert(self, model: nn.Module) -> nn.Module:
        if not (self.implicit and not find_norm_layers(model)):
            model = self.statistics.convert(model)
        return self.method.convert(model)

    def step(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.method.step(model, x)

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.method.predict(model, x)

    def set_seed(self, seed: int) -> None:
        self.statistics.set_seed(seed)
        self.method.share_generator(self.statistics)

    @property
    def generator(self) -> torch.Generator:  # type: ignore[override]
        return self.statistics.generator

    def generator_on(self, device: torch.device | str) -> torch.Generator:
        return self.statistics.generator_on(device)

    def generators(self) -> list[torch.Generator]:
        return self.statistics.generators()

    def parts(self) -> list[Method]:
        return [self.statistics, self.method]

    def follow_device(self, fn: Any) -> None:
        self.statistics.follow_device(fn)
        self.method.follow_device(fn)

    def extra_state(self) -> dict[str, Any]:
        return {"statistics": self.statistics.extra_state(), "method": self.method.extra_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.statistics.load_extra_state(state["statistics"])
        self.method.load_extra_state(state["method"])

    def describe(self) -> str:
        return f"{self.statistics.describe()}+{self.method.describe()}"
