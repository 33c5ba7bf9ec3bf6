"""follow: the run test against brute-force permutations, the detector's alarms and memory,
the three paths (test-time BN, class-balanced statistics with the prior correction) and
the model kinds it serves."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import tta
from tests.conftest import label_readout, labelled_batch, small_gn_cnn
from tta.methods.follow import dominant_class, run_score, streamwise_prior_correction
from tta.methods.gated_bn import label_counts
from tta.methods.roid import prior_correction


def _score(labels: list[int], num_classes: int = 4) -> float:
    y = torch.tensor([labels])
    return float(run_score(y, label_counts(y, num_classes)))


@pytest.mark.parametrize("labels", [[0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 2, 3], [0, 1, 1, 1, 1, 2, 2], [3, 3, 0, 0, 0]])
def test_run_score_uses_the_exact_moments_of_a_random_order(labels: list[int]) -> None:
    # every distinct arrangement of the multiset is equally likely under a random order
    arrangements = sorted(set(itertools.permutations(labels)))
    neighbours = torch.tensor([sum(a == b for a, b in zip(p[1:], p[:-1])) for p in arrangements], dtype=torch.float64)
    mean, std = neighbours.mean(), neighbours.std(unbiased=False)
    observed = sum(a == b for a, b in zip(labels[1:], labels[:-1]))
    assert _score(labels) == pytest.approx(float((observed - mean) / std), rel=1e-5)


def test_run_score_ignores_the_marginal_and_sees_runs() -> None:
    generator = torch.Generator().manual_seed(0)
    # i.i.d. draws from a strongly biased marginal (a domain pushing 70 % into class 2)
    biased = torch.multinomial(torch.tensor([0.1, 0.1, 0.7, 0.1]), 64 * 200, replacement=True, generator=generator)
    scores = run_score(biased.view(200, 64), label_counts(biased.view(200, 64), 4))
    assert scores.abs().mean() < 1.2 and scores.max() < 5.0
    sorted_runs = torch.tensor([[0] * 16 + [1] * 16 + [2] * 16 + [3] * 16])
    assert run_score(sorted_runs, label_counts(sorted_runs, 4)).item() > 7.0
    # one class, or fewer than four samples: no order to test
    assert _score([1] * 10) == 0.0 and _score([0, 1, 1]) == 0.0


def test_dominant_class_needs_the_concentration() -> None:
    counts = label_counts(torch.tensor([[2, 2, 2, 2, 2, 1], [0, 1, 2, 3, 0, 1]]), 4)
    # same-label pairs: 5 * 4 / 30 = 0.67 and 2 * 2 / 30 = 0.13
    torch.testing.assert_close(dominant_class(counts, 6, 0.4), torch.tensor([2, -1]))
    torch.testing.assert_close(dominant_class(counts, 6, 0.7), torch.tensor([-1, -1]))


def test_streamwise_prior_correction_is_roid_per_stream() -> None:
    logits = torch.randn(12, 5, generator=torch.Generator().manual_seed(3))
    expected = torch.cat([prior_correction(logits[:6]), prior_correction(logits[6:])])
    torch.testing.assert_close(streamwise_prior_correction(logits, 2), expected)
    torch.testing.assert_close(prior_correction(logits[None])[0], prior_correction(logits))


_readout = label_readout
_batch = labelled_batch


def _shuffled(labels: list[int], seed: int) -> list[int]:
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    return [labels[i] for i in order]


def test_iid_batches_take_test_time_bn() -> None:
    adapted = tta.adapt(_readout(), method="follow")
    norm = tta.adapt(_readout(), method="norm")
    for seed in range(3):
        x = _batch(_shuffled([0, 1, 2, 3] * 8, seed), seed=seed)
        out = adapted(x)
        assert not adapted.method.last_correlated.item()
        torch.testing.assert_close(out, norm(x))


def test_runs_raise_the_alarm_and_it_holds() -> None:
    adapted = tta.adapt(_readout(), method="follow", hold=64)
    slow = tta.adapt(_readout(), method="follow", paths="slow")
    runs = _batch([0] * 8 + [1] * 8 + [2] * 8 + [3] * 8)
    out = adapted(runs)
    assert adapted.method.last_score.item() > 5.0 and adapted.method.last_correlated.item()
    torch.testing.assert_close(out, slow(runs))  # class-balanced statistics, corrected output
    # a correlated stream stays so for `hold` samples after the alarm, then test-time BN again
    iid = [_batch(_shuffled([0, 1, 2, 3] * 8, s), seed=s) for s in range(3)]
    flags = []
    for x in iid:
        adapted(x)
        flags.append(adapted.method.last_correlated.item())
    assert flags == [True, False, False]  # quiet 32 < 64, then 64
    torch.testing.assert_close(adapted.method.quiet, torch.tensor([64.0]))  # capped at hold


def test_one_class_batches_raise_the_alarm_when_the_class_changes() -> None:
    adapted = tta.adapt(_readout(), method="follow")
    adapted(_batch([1] * 16, seed=0))
    assert not adapted.method.last_correlated.item()  # one concentrated batch proves nothing
    adapted(_batch([1] * 16, seed=1))
    assert not adapted.method.last_correlated.item()  # the same class again: a biased domain
    out = adapted(_batch([3] * 16, seed=2))
    assert adapted.method.last_correlated.item()  # another class: class runs
    assert out.argmax(1).eq(3).all()
    assert not tta.adapt(_readout(), method="norm")(_batch([3] * 16, seed=2)).argmax(1).eq(3).all()


def test_a_class_switch_needs_a_change_of_mix() -> None:
    # a domain that pushes small batches into two classes: the dominant class alternates,
    # the mix does not change (the first selection's false alarm on digits at batch 16)
    adapted = tta.adapt(_readout(), method="follow")
    mixes = [[0] * 9 + [1] * 7, [0] * 7 + [1] * 9] * 3
    dominants = []
    for seed, labels in enumerate(mixes):
        y = torch.tensor([labels])
        dominants.append(int(dominant_class(label_counts(y, 4), len(labels), 0.15)))
        adapted(_batch(_shuffled(labels, seed), seed=seed))
        assert not adapted.method.last_correlated.item()
    assert dominants == [0, 1] * 3


def test_one_class_batches_with_spread_predictions_raise_the_alarm() -> None:
    # batches of one class that the slow path gets only 40 % right, the rest spread over
    # eight classes: share of same-label pairs 0.18 (hard corruptions of CIFAR-10-C)
    def batch(k: int, other: int, seed: int) -> torch.Tensor:
        rest = [c for c in range(10) if c not in (k, other)]
        return _batch(_shuffled([k] * 16 + rest * 3, seed), num_classes=10, seed=seed)

    first_release = tta.adapt(_readout(10), method="follow", concentration=0.4, hold=2048)
    adapted = tta.adapt(_readout(10), method="follow")
    for method in (adapted, first_release):
        method(batch(2, 5, 0))
        method(batch(2, 5, 1))
        assert not method.method.last_correlated.item()
        method(batch(5, 2, 2))
    assert adapted.method.last_correlated.item()
    assert not first_release.method.last_correlated.item()


def test_paths_ablations() -> None:
    x = _batch([0] * 8 + [1] * 8 + [2] * 8 + [3] * 8)
    fast = tta.adapt(_readout(), method="follow", paths="fast")(x)
    torch.testing.assert_close(fast, tta.adapt(_readout(), method="norm")(x))
    slow = tta.adapt(_readout(), method="follow", paths="slow", prior_correction=False)
    balanced = tta.adapt(_readout(), method="balanced_bn")
    for seed in range(3):
        batch = _batch(_shuffled([0, 1, 2, 3] * 4, seed), seed=seed)
        torch.testing.assert_close(slow(batch), balanced(batch))
    corrected = tta.adapt(_readout(), method="follow", paths="slow")(x)
    torch.testing.assert_close(corrected, prior_correction(tta.adapt(_readout(), method="balanced_bn")(x)))


def test_small_batches_use_the_balanced_statistics_uncorrected() -> None:
    x = _batch([0, 1, 2, 3])
    out = tta.adapt(_readout(), method="follow")(x)  # 4 < min_batch_size
    torch.testing.assert_close(out, tta.adapt(_readout(), method="balanced_bn")(x))


def test_predict_equals_step_and_changes_nothing() -> None:
    adapted = tta.adapt(_readout(), method="follow")
    adapted(_batch([0] * 8 + [1] * 8 + [2] * 8 + [3] * 8))
    x = _batch(_shuffled([0, 1, 2, 3] * 8, 5), seed=5)
    before = {k: v.clone() for k, v in adapted.state_dict().items() if isinstance(v, torch.Tensor)}
    detector = (adapted.method.quiet.clone(), adapted.method.previous_dominant.clone())
    with adapted.no_adapt():
        predicted = adapted(x)
    after = {k: v for k, v in adapted.state_dict().items() if isinstance(v, torch.Tensor)}
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, msg=key)
    torch.testing.assert_close((adapted.method.quiet, adapted.method.previous_dominant), detector)
    torch.testing.assert_close(adapted(x), predicted)


def test_streams_detect_independently() -> None:
    runs = _batch([0] * 8 + [1] * 8 + [2] * 8 + [3] * 8, seed=0)
    iid = _batch(_shuffled([0, 1, 2, 3] * 8, 1), seed=1)
    multi = tta.adapt(_readout(), method="follow", num_streams=2)
    out = multi(torch.cat([runs, iid]))
    torch.testing.assert_close(multi.method.last_correlated, torch.tensor([True, False]))
    torch.testing.assert_close(out[:32], tta.adapt(_readout(), method="follow")(runs))
    torch.testing.assert_close(out[32:], tta.adapt(_readout(), method="follow")(iid))


def test_groupnorm_model_gets_the_detector_and_correction_on_its_own_output() -> None:
    model = small_gn_cnn(num_classes=4)
    adapted = tta.adapt(model, method="follow", min_batch_size=4)
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(x)
    out = adapted(x)
    if adapted.method.last_correlated.item():
        torch.testing.assert_close(out, prior_correction(plain))
    else:
        torch.testing.assert_close(out, plain)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in adapted.modules())
    # the detector decides on the model's labels: force a class switch between concentrated batches
    adapted.method.previous_dominant = torch.tensor([(int(plain.argmax(1).mode().values) + 1) % 4])
    adapted.method.quiet = torch.tensor([0.0])
    torch.testing.assert_close(adapted(x), prior_correction(plain))


def test_hparams_are_checked() -> None:
    with pytest.raises(ValueError, match="paths"):
        tta.adapt(_readout(), method="follow", paths="both")
    with pytest.raises(ValueError, match="concentration"):
        tta.adapt(_readout(), method="follow", concentration=1.5)
    assert math.isclose(tta.build_method("follow").hparams.z_threshold, 5.0)


def test_homogeneity_score_hand_computed() -> None:
    from tta.methods.follow import homogeneity_score

    # counts (4, 0) against (0, 4): pooled 4 and 4, expected 2 in every cell, X^2 = 4 * 4 / 2 = 8, df 1
    z = homogeneity_score(torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.0, 4.0, 0.0]]))
    torch.testing.assert_close(z, torch.tensor([(8.0 - 1.0) / math.sqrt(2.0)]))
    # identical mixes give X^2 = 0; a missing previous batch or a single class gives 0
    same = torch.tensor([[2.0, 3.0, 1.0]])
    torch.testing.assert_close(homogeneity_score(same, same), torch.tensor([(0.0 - 2.0) / 2.0]))
    torch.testing.assert_close(homogeneity_score(same, torch.zeros(1, 3)), torch.zeros(1))
    torch.testing.assert_close(homogeneity_score(torch.tensor([[5.0, 0, 0]]), torch.tensor([[3.0, 0, 0]])), torch.zeros(1))


def test_label_shift_between_shuffled_batches_raises_the_alarm_after_a_streak() -> None:
    # concentration 1: the class-switch rule, which also sees these batches, is off
    adapted = tta.adapt(_readout(), method="follow", shift_batches=3, concentration=1.0)
    # three classes per batch, the mix changing at every batch
    mixes = [[0] * 4 + [1] * 10 + [2] * 10, [3] * 10 + [0] * 10 + [1] * 4] * 2
    flags = []
    for seed, labels in enumerate(mixes):
        adapted(_batch(_shuffled(labels, seed), seed=seed))
        assert adapted.method.last_score.item() < 5.0  # no runs: the order test is blind here
        flags.append(adapted.method.last_correlated.item())
    assert flags == [False, False, False, True]  # three shifted pairs in a row


def test_one_domain_change_is_not_label_shift() -> None:
    adapted = tta.adapt(_readout(), method="follow")
    # the prediction marginal jumps once (a new domain) and stays: two shifted pairs at most
    mixes = [[0, 1, 2, 3] * 6] * 3 + [[0] * 18 + [1, 2, 3] * 2] + [[0] * 18 + [1, 2, 3] * 2] * 3
    for seed, labels in enumerate(mixes):
        adapted(_batch(_shuffled(labels, seed), seed=seed))
        assert not adapted.method.last_correlated.item()
