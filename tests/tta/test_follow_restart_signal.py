"""follow's restart signal over every layer (``restart_signal="all_layers"``): the change of
every BatchNorm layer's input log variance in the test-batch forward, averaged per layer and
then over the layers; it depends on the images alone and restarts as the first-layer signal
does."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import tta
from tests.conftest import small_bn_cnn
from tta.layers.follow_bn import FollowBatchNorm
from tta.methods.follow import signature_change


def test_signature_change_averages_each_layer_then_the_layers() -> None:
    signature = torch.tensor([[1.0, 3.0, 0.0, 0.0, 6.0]])
    previous = torch.zeros(1, 5)
    # layer of 2 channels: (1 + 3) / 2 = 2; layer of 3: 6 / 3 = 2 -> 2; pooled channels: 2
    torch.testing.assert_close(signature_change(signature, previous, [2, 3]), torch.tensor([2.0]))
    signature = torch.tensor([[4.0, 0.0, 0.0, 0.0, 3.0]])
    # (4 / 2 + 3 / 3) / 2 = 1.5, where the mean over the 5 channels would give 1.4
    torch.testing.assert_close(signature_change(signature, previous, [2, 3]), torch.tensor([1.5]))
    torch.testing.assert_close(signature_change(signature, previous, [5]), torch.tensor([1.4]))
    torch.testing.assert_close(signature_change(signature, previous), torch.tensor([1.4]))


def _test_batch_log_vars(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Per BatchNorm layer, the log biased variance per channel of its input when every layer
    normalizes by the batch's own statistics (train-mode BatchNorm of a copy)."""
    net = copy.deepcopy(model).train()
    captured: list[torch.Tensor] = []
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.register_forward_pre_hook(
                lambda _m, inputs: captured.append(inputs[0].var((0, 2, 3), unbiased=False).clamp_min(1e-12).log())
            )
    with torch.no_grad():
        net(x)
    return captured


def _signal_by_hand(model: nn.Module, x: torch.Tensor, previous: torch.Tensor) -> float:
    now, before = _test_batch_log_vars(model, x), _test_batch_log_vars(model, previous)
    return sum(float((a - b).abs().mean()) for a, b in zip(now, before)) / len(now)


