"""RoTTA: the memory's eviction order (timeliness and uncertainty) on hand-computed cases, the
time-aware weight, the update schedule and teacher average, state round trips, and a
differential test against the official code (ROTTA_OFFICIAL_SRC=<checkout of BIT-DA/RoTTA>;
skipped without it)."""

from __future__ import annotations

import copy
import importlib
import math
import sys
import types

import pytest
import torch

import tta
from tta.methods import rotta as rotta_module
from tta.methods.rotta import CategoryBalancedMemory, TeacherStudent, timeliness_weight
from tta.methods.strong_augment import strong_augment

from tests.official import checkout_root

from tests.conftest import batches, small_bn_cnn


def _memory(capacity: int, num_classes: int, lambda_t: float = 1.0, lambda_u: float = 1.0) -> CategoryBalancedMemory:
    memory = CategoryBalancedMemory(capacity, lambda_t, lambda_u)
    memory.num_classes = num_classes
    return memory


def _sig(a: float) -> float:
    return 1.0 / (1.0 + math.exp(-a))


def test_full_class_evicts_its_highest_score_item() -> None:
    memory = _memory(4, 2)  # two places per class
    assert memory.add(0, 0.1) == 0
    assert memory.add(0, 0.5) == 1
    # class 0 is full: A (age 2, u 0.1) scores sig(2/4) + 0.1/ln 2 = 0.767, B (age 1, u 0.5)
    # sig(1/4) + 0.5/ln 2 = 1.284; the new item scores 0.5 + 0.2/ln 2 = 0.789 < 1.284: B goes
    assert _sig(0.25) + 0.5 / math.log(2) > 0.5 + 0.2 / math.log(2)
    assert memory.add(0, 0.2) == 1
    assert memory.uncertainty[1] == 0.2 and memory.uncertainty[0] == 0.1
    assert list(memory.age[:2]) == [3, 1]  # every item ages on each addition, the new one too
    assert memory.add(1, 0.9) == 2
    assert memory.add(1, 0.0) == 3
    # class 1 full: D (age 2, u 0.9) scores 1.921 against E (age 1, u 0) 0.562: D goes
    assert memory.add(1, 0.1) == 2
    assert list(memory.label) == [0, 0, 1, 1] and list(memory.age) == [6, 4, 1, 2]


def test_full_bank_evicts_from_the_majority_class_by_age() -> None:
    memory = _memory(4, 3)  # 4/3 places per class
    memory.add(0, 0.0)
    memory.add(0, 0.0)
    assert memory.add(0, 0.0) == 0  # class 0 over its share: the older (higher timeliness) goes
    assert memory.add(1, 0.3) == 2
    assert memory.add(2, 0.3) == 3  # now full: classes (0, 0, 1, 2), ages slot1 4, slot0 3
    # class 1 is under its share but the bank is full: evict from the majority class 0, the
    # oldest item (slot 1, age 4: sig(1) = 0.731 against slot 0's sig(3/4) = 0.679)
    assert memory.add(1, 0.0) == 1
    slots, ages = memory.ordered()
    # ordered by class, then insertion: slot 0 (class 0), slot 2 then slot 1 (class 1), slot 3
    assert list(slots) == [0, 2, 1, 3]
    assert list(ages) == [1.0, 0.75, 0.25, 0.5]  # ages 4, 3, 1, 2 over N = 4


def test_uncertain_newcomer_is_dropped_and_ties_evict_the_latest() -> None:
    memory = _memory(2, 2, lambda_t=0.0)  # uncertainty alone decides
    memory.add(0, 0.1)
    assert memory.add(0, 0.5) is None  # only candidate scores 0.1/ln 2, not above 0.5/ln 2
    assert list(memory.age) == [2, 0]  # dropped items do not exist, the stored one still ages
    memory = _memory(4, 2, lambda_t=0.0)
    memory.add(0, 0.5)
    memory.add(0, 0.5)
    assert memory.add(0, 0.1) == 1  # equal scores: the later item of the scan (official `>=`) goes


def test_timeliness_weight() -> None:
    ages = torch.tensor([0.0, 1.0, math.log(3.0)])
    expected = torch.tensor([0.5, math.exp(-1.0) / (1 + math.exp(-1.0)), 0.25])
    torch.testing.assert_close(timeliness_weight(ages), expected)


def _images(n: int, batch_size: int, seed: int = 1) -> list[torch.Tensor]:
    return [x.sigmoid() for x in batches(n, batch_size=batch_size, seed=seed)]


