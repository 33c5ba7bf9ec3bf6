"""An optional check that the batches given to ``tta.adapt``'s model are scaled as it expects.

Wrongly scaled inputs are the quietest way to get a bad number: 0-255 pixel values, or
images normalized twice, still produce logits, and test-time adaptation then adapts the
statistics to the wrong inputs. ``tta.adapt(model, ..., input_check="unit")`` looks at the
first batches and warns once (:class:`InputScaleWarning`) when their statistics do not fit:

* ``"unit"``: the model takes images in [0, 1] and normalizes them itself (RobustBench
  models, models wrapped with their normalization). Warned: values above 3 (0-255 pixels),
  or clearly negative values (inputs that were already mean/std-normalized).
* ``"normalized"``: the model takes mean/std-normalized inputs (a bare timm/torchvision
  network). Warned: 0-255 pixel values, and batches that lie entirely in [0, 1] with a
  positive mean (images that were never normalized).

Only the first ``batches`` batches are inspected (one device-to-host copy of four numbers
each); afterwards the check costs nothing, so it never slows down a long stream.
"""

from __future__ import annotations

import logging
import warnings

import torch

logger = logging.getLogger("tta")

EXPECTS = ("unit", "normalized")
#: above this, values cannot come from [0, 1] images, nor from normalizing them with any
#: usual mean/std (ImageNet's smallest std, 0.225, maps 1.0 to at most 2.7; 0-255 pixels go
#: far beyond)
_PIXEL_MAX = 3.0
_NEGATIVE = -0.1


class InputScaleWarning(UserWarning):
    """The incoming batches look scaled differently from what the model expects."""


def diagnose(low: float, high: float, mean: float, std: float, expects: str) -> str | None:
    """Why batch statistics do not fit ``expects``, or None when they do."""
    stats = f"min {low:.3g}, max {high:.3g}, mean {mean:.3g}, std {std:.3g}"
    if high > _PIXEL_MAX:
        return (
            f"inputs look like 0-255 pixel values ({stats}); the model expects "
            + ("images in [0, 1]: divide by 255" if expects == "unit" else "normalized inputs: divide by 255, then normalize")
        )
    if expects == "unit" and low < _NEGATIVE:
        return (
            f"inputs look already normalized ({stats}), but the model expects images in [0, 1] and normalizes "
            "them itself: pass the images before normalization (or input_check='normalized' if the model "
            "really takes normalized inputs)"
        )
    if expects == "normalized" and low >= 0.0 and high <= 1.0 and mean > 0.05:
        return (
            f"inputs look like unnormalized images in [0, 1] ({stats}), but the model expects mean/std-normalized "
            "inputs: normalize them first (or input_check='unit' if the model normalizes itself)"
        )
    return None


class InputCheck:
    """Inspects the first ``batches`` batches and warns at most once."""

    def __init__(self, expects: str = "unit", *, batches: int = 3) -> None:
        if expects not in EXPECTS:
            raise ValueError(f"input_check must be one of {EXPECTS} or None, got {expects!r}")
        if batches < 1:
            raise ValueError(f"batches must be >= 1, got {batches}")
        self.expects = expects
        self.batches = batches
        self.seen = 0
        self.message: str | None = None

    @property
    def done(self) -> bool:
        return self.message is not None or self.seen >= self.batches

    def __call__(self, x: torch.Tensor) -> None:
        if self.done or not isinstance(x, torch.Tensor) or x.numel() == 0:
            return
        self.seen += 1
        with torch.no_grad():
            values = x.detach().float()
            low, high = torch.aminmax(values)
            stats = torch.stack([low, high, values.mean(), values.std(correction=0)]).tolist()  # the one sync
        message = diagnose(*stats, expects=self.expects)
        if message is not None:
            self.message = message
            logger.warning("tta.adapt input check: %s", message)
            warnings.warn(message, InputScaleWarning, stacklevel=3)


def make_input_check(expects: str | None) -> InputCheck | None:
    """The check ``tta.adapt(..., input_check=expects)`` installs (None: no check)."""
    return None if expects is None else InputCheck(expects)