def _inputs(seed: int, scale: float = 1.0, n: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * scale


def test_the_signal_is_every_layers_test_batch_input_computed_by_hand() -> None:
    model = small_bn_cnn()
    adapted = tta.adapt(copy.deepcopy(model), "follow", restart_signal="all_layers", restart_shift=10.0)
    adapted(_inputs(0))
    assert math.isnan(float(adapted.method.last_signal[0]))  # nothing to compare with yet
    adapted(_inputs(1, scale=1.5))
    torch.testing.assert_close(
        float(adapted.method.last_signal[0]), _signal_by_hand(model, _inputs(1, scale=1.5), _inputs(0)), rtol=1e-5, atol=1e-6
    )
    assert adapted.method.last_restart.tolist() == [False]
    assert adapted.method.previous_signature.shape == (1, 6 + 6)


def test_it_restarts_exactly_above_the_threshold_and_as_a_fresh_start() -> None:
    model = small_bn_cnn()
    signal = _signal_by_hand(model, _inputs(5, scale=3.0), _inputs(4))
    for shift, fires in ((signal * 0.99, True), (signal * 1.01, False)):
        adapted = tta.adapt(
            copy.deepcopy(model), "follow", restart_signal="all_layers", restart_relative=None, restart_shift=shift,
            recentre_agreement=None, paths="slow",
        )
        for seed in range(5):
            adapted(_inputs(seed))
        out = adapted(_inputs(5, scale=3.0))
        assert adapted.method.last_restart.tolist() == [fires]
        fresh = tta.adapt(copy.deepcopy(model), "follow", restart_shift=None, paths="slow")
        fresh_out = fresh(_inputs(5, scale=3.0))
        layers = [m for m in adapted.model.modules() if isinstance(m, FollowBatchNorm)]
        fresh_layers = [m for m in fresh.model.modules() if isinstance(m, FollowBatchNorm)]
        same = all(torch.allclose(a.global_var, b.global_var) for a, b in zip(layers, fresh_layers))
        assert same == fires
        assert torch.allclose(out, fresh_out) == fires


def test_the_first_layer_alone_misses_a_change_only_deeper_layers_see() -> None:
    """The signal reads every layer: a change that leaves the first layer's input variance
    alone (a per-sample sign flip of the input keeps it) but not the deeper ones restarts."""
    model = small_bn_cnn()
    calm, flipped = _inputs(3), -_inputs(3)
    first = [
        tta.adapt(copy.deepcopy(model), "follow", restart_shift=0.02, restart_signal=s, restart_relative=None)
        for s in ("first_layer", "all_layers")
    ]
    for adapted in first:
        adapted(calm)
        adapted(flipped)
    first_layer, all_layers = (float(a.method.last_signal[0]) for a in first)
    assert first_layer < 1e-5  # the first layer's input variance does not change under x -> -x
    assert all_layers == pytest.approx(_signal_by_hand(model, flipped, calm), rel=1e-5, abs=1e-6)
    assert all_layers > 0.02
    assert [a.method.last_restart.item() for a in first] == [False, True]


def test_small_batches_have_no_signal_and_keep_the_reference() -> None:
    adapted = tta.adapt(small_bn_cnn(), "follow", restart_signal="all_layers", restart_relative=None, restart_shift=0.01)
    adapted(_inputs(0))
    adapted(_inputs(1))
    reference = adapted.method.previous_signature.clone()
    adapted(_inputs(2, scale=4.0, n=4))  # below min_batch_size: no test-batch forward
    assert adapted.method.last_restart.tolist() == [False]
    assert math.isnan(float(adapted.method.last_signal[0]))
    torch.testing.assert_close(adapted.method.previous_signature, reference)


def test_predict_changes_nothing_and_a_bad_batch_moves_nothing() -> None:
    adapted = tta.adapt(small_bn_cnn(), "follow", restart_signal="all_layers", restart_relative=None, restart_shift=0.01)
    for seed in range(3):
        adapted(_inputs(seed))
    before = {k: v.clone() for k, v in adapted.state_dict().items() if isinstance(v, torch.Tensor)}
    with adapted.no_adapt():
        predicted = adapted(_inputs(7, scale=3.0))
    bad = _inputs(8, scale=3.0)
    bad[0, 0, 0, 0] = float("nan")
    adapted(bad)
    after = adapted.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, msg=key)
    torch.testing.assert_close(adapted(_inputs(7, scale=3.0)), predicted)
    for layer in (m for m in adapted.model.modules() if isinstance(m, FollowBatchNorm)):
        assert layer.restart is None and layer.watch is None and layer.batch_var is None and not layer.keep_batch_var


def test_streams_get_their_own_signal() -> None:
    model = small_bn_cnn()
    absolute = {"restart_signal": "all_layers", "restart_relative": None, "restart_shift": 0.2}
    multi = tta.adapt(copy.deepcopy(model), "follow", **absolute, num_streams=2)
    singles = [tta.adapt(copy.deepcopy(model), "follow", **absolute) for _ in range(2)]
    for seed in range(3):
        multi(torch.cat([_inputs(seed), _inputs(seed)]))
        for single in singles:
            single(_inputs(seed))
    calm, shifted = _inputs(9), _inputs(9, scale=4.0)
    out = multi(torch.cat([calm, shifted]))
    assert multi.method.last_restart.tolist() == [False, True]
    torch.testing.assert_close(out[:32], singles[0](calm))
    torch.testing.assert_close(out[32:], singles[1](shifted))


def test_restart_signal_is_checked() -> None:
    with pytest.raises(ValueError, match="restart_signal"):
        tta.build_method("follow", restart_signal="deep")