def test_step_predicts_with_the_teacher_and_updates_every_frequency_samples() -> None:
    model = small_bn_cnn()
    adapted = tta.adapt(model, "rotta", memory_size=6, update_frequency=4, nu=0.5)
    rotta = adapted.method.method
    assert isinstance(adapted.model, TeacherStudent)
    xs = _images(3, batch_size=5)
    torch.testing.assert_close(adapted(xs[0]), model(xs[0]))  # teacher = source model so far
    assert rotta.num_updates == 1  # after sample 4, mid-batch
    teacher, student = adapted.model.teacher, adapted.model.student
    before = teacher[1].weight.detach().clone()
    adapted(xs[1])
    assert rotta.num_updates == 2  # samples 8; the 12th comes with the next batch
    # teacher <- 0.5 teacher + 0.5 student after the student's step
    torch.testing.assert_close(teacher[1].weight, 0.5 * before + 0.5 * student[1].weight.detach())
    assert not torch.equal(teacher[1].ema_mean, student[1].ema_mean)  # own statistics
    adapted(xs[2])
    assert rotta.num_updates == 3 and rotta.seen == 15


def test_no_adapt_reset_and_state_round_trip() -> None:
    model = small_bn_cnn()
    xs = _images(6, batch_size=8)
    adapted = tta.adapt(model, "rotta", memory_size=8, update_frequency=8)
    for x in xs[:3]:
        adapted(x)
    assert adapted.method.method.num_updates == 3
    saved = copy.deepcopy(adapted.state_dict())
    with adapted.no_adapt():
        predicted = adapted(xs[3])
    resumed = tta.adapt(model, "rotta", memory_size=8, update_frequency=8)
    resumed.load_state_dict(saved)
    for x in xs[3:]:
        torch.testing.assert_close(resumed(x), adapted(x))
    torch.testing.assert_close(resumed(xs[3]), adapted(xs[3]))
    adapted.reset()
    assert adapted.method.method.seen == 0 and (adapted.method.method.memory.label < 0).all()
    fresh = tta.adapt(model, "rotta", memory_size=8, update_frequency=8)
    for x in xs[:3]:
        torch.testing.assert_close(adapted(x), fresh(x))
    assert torch.isfinite(predicted).all()


def test_a_batch_with_non_finite_values_changes_nothing() -> None:
    adapted = tta.adapt(small_bn_cnn(), "rotta", memory_size=8, update_frequency=4)
    x = _images(1, batch_size=4)[0]
    x[1, 0, 0, 0] = float("nan")
    adapted(x)
    rotta = adapted.method.method
    assert rotta.seen == 0 and rotta.num_updates == 0 and (rotta.memory.label < 0).all()
    adapted(x.nan_to_num())
    assert rotta.seen == 4 and rotta.num_updates == 1 and torch.isfinite(rotta.bank).all()


def test_augmentation_is_seeded_and_keeps_images_in_range() -> None:
    x = _images(1, batch_size=4, seed=5)[0]
    first = strong_augment(x, torch.Generator().manual_seed(0))
    again = strong_augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(first, again) and first.shape == x.shape
    assert first.min() >= 0 and first.max() <= 1 and not torch.allclose(first, x, atol=1e-2)
    with pytest.raises(ValueError, match="augment"):
        tta.adapt(small_bn_cnn(), "rotta", augment="heavy")


def test_hparams_route_to_robust_bn_and_compose() -> None:
    adapted = tta.adapt(small_bn_cnn(), "rotta", alpha=0.2, memory_size=4, update_frequency=4)
    assert adapted.model.student[1].alpha == 0.2
    composed = tta.adapt(small_bn_cnn(), "norm+rotta", memory_size=4, update_frequency=4)
    for x in _images(2, batch_size=4):
        assert torch.isfinite(composed(x)).all()


# -- differential test against the official code -------------------------------------------------
def _official_rotta_module():
    root = checkout_root("ROTTA_OFFICIAL_SRC")
    prefix = "rotta_official_core"
    # a package over the checkout's core/ that skips its __init__ (which imports the data stack)
    for name, path in ((prefix, "core"), (f"{prefix}.adapter", "core/adapter"), (f"{prefix}.utils", "core/utils")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(root / path)]  # type: ignore[attr-defined]
            sys.modules[name] = package
    return importlib.import_module(f"{prefix}.adapter.rotta")


