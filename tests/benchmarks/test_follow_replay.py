"""The replay that chose follow's defaults equals the method: record once with the defaults,
replay any detector setting, and get the error of a live run with that setting."""

from __future__ import annotations

import copy

import pytest
import torch

import tta
from benchmarks.follow_replay import Recording, record, relative_restart_signal, replay, restart_signal
from tests.conftest import label_readout, labelled_batch, small_bn_cnn

#: the first layer's signal with an absolute threshold alone (the fourth selection's)
FIRST_LAYER = {"restart_signal": "first_layer", "restart_relative": None}


def _stream() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    label_sets = [torch.randint(0, 4, (32,), generator=generator) for _ in range(4)]  # i.i.d.
    label_sets += [torch.tensor([c] * 16) for c in (0, 0, 2, 2, 1, 3)]  # one class per batch
    label_sets += [torch.sort(torch.randint(0, 4, (32,), generator=generator)).values for _ in range(3)]  # runs
    label_sets += [torch.randint(0, 4, (8,), generator=generator)]  # below min_batch_size
    batches = []
    for seed, labels in enumerate(label_sets):
        images = labelled_batch(labels.tolist(), seed=seed)
        # a fifth of the samples predicted wrong, so that errors differ between paths
        images[::5] = labelled_batch(((labels[::5] + 1) % 4).tolist(), seed=seed + 100)
        batches.append((images, labels))
    return batches


def _live_error(batches: list[tuple[torch.Tensor, torch.Tensor]], **hparams: object) -> float:
    adapted = tta.adapt(label_readout(), "follow", **hparams)
    errors = total = 0
    with torch.no_grad():
        for images, labels in batches:
            errors += int((adapted(images).argmax(1) != labels).sum())
            total += len(labels)
    return 100.0 * errors / total


@pytest.mark.parametrize("recorded", [{}, FIRST_LAYER], ids=["defaults", "first_layer"])
def test_replay_equals_live_runs_of_any_detector_setting(tmp_path, recorded: dict[str, object]) -> None:
    """Either signal: the every-layer one (the default) runs the test-batch forward first."""
    batches = _stream()
    rec = record(label_readout(), batches, **recorded)
    rec.save(tmp_path / "rec.pt")
    rec = Recording.load(tmp_path / "rec.pt")
    assert rec.fast[-1] is None and rec.fast[0] is not None
    settings = [{}, {"hold": 16}, {"concentration": 1.0}, {"switch_shift_z": 50.0, "hold": 32}, {"paths": "fast"},
                {"paths": "slow"}, {"prior_correction": False, "hold": 48}]
    errors = []
    for setting in settings:
        replayed = replay(rec, **recorded, **setting)
        assert abs(replayed - _live_error(batches, **recorded, **setting)) < 1e-9, setting
        errors.append(replayed)
    assert len(set(errors)) >= 3  # the settings make a difference on this stream


def _restarts(adapted: tta.Adapted, batches: list[torch.Tensor]) -> list[bool]:
    """Per batch, whether ``follow`` restarted."""
    fired = []
    with torch.no_grad():
        for images in batches:
            adapted(images)
            fired.append(bool(adapted.method.last_restart.item()))
    return fired


def test_restart_signal_fires_where_the_method_restarts() -> None:
    labels = [0] * 8 + [1] * 8 + [2] * 8 + [3] * 8
    scales = [1.0, 1.0, 4.0, 4.0, 1.5, 0.5, 0.5, 3.0]
    batches = [labelled_batch(labels, seed=i) * s for i, s in enumerate(scales)]
    batches.insert(3, labelled_batch([0, 1, 2, 3], seed=50) * 9.0)  # below min_batch_size
    changes = restart_signal(label_readout(), batches)
    assert changes[0] is None and changes[3] is None
    for shift in (0.3, 1.0, 2.0):
        fired = _restarts(tta.adapt(label_readout(), "follow", **FIRST_LAYER, restart_shift=shift), batches)
        assert fired == [c is not None and c > shift for c in changes], shift
    assert 0 < sum(c is not None and c > 1.0 for c in changes) < len(batches) - 2


def test_the_signal_of_every_layer_fires_where_the_method_restarts() -> None:
    model = small_bn_cnn()
    scales = [1.0, 1.0, 4.0, 4.0, 1.5, 0.5, 0.5, 3.0]
    batches = [torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(i)) * s for i, s in enumerate(scales)]
    batches.insert(3, torch.randn(4, 3, 8, 8) * 9.0)  # below min_batch_size
    changes = restart_signal(model, batches, signal="all_layers")
    assert changes[0] is None and changes[3] is None
    for shift in (0.05, 0.2, 0.5):
        adapted = tta.adapt(
            copy.deepcopy(model), "follow", restart_signal="all_layers", restart_relative=None, restart_shift=shift
        )
        fired = _restarts(adapted, batches)
        assert fired == [c is not None and c > shift for c in changes], shift
    assert 0 < sum(c is not None and c > 0.2 for c in changes) < len(batches) - 2


def test_the_relative_signal_fires_where_the_method_restarts() -> None:
    model = small_bn_cnn()
    scales = [1.0, 1.1, 0.9, 1.0, 1.05, 4.0, 4.0, 1.0, 4.0, 1.0, 1.0, 3.0]
    batches = [torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(i)) * s for i, s in enumerate(scales)]
    batches.insert(6, torch.randn(4, 3, 8, 8) * 9.0)  # below min_batch_size
    changes, ratios = relative_restart_signal(model, batches, signal="all_layers", window=4)
    assert changes == restart_signal(model, batches, signal="all_layers")
    assert ratios[:5] == [None] * 5 and ratios[6] is None and all(r is not None for r in ratios[7:])
    for shift, k in ((0.01, 1.5), (0.01, 4.0), (0.3, 1.5)):
        adapted = tta.adapt(
            copy.deepcopy(model), "follow", restart_signal="all_layers", restart_shift=shift, restart_relative=k, restart_window=4
        )
        fired = _restarts(adapted, batches)
        assert fired == [c is not None and r is not None and c > shift and r > k for c, r in zip(changes, ratios)], (shift, k)
    fired_at = [c is not None and r is not None and c > 0.01 and r > 1.5 for c, r in zip(changes, ratios)]
    assert 0 < sum(fired_at) < sum(c is not None and c > 0.01 for c in changes)
