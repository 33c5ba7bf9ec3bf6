"""CoTTA (tta/methods/cotta.py): the spec on hand-computed cases and, when a checkout of
qinenergy/cotta is given (COTTA_OFFICIAL_SRC = the repository root), the official CIFAR and
ImageNet CoTTA classes step by step."""

from __future__ import annotations

import ast
import copy
import logging
import math

import pytest
import torch
from torch import nn

import tta
from tests.conftest import small_bn_cnn
from tests.official import checkout_root
from tta.methods import cotta as cotta_module
from tta.methods.cotta import (
    CoTTANet,
    ema_,
    restore_masks,
    stochastic_restore_,
    teacher_cross_entropy,
)
from tta.methods.strong_augment import STRONG, strong_augment

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log().float()


def _images(n: int = 4, batch_size: int = 8, size: int = 8, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(batch_size, 3, size, size, generator=generator) for _ in range(n)]


def _trained(adapted: tta.Adapted, part: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in getattr(adapted.model, part).named_parameters()}


# -- the spec on hand-computed cases -------------------------------------------------------
def test_teacher_cross_entropy_by_hand() -> None:
    p, q = [0.7, 0.2, 0.1], [0.4, 0.5, 0.1]  # student, teacher
    student, teacher = _logits([p]).requires_grad_(True), _logits([q])
    ce = -sum(qc * math.log(pc) for pc, qc in zip(p, q))
    reverse = -sum(pc * math.log(qc) for pc, qc in zip(p, q))
    assert teacher_cross_entropy(student, teacher).item() == pytest.approx(ce, rel=1e-6)
    assert teacher_cross_entropy(student, teacher, symmetric=True).item() == pytest.approx(0.5 * ce + 0.5 * reverse, rel=1e-6)
    # the gradient of the plain cross-entropy with respect to the student's logits is p - q
    teacher_cross_entropy(student, teacher).sum().backward()
    assert student.grad[0].tolist() == pytest.approx([a - b for a, b in zip(p, q)], abs=1e-6)


def test_teacher_average_by_hand() -> None:
    teacher = [torch.tensor([1.0, -2.0]), torch.tensor([[0.5]])]
    ema_(teacher, [torch.tensor([3.0, 2.0]), torch.tensor([[-0.5]])], 0.75)
    assert teacher[0].tolist() == [1.5, -1.0] and teacher[1].tolist() == [[0.25]]
    unchanged = [torch.tensor([1.0])]
    ema_(unchanged, [torch.tensor([9.0])], 1.0)
    assert unchanged[0].tolist() == [1.0]


def test_restore_masks_are_the_official_per_tensor_draws() -> None:
    masks = restore_masks([3, 5, 2], 0.4, torch.Generator().manual_seed(11), torch.device("cpu"))
    generator = torch.Generator().manual_seed(11)
    expected = [torch.rand(n, generator=generator) < 0.4 for n in (3, 5, 2)]
    assert [m.tolist() for m in masks] == [e.tolist() for e in expected]
    never = restore_masks([50], 0.0, torch.Generator().manual_seed(0), torch.device("cpu"))[0]
    always = restore_masks([50], 1.0, torch.Generator().manual_seed(0), torch.device("cpu"))[0]
    assert not never.any() and always.all()


def test_stochastic_restore_by_hand() -> None:
    params = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([5.0])]
    sources = [torch.zeros(2, 2), torch.tensor([-5.0])]
    stochastic_restore_(params, sources, [torch.tensor([True, False, False, True]), torch.tensor([False])])
    assert params[0].tolist() == [[0.0, 2.0], [3.0, 0.0]] and params[1].tolist() == [5.0]


