"""Compute-aware online evaluation: the stream does not wait for a slow method.

Alfarra et al., ICML 2024, "Evaluation of Test-Time Adaptation Under Computational Time
Constraints" (official code: MotasemAlfarra/Online_Test_Time_Adaptation, ``utils/online_eval.py``,
``delayed_eval_online``). The stream reveals a new batch at ``eta`` times the rate at which the
plain, non-adapting model predicts one (``eta`` in (0, 1]; 1 = as fast as plain inference).
A method whose step takes ``r`` times as long as plain inference is still busy when the next
``ceil(r * eta) - 1`` batches arrive: it adapts on the batch it started, and the batches it
misses are predicted by its latest model without adapting. Per batch, as the official loop
does it:

* ``delay == 0``: run the adapting step on the batch, time it, time the plain model on the
  same batch, ``r = t_step / t_plain``, ``delay += max(0, ceil(r * eta) - 1)``;
* ``delay > 0``: predict the batch with the current model without adapting; ``delay -= 1``.

Two choices are ours, stated here because they change figures:

* the plain model is the *source* model (the network before wrapping, in eval mode, under
  ``torch.no_grad``), not the adapted network's forward (the official ``model.model``), so the
  reference does not depend on what the method changed in its copy (for BN methods the
  official reference runs in train mode and includes its statistics update);
* the cost can be *declared* instead of measured (``cost=r``): a fixed ratio, e.g. from
  ``python -m benchmarks.perf``, gives the same skip pattern on every machine and makes the
  run reproducible bit for bit; measured costs on a busy CPU vary from run to run.

The official code's "single model" variant (missed batches get random predictions) is not
implemented.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.evaluation.memory import synchronize

Model = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ComputeBudget:
    """Decides, batch by batch, whether a method may adapt (see the module docstring).

    Args:
        eta: stream speed as a fraction of plain inference, in (0, 1].
        plain_model: the non-adapting reference model (timed on each adapting batch); needed
            unless ``cost`` is given.
        cost: a declared step cost (time of an adapting step over time of plain inference);
            None measures it on every adapting batch, as the official code does.
        device: where to synchronise before reading the clock (CUDA).
    """

    eta: float
    plain_model: Model | None = None
    cost: float | None = None
    device: torch.device | str = "cpu"
    #: batches still to be missed because the last adapting step is running
    delay: int = 0
    adapted_batches: int = 0
    skipped_batches: int = 0
    #: the ratio of each adapting batch (measured or declared)
    ratios: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if not (isinstance(self.eta, (int, float)) and 0.0 < float(self.eta) <= 1.0):
            raise ValueError(f"eta must be in (0, 1], got {self.eta!r}")
        if self.cost is not None and not (math.isfinite(self.cost) and self.cost > 0):
            raise ValueError(f"cost must be a positive ratio to plain inference, got {self.cost!r}")
        if self.cost is None and self.plain_model is None:
            raise ValueError("a measured cost needs the plain model to time against")

    def missed(self, ratio: float) -> int:
        """Batches that arrive while a step of cost ``ratio`` runs (the official rule)."""
        return max(0, math.ceil(ratio * float(self.eta)) - 1)

    def __call__(self, model: Any, images: torch.Tensor) -> torch.Tensor:
        """The prediction for ``images``: an adapting step of ``model`` (a ``tta.Adapted``), or
        its latest model's prediction without adapting while an earlier step still runs."""
        if not hasattr(model, "no_adapt"):
            raise TypeError("compute-aware evaluation needs a model that can predict without adapting (tta.Adapted)")
        if self.delay > 0:
            self.delay -= 1
            self.skipped_batches += 1
            with model.no_adapt():
                return model(images)
        if self.cost is not None:
            output, ratio = model(images), float(self.cost)
        else:
            output, step_seconds = self._timed(model, images)
            with torch.no_grad():
                _, plain_seconds = self._timed(self.plain_model, images)  # type: ignore[arg-type]
            ratio = step_seconds / max(plain_seconds, 1e-9)
        self.ratios.append(ratio)
        self.adapted_batches += 1
        self.delay += self.missed(ratio)
        return output

    def _timed(self, model: Model, images: torch.Tensor) -> tuple[torch.Tensor, float]:
        synchronize(self.device)
        tick = time.perf_counter()
        output = model(images)
        synchronize(self.device)
        return output, time.perf_counter() - tick

    # -- checkpoints and the record ----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"delay": self.delay, "adapted_batches": self.adapted_batches,
                "skipped_batches": self.skipped_batches, "ratios": list(self.ratios)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.delay = int(state["delay"])
        self.adapted_batches = int(state["adapted_batches"])
        self.skipped_batches = int(state["skipped_batches"])
        self.ratios = [float(r) for r in state["ratios"]]

    def summary(self) -> dict[str, Any]:
        """What the budget did, for the run record."""
        total = self.adapted_batches + self.skipped_batches
        return {
            "eta": float(self.eta),
            "cost": "measured" if self.cost is None else float(self.cost),
            "adapted_batches": self.adapted_batches,
            "skipped_batches": self.skipped_batches,
            "adapted_fraction": self.adapted_batches / total if total else float("nan"),
            "median_ratio": statistics.median(self.ratios) if self.ratios else float("nan"),
        }
