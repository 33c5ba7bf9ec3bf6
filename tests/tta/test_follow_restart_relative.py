"""follow's relative restart threshold (``restart_relative``): a restart also needs each
layer's change, divided by the median of that layer's last ``restart_window`` changes,
averaged over the layers, to exceed it; the history holds the stream's own changes only."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import tta
from tests.conftest import small_bn_cnn
from tta.methods.follow import layer_changes, relative_change
from tests.tta.test_follow_restart_signal import _inputs, _test_batch_log_vars


def test_relative_change_divides_by_each_layers_median_of_the_filled_entries() -> None:
    # window 6, two layers, newest last; the unfilled entries are zeros
    history = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [3.0, 4.0], [2.0, 8.0], [5.0, 6.0], [4.0, 1.0]]])
    changes = torch.tensor([[6.0, 8.0]])
    # four filled: the lower of the two middle values, layer 0 (2, 3, 4, 5) -> 3, layer 1
    # (1, 4, 6, 8) -> 4: (6 / 3 + 8 / 4) / 2 = 2 (with the zeros counted: 2 and 1 -> 5.5)
    torch.testing.assert_close(relative_change(changes, history, torch.tensor([4]), 4), torch.tensor([2.0]))
    # five filled (a zero among them): layer 0 (0, 2, 3, 4, 5) -> 3, layer 1 (0, 1, 4, 6, 8) -> 4
    torch.testing.assert_close(relative_change(changes, history, torch.tensor([5]), 4), torch.tensor([2.0]))
    history[0, :2] = torch.tensor([[9.0, 9.0], [9.0, 9.0]])
    # all six: layer 0 (2, 3, 4, 5, 9, 9) -> 4, layer 1 (1, 4, 6, 8, 9, 9) -> 6: (1.5 + 4 / 3) / 2
    torch.testing.assert_close(relative_change(changes, history, torch.tensor([6]), 4), torch.tensor([(1.5 + 8 / 6) / 2]))
    assert math.isnan(float(relative_change(changes, history, torch.tensor([3]), 4)[0]))
    assert math.isnan(float(relative_change(changes, history, torch.tensor([5]), 6)[0]))


def test_relative_change_is_per_stream() -> None:
    history = torch.ones(2, 4, 1)
    history[1] *= 4.0
    out = relative_change(torch.tensor([[2.0], [2.0]]), history, torch.tensor([4, 4]), 4)
    torch.testing.assert_close(out, torch.tensor([2.0, 0.5]))


def test_layer_changes_are_each_layers_channel_mean() -> None:
    signature = torch.tensor([[1.0, 3.0, 0.0, 0.0, 6.0]])
    torch.testing.assert_close(layer_changes(signature, torch.zeros(1, 5), [2, 3]), torch.tensor([[2.0, 2.0]]))
    torch.testing.assert_close(layer_changes(signature, torch.zeros(1, 5)), torch.tensor([[2.0]]))


def _relative(model: torch.nn.Module, k: float, window: int = 16, **kw: object) -> tta.Adapted:
    return tta.adapt(
        copy.deepcopy(model), "follow", restart_signal="all_layers", restart_shift=0.01, restart_relative=k,
        restart_window=window, **kw,
    )


def test_the_history_holds_the_streams_own_per_layer_changes() -> None:
    """Computed by hand from train-mode copies of the source model; the history is method
    state that a good step moves (a NaN placeholder would make every step count as failed)."""
    model = small_bn_cnn()
    adapted = _relative(model, 1e6, window=8)
    batches = [_inputs(seed, scale=1.0 + 0.2 * seed) for seed in range(6)]
    for x in batches:
        adapted(x)
    logs = [_test_batch_log_vars(model, x) for x in batches]
    by_hand = torch.tensor([[float((a - b).abs().mean()) for a, b in zip(now, before)] for before, now in zip(logs, logs[1:])])
    method = adapted.method
    assert method.history_count.tolist() == [5]  # the first batch has nothing to compare with
    torch.testing.assert_close(method.signal_history[0, -5:], by_hand, rtol=1e-5, atol=1e-6)
    assert method.signal_history[0, :3].abs().sum() == 0
    expected = (by_hand[-1] / by_hand[-5:-1].median(0).values).mean()
    torch.testing.assert_close(float(method.last_relative_signal[0]), float(expected), rtol=1e-5, atol=1e-6)
    assert method.last_restart.tolist() == [False]


def test_a_change_restarts_only_if_it_stands_out_against_the_streams_own() -> None:
    """The same large change restarts a calm stream and not one whose batches always change
    that much: the threshold scales with the stream (and so with the model)."""
    model = small_bn_cnn()
    calm = _relative(model, 2.5)
    for seed in range(6):
        calm(_inputs(seed))
    calm(_inputs(6, scale=4.0))
    assert calm.method.last_restart.tolist() == [True]
    assert float(calm.method.last_relative_signal[0]) > 2.5
    restless = _relative(model, 2.5)
    for seed in range(7):  # scales 1, 4, 1, 4, 1, 4, 1
        restless(_inputs(seed, scale=4.0 if seed % 2 else 1.0))
    # as large a change as the calm stream's restart
    assert float(restless.method.last_signal[0]) == pytest.approx(float(calm.method.last_signal[0]), rel=0.2)
    assert restless.method.last_restart.tolist() == [False]
    assert float(restless.method.last_relative_signal[0]) < 2.5


def test_the_absolute_threshold_still_applies() -> None:
    model = small_bn_cnn()
    adapted = tta.adapt(
        copy.deepcopy(model), "follow", restart_signal="all_layers", restart_shift=100.0, restart_relative=2.5
    )
    for seed in range(6):
        adapted(_inputs(seed))
    adapted(_inputs(6, scale=4.0))
    assert float(adapted.method.last_relative_signal[0]) > 2.5
    assert adapted.method.last_restart.tolist() == [False]


@pytest.mark.parametrize("min_history", [4, 7])
def test_no_restart_before_enough_history(min_history: int) -> None:
    model = small_bn_cnn()
    adapted = _relative(model, 0.001, restart_min_history=min_history)
    adapted(_inputs(0))
    for step in range(1, min_history + 1):
        adapted(_inputs(step, scale=1.0 + step))
        assert adapted.method.last_restart.tolist() == [False]
        assert math.isnan(float(adapted.method.last_relative_signal[0]))
    adapted(_inputs(9, scale=9.0))
    assert adapted.method.last_restart.tolist() == [True]


def test_small_batches_predict_and_bad_batches_leave_the_history_alone() -> None:
    adapted = _relative(small_bn_cnn(), 2.5)
    for seed in range(5):
        adapted(_inputs(seed))
    history, count = adapted.method.signal_history.clone(), adapted.method.history_count.clone()
    adapted(_inputs(5, scale=3.0, n=4))  # below min_batch_size
    assert math.isnan(float(adapted.method.last_relative_signal[0]))
    with adapted.no_adapt():
        adapted(_inputs(6, scale=3.0))
    bad = _inputs(7)
    bad[0, 0, 0, 0] = float("inf")
    adapted(bad)
    torch.testing.assert_close(adapted.method.signal_history, history)
    assert adapted.method.history_count.tolist() == count.tolist() == [4]


def test_streams_keep_their_own_history() -> None:
    model = small_bn_cnn()
    multi = _relative(model, 2.5, num_streams=2)
    singles = [_relative(model, 2.5) for _ in range(2)]
    for seed in range(6):
        pair = [_inputs(seed), _inputs(seed, scale=4.0 if seed % 2 else 1.0)]
        multi(torch.cat(pair))
        for single, x in zip(singles, pair):
            single(x)
    pair = [_inputs(6, scale=4.0), _inputs(6, scale=1.0)]
    out = multi(torch.cat(pair))
    single_out = [single(x) for single, x in zip(singles, pair)]
    assert multi.method.last_restart.tolist() == [True, False]
    assert [bool(single.method.last_restart[0]) for single in singles] == [True, False]
    for i, single in enumerate(singles):
        torch.testing.assert_close(multi.method.signal_history[i], single.method.signal_history[0])
        torch.testing.assert_close(out[32 * i : 32 * (i + 1)], single_out[i])


def test_restart_window_is_checked() -> None:
    with pytest.raises(ValueError, match="restart_window"):
        tta.build_method("follow", restart_relative=2.0, restart_window=0)
    with pytest.raises(ValueError, match="restart_min_history"):
        tta.build_method("follow", restart_window=8, restart_min_history=9)
    with pytest.raises(ValueError, match="restart_relative"):
        tta.build_method("follow", restart_relative=0.0)
