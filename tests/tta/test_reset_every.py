"""RDumb's periodic reset as an option of every method (``tta.adapt(..., reset_every=N)``)."""

from __future__ import annotations

import pytest
import torch

import tta
from tests.conftest import small_bn_cnn


def _batches(n: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    return [torch.randn(8, 3, 8, 8, generator=generator) * 1.3 + 0.2 for _ in range(n)]


@pytest.mark.parametrize("method", ["tent", "rbn", "unmix_tns+tent"])
def test_the_state_is_put_back_before_every_nth_step(method: str) -> None:
    model, xs = small_bn_cnn(), _batches(7)
    periodic = tta.adapt(model, method, reset_every=3)
    manual = tta.adapt(model, method)
    outs = []
    for index, x in enumerate(xs):
        if index and index % 3 == 0:
            manual.reset()
        outs.append(periodic(x))
        torch.testing.assert_close(outs[-1], manual(x), rtol=0, atol=0)
    fresh = tta.adapt(model, method)(xs[3])
    plain = tta.adapt(model, method)
    without = [plain(x) for x in xs]
    assert torch.equal(outs[3], fresh) and not torch.equal(without[3], fresh)  # the reset mattered


def test_failed_and_non_finite_steps_do_not_count() -> None:
    model, xs = small_bn_cnn(), _batches(6)
    periodic = tta.adapt(model, "tent", reset_every=2)
    manual = tta.adapt(model, "tent")
    bad = xs[1].clone()
    bad[0, 0, 0, 0] = float("nan")
    sequence = [xs[0], bad, xs[1], xs[2], xs[3], xs[4]]  # the NaN batch is no step
    counted = 0
    for x in sequence:
        finite = bool(torch.isfinite(x).all())
        if finite and counted and counted % 2 == 0:
            manual.reset()
        a, b = periodic(x), manual(x)
        if finite:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            counted += 1
    with pytest.raises(ValueError):
        periodic(torch.randn(8, 3))  # a batch of the wrong rank raises before any state changes
    assert int(periodic.get_extra_state()["schedule"]["steps"]) == counted


def test_the_schedule_survives_a_state_dict_round_trip() -> None:
    model, xs = small_bn_cnn(), _batches(5)
    first = tta.adapt(model, "tent", reset_every=3)
    for x in xs[:2]:
        first(x)
    saved = first.state_dict()
    second = tta.adapt(model, "tent", reset_every=3)
    second.load_state_dict(saved)
    for x in xs[2:]:
        torch.testing.assert_close(second(x), first(x), rtol=0, atol=0)
    first.reset()
    assert first.get_extra_state()["schedule"]["steps"] == 0
    assert "schedule" not in tta.adapt(model, "tent").get_extra_state()  # nothing without the option


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "3"])
def test_reset_every_must_be_a_positive_count(value) -> None:
    with pytest.raises(ValueError, match="reset_every"):
        tta.adapt(small_bn_cnn(), "tent", reset_every=value)
