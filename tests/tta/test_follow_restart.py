"""follow's restart at a domain change (``restart_shift``) with the first BatchNorm layer's
signal (``restart_signal="first_layer"``, no relative threshold): the signal is that layer's
input alone, a restart is exactly a fresh start from the source statistics, and it is per
stream, guarded, and invisible to ``predict``."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import tta
from tests.conftest import label_readout, labelled_batch
from tta.layers.follow_bn import FollowBatchNorm
from tta.methods.follow import input_signature, signature_change

SORTED = [0] * 8 + [1] * 8 + [2] * 8 + [3] * 8
#: the fourth selection's signal: the first layer's input, an absolute threshold alone
FIRST_LAYER = {"restart_signal": "first_layer", "restart_relative": None}


def _buffers(adapted: tta.Adapted) -> dict[str, torch.Tensor]:
    layer = next(m for m in adapted.model.modules() if isinstance(m, FollowBatchNorm))
    return {name: getattr(layer, name).clone() for name in ("local_mean", "local_var", "global_mean", "global_var")}


def _warm(adapted: tta.Adapted, steps: int = 4) -> None:
    for seed in range(steps):
        adapted(labelled_batch(SORTED, seed=seed))


def test_signature_hand_computed() -> None:
    # two streams of two samples, two channels, 1x2 maps
    x = torch.tensor(
        [
            [[[0.0, 2.0]], [[1.0, 1.0]]],
            [[[4.0, 2.0]], [[1.0, 3.0]]],
            [[[0.0, 0.0]], [[0.0, 4.0]]],
            [[[0.0, 0.0]], [[0.0, 4.0]]],
        ]
    )
    # stream 0: channel 0 values 0,2,4,2 (var 2), channel 1 values 1,1,1,3 (var 0.75)
    # stream 1: channel 0 all 0 (var 0: clamped to 1e-12), channel 1 values 0,4,0,4 (var 4)
    expected = torch.tensor([[math.log(2.0), math.log(0.75)], [math.log(1e-12), math.log(4.0)]])
    signature = input_signature(x, 2)
    torch.testing.assert_close(signature, expected)
    previous = torch.zeros(2, 2)
    torch.testing.assert_close(signature_change(signature, previous), expected.abs().mean(1))


def test_a_restart_is_a_fresh_start_from_the_source_statistics() -> None:
    adapted = tta.adapt(label_readout(), "follow", **FIRST_LAYER, restart_shift=1.0, recentre_agreement=None, paths="slow")
    _warm(adapted)
    shifted = labelled_batch(SORTED, seed=9) * 5.0  # variance x25: log change 3.2 per channel
    out = adapted(shifted)
    assert adapted.method.last_restart.tolist() == [True]
    fresh = tta.adapt(label_readout(), "follow", **FIRST_LAYER, restart_shift=None, paths="slow")
    fresh_out = fresh(shifted)
    for name, value in _buffers(fresh).items():
        torch.testing.assert_close(_buffers(adapted)[name], value, msg=name)
    torch.testing.assert_close(out, fresh_out)


def test_no_restart_within_a_domain_on_the_first_batch_or_when_off() -> None:
    adapted = tta.adapt(label_readout(), "follow", **FIRST_LAYER, restart_shift=1.0)
    flags = []
    for seed in range(5):
        adapted(labelled_batch(SORTED, seed=seed))
        flags.append(adapted.method.last_restart.item())
    assert flags == [False] * 5
    off = tta.adapt(label_readout(), "follow", **FIRST_LAYER, restart_shift=None)
    _warm(off)
    off(labelled_batch(SORTED, seed=9) * 5.0)
    assert off.method.last_restart is None
    # without restarts the stored statistics keep the earlier batches (they differ from a fresh start)
    fresh = tta.adapt(label_readout(), "follow", **FIRST_LAYER, restart_shift=None)
    fresh(labelled_batch(SORTED, seed=9) * 5.0)
    assert not torch.allclose(_buffers(off)["global_var"], _buffers(fresh)["global_var"])


def test_small_batches_neither_restart_nor_move_the_reference() -> None:
    adapted = tta.adapt(label_readout(), "follow", **FIRST_LAYER, restart_shift=1.0)
    _warm(adapted, 2)
    reference = adapted.method.previous_signature.clone()
    adapted(labelled_batch([0, 1, 2, 3], seed=7) * 5.0)  # 4 < min_batch_size: no test, no update
    assert adapted.method.last_restart.tolist() == [False]
    torch.testing.assert_close(adapted.method.previous_signature, reference)
    adapted(labelled_batch(SORTED, seed=8) * 5.0)  # compared with the last full batch: restart
    assert adapted.method.last_restart.tolist() == [True]


def test_streams_restart_independently() -> None:
    multi = tta.adapt(label_readout(), "follow", **FIRST_LAYER, restart_shift=1.0, paths="slow", num_streams=2)
    singles = [tta.adapt(label_readout(), "follow", **FIRST_LAYER, restart_shift=1.0, paths="slow") for _ in range(2)]
    for seed in range(3):
        x = labelled_batch(SORTED, seed=seed)
        multi(torch.cat([x, x]))
        for single in singles:
            single(x)
    calm, shifted = labelled_batch(SORTED, seed=5), labelled_batch(SORTED, seed=5) * 5.0
    out = multi(torch.cat([calm, shifted]))
    assert multi.method.last_restart.tolist() == [False, True]
    torch.testing.assert_close(out[:32], singles[0](calm))
    torch.testing.assert_close(out[32:], singles[1](shifted))


def test_predict_sees_the_restart_and_changes_nothing() -> None:
    adapted = tta.adapt(label_readout(), "follow", **FIRST_LAYER, restart_shift=1.0, paths="slow")
    _warm(adapted)
    shifted = labelled_batch(SORTED, seed=9) * 5.0
    before = {k: v.clone() for k, v in adapted.state_dict().items() if isinstance(v, torch.Tensor)}
    signature = adapted.method.previous_signature.clone()
    with adapted.no_adapt():
        predicted = adapted(shifted)
    after = adapted.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, msg=key)
    torch.testing.assert_close(adapted.method.previous_signature, signature)
    torch.testing.assert_close(adapted(shifted), predicted)
    assert adapted.method.last_restart.tolist() == [True]


def test_a_bad_batch_moves_nothing_and_the_layers_are_left_clean() -> None:
    adapted = tta.adapt(label_readout(), "follow", **FIRST_LAYER, restart_shift=1.0)
    _warm(adapted)
    before = {k: v.clone() for k, v in adapted.state_dict().items() if isinstance(v, torch.Tensor)}
    signature = adapted.method.previous_signature.clone()
    bad = labelled_batch(SORTED, seed=9) * 5.0
    bad[3, 0, 0, 0] = float("nan")
    adapted(bad)
    after = adapted.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, msg=key)
    torch.testing.assert_close(adapted.method.previous_signature, signature)
    layer = next(m for m in adapted.model.modules() if isinstance(m, FollowBatchNorm))
    assert layer.restart is None and layer.watch is None


def test_defaults_are_the_sixth_selection() -> None:
    hp = tta.build_method("follow").hparams
    assert (hp.restart_signal, hp.restart_shift, hp.restart_relative, hp.restart_window) == ("all_layers", 0.14, 2.5, 16)
    assert (hp.recentre_agreement, hp.agreement_rate) == (0.5, 0.1)


def test_restart_shift_is_checked() -> None:
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="restart_shift"):
            tta.adapt(label_readout(), "follow", **FIRST_LAYER, restart_shift=bad)


# -- the restart that recentres (recentre_agreement) -----------------------------------------


def _layer(adapted: tta.Adapted) -> FollowBatchNorm:
    return next(m for m in adapted.model.modules() if isinstance(m, FollowBatchNorm))


def test_recentred_state_hand_computed() -> None:
    layer = _layer(tta.adapt(label_readout(), "follow"))
    source_mean, source_var = layer.require_source_stats()
    # channel 0: class means 1, 2, 3, 6 and variances 1, 1, 2, 0: global mean 3, global variance
    # mean 1 + unbiased variance of the means 14/3 = 17/3 (the layer's own formula)
    local_mean = torch.zeros(1, 4, 4)
    local_var = torch.ones(1, 4, 4)
    local_mean[0, :, 0] = torch.tensor([1.0, 2.0, 3.0, 6.0])
    local_var[0, :, 0] = torch.tensor([1.0, 1.0, 2.0, 0.0])
    global_mean = local_mean.mean(1)
    global_var = local_var.mean(1) + local_mean.var(1)
    global_var[0, 1] = 0.0  # a dead channel takes the source statistics
    kept_mean, kept_var = layer.recentred_state(local_mean, local_var, global_mean, global_var)
    ratio = source_var[0] / (17.0 / 3.0)
    expected_mean = source_mean[0] + torch.tensor([-2.0, -1.0, 0.0, 3.0]) * ratio.sqrt()
    torch.testing.assert_close(kept_mean[0, :, 0], expected_mean)
    torch.testing.assert_close(kept_var[0, :, 0], torch.tensor([1.0, 1.0, 2.0, 0.0]) * ratio)
    torch.testing.assert_close(kept_mean[0, :, 1], source_mean[1].expand(4))
    torch.testing.assert_close(kept_var[0, :, 1], source_var[1].expand(4))
    # the mapped classes' global statistics are the source's (channels 0, 2, 3)
    live = [0, 2, 3]
    torch.testing.assert_close(kept_mean.mean(1)[0, live], source_mean[live])
    torch.testing.assert_close((kept_var.mean(1) + kept_mean.var(1))[0, live], source_var[live])


def _shifted() -> torch.Tensor:
    return labelled_batch(SORTED, seed=9) * 5.0


def test_a_recentring_restart_starts_from_the_recentred_statistics() -> None:
    adapted = tta.adapt(label_readout(), "follow", **FIRST_LAYER, restart_shift=1.0, recentre_agreement=0.5, paths="slow")
    _warm(adapted)
    adapted.method.agreement = torch.zeros(1)  # at or below the share: recentre
    # the twin starts the same step from the recentred statistics written into its buffers
    # and sees no change of signature, so it does not restart
    twin = copy.deepcopy(adapted)
    layer = _layer(twin)
    kept_mean, kept_var = layer.recentred_state(layer.local_mean, layer.local_var, layer.global_mean, layer.global_var)
    source_mean, source_var = layer.require_source_stats()
    with torch.no_grad():
        layer.local_mean.copy_(kept_mean)
        layer.local_var.copy_(kept_var)
        layer.global_mean.copy_(source_mean.expand_as(layer.global_mean))
        layer.global_var.copy_(source_var.expand_as(layer.global_var))
    twin.method.previous_signature = input_signature(_shifted(), 1)
    out, twin_out = adapted(_shifted()), twin(_shifted())
    assert adapted.method.last_restart.tolist() == [True]
    assert twin.method.last_restart.tolist() == [False]
    for name, value in _buffers(twin).items():
        torch.testing.assert_close(_buffers(adapted)[name], value, msg=name)
    torch.testing.assert_close(out, twin_out)
    # and it is not the restart from the source statistics
    fresh = tta.adapt(label_readout(), "follow", **FIRST_LAYER, restart_shift=None, paths="slow")
    fresh(_shifted())
    assert not torch.allclose(_buffers(fresh)["local_mean"], _buffers(adapted)["local_mean"])


def test_above_the_share_the_restart_is_a_fresh_start() -> None:
    adapted = tta.adapt(label_readout(), "follow", **FIRST_LAYER, restart_shift=1.0, recentre_agreement=0.5, paths="slow")
    _warm(adapted)
    adapted.method.agreement = torch.full((1,), 0.6)
    out = adapted(_shifted())
    assert adapted.method.last_restart.tolist() == [True]
    fresh = tta.adapt(label_readout(), "follow", **FIRST_LAYER, restart_shift=None, paths="slow")
    fresh_out = fresh(_shifted())
    for name, value in _buffers(fresh).items():
        torch.testing.assert_close(_buffers(adapted)[name], value, msg=name)
    torch.testing.assert_close(out, fresh_out)


def test_agreement_is_a_running_average_of_slow_and_test_batch_predictions() -> None:
    adapted = tta.adapt(label_readout(), "follow", **FIRST_LAYER, restart_shift=1.0, recentre_agreement=0.5, agreement_rate=0.25)
    assert adapted.method.agreement.tolist() == [1.0]
    x = labelled_batch(SORTED, seed=3)
    x[:, 0] += 3.5  # a shift of channel 0 that the test batch's statistics remove and the source's do not
    # the first step's slow prediction uses the source statistics (the plain model), its fast
    # one the test batch's (test-time BN)
    with torch.no_grad():
        slow = label_readout()(x).argmax(1)
    fast = tta.adapt(label_readout(), "norm")(x).argmax(1)
    share = (slow == fast).float().mean().item()
    assert 0.0 < share < 1.0
    adapted(x)
    torch.testing.assert_close(adapted.method.agreement, torch.tensor([1.0 + 0.25 * (share - 1.0)]))
    # predict and a bad batch leave it alone
    agreement = adapted.method.agreement.clone()
    with adapted.no_adapt():
        adapted(x * 3.0)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    adapted(bad)
    torch.testing.assert_close(adapted.method.agreement, agreement)


def test_recentre_agreement_is_checked() -> None:
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="recentre_agreement"):
            tta.adapt(label_readout(), "follow", **FIRST_LAYER, restart_shift=0.5, recentre_agreement=bad)
    with pytest.raises(ValueError, match="agreement_rate"):
        tta.adapt(label_readout(), "follow", agreement_rate=0.0)