def _official_cfg(memory_size: int, update_frequency: int, num_classes: int) -> types.SimpleNamespace:
    ns = types.SimpleNamespace
    rotta = ns(MEMORY_SIZE=memory_size, UPDATE_FREQUENCY=update_frequency, NU=0.001, ALPHA=0.05, LAMBDA_T=1.0, LAMBDA_U=1.0)
    return ns(ADAPTER=ns(RoTTA=rotta), CORRUPTION=ns(NUM_CLASS=num_classes), OPTIM=ns(STEPS=1))


@pytest.mark.official
@pytest.mark.parametrize("memory_size,update_frequency,batch_size", [(64, 64, 64), (12, 10, 16)])
def test_matches_official_rotta(monkeypatch: pytest.MonkeyPatch, memory_size: int, update_frequency: int, batch_size: int) -> None:
    official_module = _official_rotta_module()
    # the official augmentation draws from the global RNGs (and its constructor uses an
    # argument, resample=, that current torchvision removed): both sides get the same fixed
    # transform instead (not the identity: with identical teacher and student inputs the
    # gradients are rounding noise, which Adam amplifies to whole steps)
    def fixed_transform(x: torch.Tensor) -> torch.Tensor:
        return (x.flip(-1) * 0.8 + 0.1).roll(1, dims=-2)

    monkeypatch.setattr(official_module, "get_tta_transforms", lambda cfg: fixed_transform)
    monkeypatch.setattr(rotta_module, "strong_augment", lambda x, generator, ranges: fixed_transform(x))
    # the official age weights are built on CUDA: the same formula on the CPU
    monkeypatch.setattr(
        official_module, "timeliness_reweighting", lambda ages: torch.exp(-torch.tensor(ages)) / (1 + torch.exp(-torch.tensor(ages)))
    )
    source = small_bn_cnn(num_classes=4, width=5)
    official = official_module.RoTTA(
        _official_cfg(memory_size, update_frequency, 4),
        copy.deepcopy(source),
        lambda params: torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0),
    )
    ours = tta.adapt(source, "rotta", memory_size=memory_size, update_frequency=update_frequency)
    generator = torch.Generator().manual_seed(7)
    worst = 0.0
    for step in range(10):
        x = (torch.randn(batch_size, 3, 8, 8, generator=generator) + 0.3 * (step % 3)).sigmoid()
        expected = official(x)
        got = ours(x)
        worst = max(worst, (got - expected).abs().max().item())
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    rotta = ours.method.method
    memory = rotta.memory
    official_items = sorted((cls, item.age, round(item.uncertainty, 4)) for cls, items in enumerate(official.mem.data) for item in items)
    our_items = sorted(
        (int(memory.label[i]), int(memory.age[i]), round(float(memory.uncertainty[i]), 4))
        for i in range(memory.capacity)
        if memory.label[i] >= 0
    )
    assert our_items == official_items
    student_gap = teacher_gap = 0.0
    for mine, theirs, gap in ((ours.model.student, official.model, "student"), (ours.model.teacher, official.model_ema, "teacher")):
        named = dict(mine.named_parameters())
        for name, param in theirs.named_parameters():
            difference = (named[name] - param).abs().max().item()
            if gap == "student":
                student_gap = max(student_gap, difference)
            else:
                teacher_gap = max(teacher_gap, difference)
    # the official average also runs over frozen parameters, (1 - nu) w + nu w, which drifts
    # by float rounding (an ulp or so per update); ours leaves them exact
    assert student_gap < 1e-5 and teacher_gap < 1e-5
    print(
        f"rotta vs official (memory {memory_size}, every {update_frequency}, batch {batch_size}): max |output "
        f"difference| {worst:.3g}, student parameters {student_gap:.3g}, teacher parameters {teacher_gap:.3g}"
    )


def test_teacher_average_survives_bfloat16() -> None:
    # nu = 0.001 of a small difference rounds away in bf16 arithmetic; the fp32 copy keeps it
    model = small_bn_cnn()
    source = [model[1].weight, model[1].bias, model[4].weight, model[4].bias]
    adapted = tta.adapt(model, "rotta", memory_size=4, update_frequency=4).to(torch.bfloat16)
    reference = tta.adapt(model, "rotta", memory_size=4, update_frequency=4)
    for x in _images(6, batch_size=4):
        adapted(x.to(torch.bfloat16))
        reference(x)
    masters, ref = adapted.method.method.teacher_master, reference.method.method.teacher_master
    assert masters[0].dtype == torch.float32
    moved = max((m - p.detach()).abs().max().item() for m, p in zip(masters, source))
    ref_moved = max((m - p.detach()).abs().max().item() for m, p in zip(ref, source))
    assert moved > 0.3 * ref_moved > 0
