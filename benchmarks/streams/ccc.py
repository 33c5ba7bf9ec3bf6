"""A continuously changing stream in the spirit of CCC (Press et al., "RDumb: A simple approach
that questions our progress in continual test-time adaptation", NeurIPS 2023).

CCC keeps the difficulty of a very long stream constant while its corruption never stops
changing: every image carries two corruptions whose severities walk, in small steps, from the
first alone to the second alone, along a path whose mean accuracy for a standard source model
stays at a target (CCC-Easy/Medium/Hard: 40/20/0 % on ImageNet), then on to a third, and so
on, for 7.5 million images. Our corruptions come at the five integer severities of CIFAR-10-C,
so the same idea is built from what they offer:

* a **calibration table**: the source model's accuracy at every (corruption, severity)
  (:func:`calibrate`, once per model and dataset, on a few hundred clean images);
* the **states** of the walk: the (corruption, severity) pairs whose calibrated accuracy lies
  within ``band`` of the target accuracy (a corruption that never comes close drops out, as
  CCC drops brightness for its harder variants);
* the **walk**: from the current state to a random other corruption's state (the one of its
  allowed severities closest to the target), blending over ``transition`` steps: the share of
  images of the next state rises linearly while the rest keep the current one, so the mixture
  changes smoothly, as CCC's pair of noises does; then it stays ``dwell`` steps there;
* every **step** holds ``speed`` images drawn afresh, without replacement within the step,
  from the clean pool; every image position is its own corruption draw.

:func:`walk_schedule` returns the steps; the stream planner turns each into a segment whose
images carry their own corruption and severity. The error per window of the result then shows
whether a method drifts over the whole length.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.files import atomic_write_text

#: (corruption, severity) -> accuracy of the source model, in [0, 1]
AccuracyTable = dict[tuple[str, int], float]


@dataclass(frozen=True)
class WalkStep:
    """``speed`` images: a share ``1 - blend`` from ``current``, ``blend`` from ``following``."""

    current: tuple[str, int]
    following: tuple[str, int]
    blend: float


def allowed_states(table: AccuracyTable, target: float, band: float) -> list[tuple[str, int]]:
    """The (corruption, severity) states whose accuracy lies within ``band`` of ``target``."""
    return sorted(state for state, accuracy in table.items() if abs(accuracy - target) <= band)


def walk_schedule(
    table: AccuracyTable,
    target: float,
    num_steps: int,
    rng: np.random.Generator,
    *,
    band: float = 0.1,
    transition: int = 5,
    dwell: int = 5,
) -> list[WalkStep]:
    """The first ``num_steps`` steps of the walk (see the module docstring).

    Raises:
        ValueError: fewer than two corruptions have a state within ``band`` of ``target``.
    """
    states = allowed_states(table, target, band)
    by_corruption: dict[str, list[tuple[str, int]]] = {}
    for state in states:
        by_corruption.setdefault(state[0], []).append(state)
    if len(by_corruption) < 2:
        raise ValueError(
            f"a walk needs two corruptions within {band} of accuracy {target}; the table offers "
            f"{sorted(by_corruption) or 'none'}"
        )
    if transition < 1 or dwell < 0 or num_steps < 1:
        raise ValueError("transition must be >= 1, dwell >= 0 and num_steps >= 1")
    names = sorted(by_corruption)

    def closest(corruption: str) -> tuple[str, int]:
        return min(by_corruption[corruption], key=lambda s: (abs(table[s] - target), s[1]))

    current = closest(names[int(rng.integers(len(names)))])
    steps: list[WalkStep] = []
    while len(steps) < num_steps:
        others = [n for n in names if n != current[0]]
        following = closest(others[int(rng.integers(len(others)))])
        steps += [WalkStep(current, current, 0.0)] * dwell
        steps += [WalkStep(current, following, (i + 1) / (transition + 1)) for i in range(transition)]
        current = following
    return steps[:num_steps]


def step_assignments(
    step: WalkStep, speed: int, pool_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(rows of the clean pool, whether each image takes the following state) for one step."""
    if speed > pool_size:
        raise ValueError(f"a step of {speed} images needs a pool of at least as many, got {pool_size}")
    rows = rng.choice(pool_size, size=speed, replace=False).astype(np.int64)
    following = rng.random(speed) < step.blend
    return rows, following


# -- calibration ------------------------------------------------------------------------------------
def calibrate(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    corrupt_fn: Callable[..., torch.Tensor],
    corruptions: Sequence[str],
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    *,
    batch_size: int = 256,
    seed: int = 0,
) -> AccuracyTable:
    """The source model's accuracy on ``images`` (float ``(N, 3, H, W)`` in [0, 1]) under every
    (corruption, severity): the table a walk is calibrated to. The model runs in eval mode
    without gradients; corruption draws use ``seed`` and the image index."""
    model.eval()
    table: AccuracyTable = {}
    ids = torch.arange(len(images))
    with torch.no_grad():
        for corruption in corruptions:
            for severity in severities:
                correct = 0
                for start in range(0, len(images), batch_size):
                    chunk = slice(start, start + batch_size)
                    x = corrupt_fn(images[chunk], corruption, severity, seed=seed, sample_ids=ids[chunk])
                    correct += int((model(x).argmax(1) == labels[chunk]).sum())
                table[(corruption, int(severity))] = correct / len(images)
    return table


def save_table(table: AccuracyTable, path: str | Path, **meta: object) -> None:
    rows = [{"corruption": c, "severity": s, "accuracy": a} for (c, s), a in sorted(table.items())]
    atomic_write_text(path, json.dumps({"meta": meta, "table": rows}, indent=1))


def load_table(path: str | Path) -> AccuracyTable:
    data = json.loads(Path(path).read_text())
    return {(row["corruption"], int(row["severity"])): float(row["accuracy"]) for row in data["table"]}
