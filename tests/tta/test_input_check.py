"""tta.adapt(..., input_check=...): one warning for wrongly scaled inputs, none for right ones."""

from __future__ import annotations

import warnings

import pytest
import torch

import tta
from tests.conftest import small_bn_cnn
from tta.input_check import InputCheck, InputScaleWarning, diagnose


def unit_images(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def normalized(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.45) / 0.25


def caught(model: torch.nn.Module, inputs: list[torch.Tensor]) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for x in inputs:
            model(x)
    return [w for w in seen if issubclass(w.category, InputScaleWarning)]


def test_pixel_values_warn_once_and_right_inputs_never() -> None:
    model = tta.adapt(small_bn_cnn(), "norm", input_check="unit")
    found = caught(model, [unit_images(seed=i) * 255 for i in range(4)])
    assert len(found) == 1 and "0-255 pixel values" in str(found[0].message) and "divide by 255" in str(found[0].message)
    assert caught(tta.adapt(small_bn_cnn(), "norm", input_check="unit"), [unit_images(seed=i) for i in range(4)]) == []
    assert caught(tta.adapt(small_bn_cnn(), "norm"), [unit_images() * 255]) == []  # off by default


def test_already_normalized_inputs_to_a_self_normalizing_model_warn() -> None:
    found = caught(tta.adapt(small_bn_cnn(), "norm", input_check="unit"), [normalized(unit_images())])
    assert len(found) == 1 and "already normalized" in str(found[0].message)
    found = caught(tta.adapt(small_bn_cnn(), "norm", input_check="normalized"), [unit_images()])
    assert len(found) == 1 and "unnormalized images in [0, 1]" in str(found[0].message)
    assert caught(tta.adapt(small_bn_cnn(), "norm", input_check="normalized"), [normalized(unit_images())]) == []


def test_only_the_first_batches_are_inspected() -> None:
    check = InputCheck("unit", batches=2)
    check(unit_images())
    check(unit_images())
    assert check.done and check.message is None
    check(unit_images() * 255)  # after the first two batches nothing is computed any more
    assert check.message is None
    with pytest.raises(ValueError, match="input_check must be one of"):
        tta.adapt(small_bn_cnn(), "norm", input_check="imagenet")
    assert diagnose(0.0, 1.0, 0.5, 0.29, "unit") is None
