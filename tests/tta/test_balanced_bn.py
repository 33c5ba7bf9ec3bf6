"""Balanced BN (TRIBE): hand-computed per-class statistics, the method's two-pass step, and a
differential test against the official code (TRIBE_OFFICIAL_SRC=<checkout of
Gorilla-Lab-SCUT/TRIBE>; skipped without it)."""

from __future__ import annotations

import copy
import importlib.util
import sys

import pytest
import torch
from torch import nn

import tta
from tta.layers.balanced_bn import BalancedBatchNorm
from tta.surgery import source_state

from tests.official import checkout_root

from tests.conftest import batches, small_bn_cnn


def _layer(channels: int = 1, num_classes: int = 3, eta: float = 0.5, gamma: float = 0.0, streams: int = 1):
    bn = nn.BatchNorm2d(channels).eval()  # source statistics: mean 0, variance 1
    return BalancedBatchNorm(source_state(bn), num_classes=num_classes, eta=eta, gamma=gamma, num_streams=streams)


# two samples of class 0 (spatial means 2 and 4, variance 1 each), one of class 2 (constant -2)
_X = torch.tensor([[[[1.0, 3.0]]], [[[3.0, 5.0]]], [[[-2.0, -2.0]]]])
_Y = torch.tensor([0, 0, 2])