def test_one_step_by_hand() -> None:
    """No augmentation, no restore: the prediction is the source model's, and after the Adam
    step the teacher is 0.999 teacher + 0.001 student; only weight/bias parameters train."""
    model = small_bn_cnn(width=5)
    x = _images(1)[0]
    adapted = tta.adapt(model, "cotta", restore_prob=0.0, num_augmentations=0)
    source = _trained(adapted, "student")
    with torch.no_grad():
        expected = tta.adapt(model, "norm")(x)
    out = adapted(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    student, teacher = _trained(adapted, "student"), _trained(adapted, "teacher")
    # every weight and bias trains (a convolution's bias before batch statistics has a zero
    # gradient, so it may not move)
    assert all(p.requires_grad for p in adapted.model.student.parameters())
    assert {n for n in source if not torch.equal(student[n], source[n])} >= {"0.weight", "1.weight", "1.bias", "8.weight", "8.bias"}
    for name in source:
        torch.testing.assert_close(teacher[name], 0.999 * source[name] + 0.001 * student[name], rtol=0, atol=1e-7)
    assert _trained(adapted, "anchor").keys() == source.keys()
    for name, param in adapted.model.anchor.named_parameters():
        assert torch.equal(param, source[name])


def test_full_restore_pins_the_student_to_the_source() -> None:
    model = small_bn_cnn(width=5)
    adapted = tta.adapt(model, "cotta", restore_prob=1.0, threshold=0.0)
    source = _trained(adapted, "student")
    for x in _images(3):
        adapted(x)
    student, teacher = _trained(adapted, "student"), _trained(adapted, "teacher")
    assert all(torch.equal(student[n], source[n]) for n in source)
    assert any(not torch.equal(teacher[n], source[n]) for n in source)  # it averaged the trained students


def test_restore_follows_the_seeded_generator() -> None:
    model = small_bn_cnn(width=5)
    x = _images(1)[0]
    plain = tta.adapt(model, "cotta", restore_prob=0.0, threshold=0.0, seed=3)
    restored = tta.adapt(model, "cotta", restore_prob=0.3, threshold=0.0, seed=3)
    plain(x)
    restored(x)
    source = _trained(restored, "anchor")
    trained, got = _trained(plain, "student"), _trained(restored, "student")
    generator = torch.Generator().manual_seed(3)  # nothing else draws without augmentation
    for name, param in restored.model.student.named_parameters():
        mask = (torch.rand(param.numel(), generator=generator) < 0.3).view(param.shape)
        assert 0 < mask.sum() < mask.numel() or param.numel() < 8
        assert torch.equal(got[name], torch.where(mask, source[name], trained[name])), name


def test_augmentation_averaged_teacher_below_the_threshold() -> None:
    model = small_bn_cnn(width=5)
    x = _images(1)[0]
    adapted = tta.adapt(model, "cotta", threshold=1.0, num_augmentations=4, seed=2)
    generator = torch.Generator().manual_seed(2)
    teacher = adapted.model.teacher
    with torch.no_grad():
        views = [teacher(strong_augment(x, generator, STRONG)) for _ in range(4)]
    with adapted.no_adapt():
        predicted = adapted(x)
    out = adapted(x)
    torch.testing.assert_close(out, torch.stack(views).mean(0), rtol=0, atol=1e-6)
    assert torch.equal(predicted, out)  # predict draws the same views and rewinds
    never = tta.adapt(model, "cotta", threshold=0.0, restore_prob=0.0, seed=2)
    never(x)
    assert torch.equal(never.method.method.generator.get_state(), torch.Generator().manual_seed(2).get_state())


def test_runs_are_seeded_and_augmentation_needs_images() -> None:
    model = small_bn_cnn(width=5)
    xs = _images(3)
    a = tta.adapt(model, "cotta", threshold=1.0, num_augmentations=3, seed=5)
    b = tta.adapt(model, "cotta", threshold=1.0, num_augmentations=3, seed=5)
    for x in xs:
        assert torch.equal(a(x), b(x))
    assert isinstance(a.model, CoTTANet)
    flat = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="num_augmentations=0"):
        tta.adapt(flat, "cotta", threshold=1.0)(torch.randn(8, 5))
    assert torch.isfinite(tta.adapt(flat, "cotta", num_augmentations=0)(torch.randn(8, 5))).all()
    with pytest.raises(ValueError, match="restore_prob"):
        tta.adapt(model, "cotta", restore_prob=1.5)


def test_teacher_average_survives_bfloat16() -> None:
    model = small_bn_cnn(width=5)
    adapted = tta.adapt(model, "cotta", threshold=0.0).to(torch.bfloat16)
    source = [p.detach().float().clone() for p in adapted.model.teacher.parameters()]
    for x in _images(3):
        assert torch.isfinite(adapted(x.to(torch.bfloat16)).float()).all()
    masters = adapted.method.method.teacher_masters.masters
    assert masters[0].dtype == torch.float32
    assert max((m - s).abs().max().item() for m, s in zip(masters, source)) > 0


# -- the official code ---------------------------------------------------------------------
def _official_cotta(variant: str) -> dict:
    """The namespace of the official ``<variant>/cotta.py``, executed without its imports
    (``get_tta_transforms`` is set by the test: the official one passes arguments that current
    torchvision removed)."""
    path = checkout_root("COTTA_OFFICIAL_SRC") / variant / "cotta.py"
    tree = ast.parse(path.read_text())
    body = [node for node in tree.body if not isinstance(node, (ast.Import, ast.ImportFrom))]
    namespace = {"__name__": f"cotta_official_{variant}", "torch": torch, "nn": nn, "deepcopy": copy.deepcopy, "logging": logging, "PIL": None,
                 "transforms": None, "my_transforms": None, "time": None}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def _fixed_transform(x: torch.Tensor) -> torch.Tensor:
    return (x.flip(-1) * 0.8 + 0.1).roll(1, dims=-2)


