"""Source-model checkpoints: weights + clean accuracy + training config, never silently worse.

A checkpoint file is ``{"state_dict", "clean_accuracy", "config", "history", "format"}``;
:func:`benchmarks.app.models.load_weights` reads its ``state_dict``. :func:`save_if_better`
replaces an existing checkpoint only when the new model's clean accuracy is at least as high
(or when forced); otherwise the new weights go beside it as ``<stem>.rejected.pt`` and the
decision says why, so a shorter or unlucky run never destroys a good model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from benchmarks.files import atomic_torch_save

CHECKPOINT_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class CheckpointDecision:
    """What :func:`save_if_better` did."""

    written: Path
    replaced_best: bool
    previous_accuracy: float | None
    message: str


def read_checkpoint_info(path: Path) -> dict[str, Any] | None:
    """The metadata of a checkpoint (everything but the weights), or None if there is none."""
    if not path.is_file():
        return None
    content = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(content, dict):
        return {}
    return {key: value for key, value in content.items() if key != "state_dict"}


def save_if_better(
    path: Path,
    state_dict: dict[str, torch.Tensor],
    clean_accuracy: float,
    config: dict[str, Any],
    history: list[dict[str, float]] | None = None,
    *,
    force: bool = False,
) -> CheckpointDecision:
    """Write a checkpoint to ``path`` unless a better one is there (see module docstring)."""
    if not 0.0 <= clean_accuracy <= 1.0:
        raise ValueError(f"clean_accuracy must be in [0, 1], got {clean_accuracy}")
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": {key: value.detach().cpu() for key, value in state_dict.items()},
        "clean_accuracy": float(clean_accuracy),
        "config": config,
        "history": history or [],
    }
    previous = read_checkpoint_info(path)
    previous_accuracy = None if previous is None else previous.get("clean_accuracy")
    if previous_accuracy is not None and clean_accuracy < previous_accuracy and not force:
        rejected = path.with_name(f"{path.stem}.rejected{path.suffix}")
        atomic_torch_save(payload, rejected)
        return CheckpointDecision(
            rejected,
            False,
            previous_accuracy,
            f"kept {path} (clean accuracy {previous_accuracy:.4f}); the new model reached only "
            f"{clean_accuracy:.4f} and was written to {rejected} (force=true replaces the best)",
        )
    atomic_torch_save(payload, path)
    if previous is None:
        message = f"wrote {path} (clean accuracy {clean_accuracy:.4f})"
    elif previous_accuracy is None:
        message = f"replaced {path}, which recorded no clean accuracy, (new: {clean_accuracy:.4f})"
    else:
        verb = "force-replaced" if clean_accuracy < previous_accuracy else "replaced"
        message = f"{verb} {path} (clean accuracy {previous_accuracy:.4f} -> {clean_accuracy:.4f})"
    return CheckpointDecision(path, True, previous_accuracy, message)