def _update(layer: BalancedBatchNorm, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    layer.labels = labels
    out = layer(x)
    layer.commit()
    return out


def test_class_statistics_hand_computed_gamma_0() -> None:
    layer = _layer(eta=0.5, gamma=0.0)
    out = _update(layer, _X, _Y)
    # m = eta = 0.5 (n_0 = 2 is not > 1/eta); delta_0 = 0.5 (2 + 4) = 3, delta_2 = -1;
    # S_0 = (1 + 9) / 2 + (9 + 25) / 2 = 22, S_2 = 4
    # var_0 = 1 + 0.5 (22 - 2) - 9 = 2, var_2 = 1 + 0.5 (4 - 1) - 1 = 1.5; class 1 untouched
    torch.testing.assert_close(layer.local_mean[0, :, 0], torch.tensor([3.0, 0.0, -1.0]))
    torch.testing.assert_close(layer.local_var[0, :, 0], torch.tensor([2.0, 1.0, 1.5]))
    # global: mean of class means 2/3; mean of variances 1.5 + unbiased variance of (3, 0, -1) = 13/3
    torch.testing.assert_close(layer.global_mean[0], torch.tensor([2.0 / 3.0]))
    torch.testing.assert_close(layer.global_var[0], torch.tensor([1.5 + 13.0 / 3.0]))
    expected = (_X - 2.0 / 3.0) / torch.sqrt(torch.tensor(1.5 + 13.0 / 3.0 + layer.eps))
    torch.testing.assert_close(out, expected)


def test_class_statistics_hand_computed_gamma_half() -> None:
    layer = _layer(eta=0.5, gamma=0.5)
    _update(layer, _X, _Y)
    # class step 0.5 delta_k, then every class shifts by 0.5 mean(3, -1) = 0.5
    torch.testing.assert_close(layer.local_mean[0, :, 0], torch.tensor([2.0, 0.5, 0.0]))
    # class step: var_0 = 1 + 0.5 (0.5 * 20 - 9) = 1.5, var_2 = 1 + 0.5 (0.5 * 3 - 1) = 1.25;
    # shared step with gap = mean(0.5*22 - 9, 0.5*4 - 1) = 1.5 and rate = mean(0.5*2, 0.5*1) = 0.75
    torch.testing.assert_close(layer.local_var[0, :, 0], torch.tensor([1.6875, 1.375, 1.53125]))
    torch.testing.assert_close(layer.global_mean[0], torch.tensor([5.0 / 6.0]))
    torch.testing.assert_close(layer.global_var[0], torch.tensor([1.53125 + 13.0 / 12.0]))


def test_frequent_class_moves_to_its_batch_statistics() -> None:
    # n = 5 > 1 / eta = 4: step 1 / n, so the class statistics become the batch's exactly
    layer = _layer(eta=0.25)
    x = torch.arange(1.0, 6.0).view(5, 1, 1, 1)
    _update(layer, x, torch.ones(5, dtype=torch.long))
    torch.testing.assert_close(layer.local_mean[0, :, 0], torch.tensor([0.0, 3.0, 0.0]))
    torch.testing.assert_close(layer.local_var[0, :, 0], torch.tensor([1.0, 2.0, 1.0]))


def test_unlabelled_forward_is_a_robust_bn_average_and_frozen_changes_nothing() -> None:
    layer = _layer(eta=0.5)
    x = torch.tensor([[[[1.0, 3.0]]], [[[3.0, 5.0]]]])  # mean 3, biased variance 2
    layer.frozen = True
    torch.testing.assert_close(layer(x), x / (1 + layer.eps) ** 0.5)
    layer.commit()
    torch.testing.assert_close(layer.global_mean, torch.zeros(1, 1))
    layer.frozen = False
    layer(x)
    layer.commit()
    torch.testing.assert_close(layer.global_mean, torch.tensor([[1.5]]))
    torch.testing.assert_close(layer.global_var, torch.tensor([[1.5]]))
    torch.testing.assert_close(layer.local_mean, torch.zeros(1, 3, 1))  # untouched


def test_streams_are_independent() -> None:
    generator = torch.Generator().manual_seed(0)
    joint = _layer(channels=4, num_classes=5, eta=0.3, gamma=0.2, streams=2)
    single = [_layer(channels=4, num_classes=5, eta=0.3, gamma=0.2) for _ in range(2)]
    for _ in range(3):
        xs = [torch.randn(6, 4, 3, 3, generator=generator) + i for i in range(2)]
        ys = [torch.randint(0, 5, (6,), generator=generator) for _ in range(2)]
        out = _update(joint, torch.cat(xs), torch.cat(ys))
        outs = [_update(layer, x, y) for layer, x, y in zip(single, xs, ys)]
        torch.testing.assert_close(out, torch.cat(outs))
    for s in range(2):
        torch.testing.assert_close(joint.local_var[s], single[s].local_var[0])
        torch.testing.assert_close(joint.global_var[s], single[s].global_var[0])


def test_method_predicts_with_stored_statistics_then_updates() -> None:
    model = small_bn_cnn(num_classes=4)
    adapted = tta.adapt(model, "balanced_bn")
    layers = [m for m in adapted.model.modules() if isinstance(m, BalancedBatchNorm)]
    assert len(layers) == 2 and layers[0].num_classes == 4  # read from the classifier
    xs = batches(3, shift=1.0)
    # first batch: stored statistics are the source ones, so the prediction is the source model's
    torch.testing.assert_close(adapted(xs[0]), model(xs[0]))
    after_one = copy.deepcopy(adapted.state_dict())
    assert not torch.equal(after_one["model.1.local_mean"], layers[0].source_mean.expand(4, -1)[None])
    with adapted.no_adapt():
        predicted = adapted(xs[1])
    now = adapted.state_dict()
    assert all(torch.equal(v, now[k]) for k, v in after_one.items() if isinstance(v, torch.Tensor))
    torch.testing.assert_close(adapted(xs[1]), predicted)
    adapted.reset()
    torch.testing.assert_close(adapted(xs[0]), model(xs[0]))


def test_num_classes_mismatch_is_a_clear_error() -> None:
    adapted = tta.adapt(small_bn_cnn(num_classes=4), "balanced_bn", num_classes=3)
    with pytest.raises(ValueError, match="3 classes"):
        adapted(batches(1)[0])
    with pytest.raises(ValueError, match="eta"):
        tta.adapt(small_bn_cnn(), "balanced_bn", eta=0.0)


# -- differential test against the official code -------------------------------------------------
def _official_bn_layers():
    root = checkout_root("TRIBE_OFFICIAL_SRC")
    pyv = root / "core" / "utils" / "balanced_bn_pyv.py"
    layers = root / "core" / "utils" / "bn_layers.py"
    spec = importlib.util.spec_from_file_location("balanced_bn", pyv)
    update = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(update)  # type: ignore[union-attr]
    previous = sys.modules.get("balanced_bn")
    sys.modules["balanced_bn"] = update  # bn_layers.py imports the compiled extension by this name
    try:
        spec = importlib.util.spec_from_file_location("tribe_official_bn_layers", layers)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    finally:
        if previous is None:
            sys.modules.pop("balanced_bn", None)
        else:
            sys.modules["balanced_bn"] = previous
    return module


@pytest.mark.official
@pytest.mark.parametrize("eta,gamma", [(0.01, 0.0), (0.25, 0.0), (0.25, 0.3)])
def test_matches_official_two_pass_step(eta: float, gamma: float) -> None:
    official_layers = _official_bn_layers()
    source = small_bn_cnn(num_classes=4, width=5)
    official = copy.deepcopy(source)
    for name in ("1", "4"):  # the BatchNorm2d layers of the helper model
        setattr(official, name, official_layers.BalancedRobustBN2dV5(getattr(source, name), 4, eta, gamma))
    ours = tta.adapt(source, "balanced_bn", eta=eta, gamma=gamma)
    generator = torch.Generator().manual_seed(3)
    worst = 0.0
    for step in range(12):
        # label-sorted-like drift: the mean moves with the step, batch size 10 lets classes exceed 1/eta = 4
        x = torch.randn(10, 3, 6, 6, generator=generator) * (1 + 0.1 * step) + 0.2 * (step % 4)
        with torch.no_grad():
            official.eval()  # TRIBE's predicting forward: stored statistics
            expected = official(x)
            labels = expected.argmax(1)
            for name in ("1", "4"):
                getattr(official, name).label = labels
            official.train()  # the labelled update forward
            official(x)
        got = ours(x)
        worst = max(worst, (got - expected).abs().max().item())
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for name in ("1", "4"):
        layer = getattr(ours.model, name)
        torch.testing.assert_close(layer.local_var[0], getattr(official, name).local_var, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer.global_mean[0], getattr(official, name).global_mean, rtol=1e-4, atol=1e-4)
    print(f"balanced_bn vs official: max |output difference| over 12 steps = {worst:.3g}")