def _max_gap(mine: nn.Module, theirs: nn.Module) -> float:
    named = dict(mine.named_parameters())
    return max((named[name] - param).abs().max().item() for name, param in theirs.named_parameters())


@pytest.mark.official
@pytest.mark.parametrize("case", ["augment-always", "augment-never", "augment-mixed", "imagenet"])
def test_matches_official_cotta(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """The official class on the same model and batches. Augmentations: where both sides draw
    them ("augment-always") the official transform is the library's with the global generator,
    whose stream then matches ours draw for draw (augmentations, then restore masks); in the
    other cases both sides apply one fixed transform (the official CIFAR code augments on every
    batch, ours only when used, so the random streams would part). Restore masks always come
    from the same seeded stream."""
    variant = "imagenet" if case == "imagenet" else "cifar"
    namespace = _official_cotta(variant)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)  # the official masks go to CUDA
    num_classes = 20 if case == "imagenet" else 4
    with torch.random.fork_rng():
        torch.manual_seed(0)
        source = small_bn_cnn(num_classes=num_classes, width=6)
    with torch.no_grad():
        source[-1].weight.mul_(3.0 if case != "imagenet" else 0.5)
    # no convolution bias before batch statistics (as in ResNets): its gradient is exactly 0
    # in theory and rounding noise in practice, which Adam scales up to steps of size lr in
    # either direction, in each implementation differently (docs/DIFFERENTIAL_TESTS.md)
    source[0].bias = source[3].bias = None
    xs = _images(6, batch_size=8)
    seed = 7
    hparams = {}
    if case == "augment-always":
        hparams["threshold"] = 1.0
        namespace["get_tta_transforms"] = lambda: (lambda x: strong_augment(x, torch.default_generator, STRONG))
    else:
        namespace["get_tta_transforms"] = lambda: _fixed_transform
        monkeypatch.setattr(cotta_module, "strong_augment", lambda x, generator, ranges: _fixed_transform(x))
    if case == "augment-never":
        hparams["threshold"] = 0.0
    if case == "augment-mixed":
        # the median of the source model's confidences: some batches are augmented, others not
        probe = tta.adapt(source, "cotta")
        with torch.no_grad():
            confidences = [torch.softmax(probe.model.anchor(x), 1).amax(1).mean().item() for x in xs]
        hparams["threshold"] = sorted(confidences)[len(confidences) // 2]
        assert 0 < sum(c < hparams["threshold"] for c in confidences) < len(confidences)
    model = namespace["configure_model"](copy.deepcopy(source))
    params, _ = namespace["collect_params"](model)
    if case == "imagenet":
        # hard-coded there: threshold 0.1, restore 0.001, teacher 0.999; symmetric loss
        hparams.update(threshold=0.1, restore_prob=0.001, symmetric=True, optimizer="sgd", lr=0.01, nesterov=True)
        optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, dampening=0.0, nesterov=True)
        official = namespace["CoTTA"](model, optimizer, steps=1, episodic=False)
    else:
        optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
        official = namespace["CoTTA"](model, optimizer, steps=1, episodic=False, mt_alpha=0.999, rst_m=0.01,
                                      ap=hparams["threshold"])
    ours = tta.adapt(source, "cotta", seed=seed, **hparams)
    torch.manual_seed(seed)  # the official masks (and augmentations) draw from the global RNG
    worst = 0.0
    for x in xs:
        expected = official(x)
        got = ours(x)
        worst = max(worst, (got - expected).abs().max().item())
    student_gap = _max_gap(ours.model.student, official.model)
    teacher_gap = _max_gap(ours.model.teacher, official.model_ema)
    restored = sum(int((p == s).sum()) for p, s in zip(ours.model.student.parameters(), ours.model.anchor.parameters()))
    print(f"cotta {case}: max |output diff| {worst:.3g}, student {student_gap:.3g}, teacher {teacher_gap:.3g}, "
          f"{restored} student values at their source value")
    # Adam's steps: 1e-4 after several (docs/DIFFERENTIAL_TESTS.md); a restore mask that differed
    # would leave a gap of the size of the adaptation, several 1e-3
    assert worst < 1e-4 and student_gap < 1e-4 and teacher_gap < 1e-4
    assert restored > 0 or case == "imagenet"
