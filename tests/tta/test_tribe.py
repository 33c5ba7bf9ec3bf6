"""TRIBE: the tri-net structure (shared parameters, separate statistics), the reliable-sample
loss, and a differential test against the official code (TRIBE_OFFICIAL_SRC=<checkout of
Gorilla-Lab-SCUT/TRIBE>; skipped without it)."""

from __future__ import annotations

import copy
import importlib
import math
import sys
import types

import pytest
import torch

import tta
from tta.methods import tribe as tribe_module
from tta.methods.tribe import TriNet

from tests.official import checkout_root

from tests.conftest import batches, small_bn_cnn


def _images(n: int, batch_size: int = 8, seed: int = 1) -> list[torch.Tensor]:
    return [x.sigmoid() for x in batches(n, batch_size=batch_size, seed=seed)]


def test_teacher_shares_parameters_and_keeps_its_own_statistics() -> None:
    model = small_bn_cnn()
    adapted = tta.adapt(model, "tribe", h0=1.0)  # every sample reliable (H < ln K)
    net = adapted.model
    assert isinstance(net, TriNet)
    assert net.teacher[1].weight is net.student[1].weight
    assert net.anchor[1].weight is not net.student[1].weight
    x = _images(1)[0]
    torch.testing.assert_close(adapted(x), model(x))  # stored statistics are the source ones at first
    assert not torch.equal(net.teacher[1].local_mean, net.student[1].local_mean)  # clean vs augmented input
    assert not torch.equal(net.student[1].weight, model[1].weight)  # one Adam step
    assert torch.equal(net.anchor[1].weight, model[1].weight) and net.anchor[1].weight.grad is None
    assert not torch.equal(net.anchor[1].local_mean, net.anchor[1].source_mean.expand_as(net.anchor[1].local_mean))


def test_no_reliable_sample_means_no_gradient() -> None:
    model = small_bn_cnn()
    adapted = tta.adapt(model, "tribe", h0=1e-9)
    adapted(_images(1)[0])
    # Adam's first step with a zero gradient leaves the parameters where they were
    assert torch.equal(adapted.model.student[1].weight, model[1].weight)


def test_loss_is_the_masked_self_training_plus_anchor_term(monkeypatch: pytest.MonkeyPatch) -> None:
    # with no augmentation and lambda = 0 the loss is the CE of the student against the
    # teacher's hard labels over the reliable samples; check the value the optimizer sees
    seen: list[float] = []
    original = torch.Tensor.backward

    def spy(self: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(float(self.detach()))
        return original(self, *args, **kwargs)

    model = small_bn_cnn()
    adapted = tta.adapt(model, "tribe", augment="none", anchor_weight=0.0, h0=1.0)
    x = _images(1)[0]
    reference = copy.deepcopy(adapted.model.student)
    monkeypatch.setattr(torch.Tensor, "backward", spy)
    adapted(x)
    # by hand: teacher and student see the same input with the same parameters and statistics,
    # so both labelled outputs equal the reference's; the pseudo-labels are the source model's
    pred = model(x)
    for module in reference.modules():
        if hasattr(module, "labels"):
            module.labels = pred.argmax(1)
    student_out = reference(x)
    ent = -(student_out.softmax(1) * student_out.log_softmax(1)).sum(1)
    assert bool((ent < math.log(4)).all())
    expected = torch.nn.functional.cross_entropy(student_out, student_out.argmax(1)).detach()
    assert seen and math.isclose(seen[0], expected.item(), rel_tol=1e-5)


def test_anchor_equals_teacher_bit_for_bit_at_the_first_step() -> None:
    # Both are the source network with source statistics and see the same input and labels,
    # so the anchor loss (t - a)^2 and its gradient are exactly zero at the first step, as in
    # the official code. Computed with two arithmetics (fused no-grad kernels for the anchor),
    # t - a is rounding noise, whose gradient Adam turns into steps of about lr.
    outputs: dict[str, torch.Tensor] = {}
    for seed in range(3):
        adapted = tta.adapt(small_bn_cnn(seed=seed), "tribe", h0=1.0)
        for name in ("teacher", "anchor"):  # the last teacher forward is the labelled one
            getattr(adapted.model, name).register_forward_hook(
                lambda module, args, out, name=name: outputs.__setitem__(name, out.detach().clone())
            )
        adapted(_images(1, seed=seed)[0])
        assert torch.equal(outputs["teacher"], outputs["anchor"])


def test_state_round_trip_and_reset() -> None:
    model = small_bn_cnn()
    xs = _images(4)
    adapted = tta.adapt(model, "tribe", h0=1.0)
    for x in xs[:2]:
        adapted(x)
    saved = copy.deepcopy(adapted.state_dict())
    resumed = tta.adapt(model, "tribe", h0=1.0)
    resumed.load_state_dict(saved)
    for x in xs[2:]:
        torch.testing.assert_close(resumed(x), adapted(x))
    assert resumed.model.teacher[1].weight is resumed.model.student[1].weight
    adapted.reset()
    torch.testing.assert_close(adapted(xs[0]), model(xs[0]))


# -- differential test against the official code -------------------------------------------------
def _official_tribe_module():
    root = checkout_root("TRIBE_OFFICIAL_SRC")
    prefix = "tribe_official_core"
    # a package over the checkout's core/ that skips its __init__ (which imports the data stack)
    for name, path in ((prefix, "core"), (f"{prefix}.adapter", "core/adapter"), (f"{prefix}.utils", "core/utils")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(root / path)]  # type: ignore[attr-defined]
            sys.modules[name] = package
    return importlib.import_module(f"{prefix}.adapter.TRIBE")


# The model seed draws the convolutions: before the teacher and anchor shared one arithmetic,
# float rounding amplified by Adam broke this comparison on 7-9 of 30 seeds (0, 2, 3, 17 among
# them), and on none after (worst output gap 1.5e-5 over 2 x 30 seeds).
@pytest.mark.official
@pytest.mark.parametrize("model_seed", [0, 2, 3, 17])
@pytest.mark.parametrize("eta,gamma,h0", [(0.01, 0.0, 0.4), (0.25, 0.3, 0.2)])
def test_matches_official_tribe(
    monkeypatch: pytest.MonkeyPatch, eta: float, gamma: float, h0: float, model_seed: int
) -> None:
    official_module = _official_tribe_module()
    torch.manual_seed(model_seed)

    # the official augmentation draws from the global RNGs: both sides get one fixed transform
    def fixed_transform(x: torch.Tensor) -> torch.Tensor:
        return (x.flip(-1) * 0.8 + 0.1).roll(1, dims=-2)

    monkeypatch.setattr(official_module, "get_tta_transforms", lambda cfg: fixed_transform)
    monkeypatch.setattr(tribe_module, "strong_augment", lambda x, generator, ranges: fixed_transform(x))
    ns = types.SimpleNamespace
    cfg = ns(
        ADAPTER=ns(TRIBE=ns(ETA=eta, GAMMA=gamma, H0=h0, LAMBDA=0.5)), CORRUPTION=ns(NUM_CLASS=4), OPTIM=ns(STEPS=1)
    )
    source = small_bn_cnn(num_classes=4, width=5)
    with torch.no_grad():  # confident predictions, so that most samples pass the entropy filter
        source[-1].weight.copy_(torch.randn(4, 5, generator=torch.Generator().manual_seed(2)) * 10)
        source[-1].bias.zero_()
    official = official_module.TRIBE(
        cfg, copy.deepcopy(source), lambda params: torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    )
    ours = tta.adapt(source, "tribe", eta=eta, gamma=gamma, h0=h0)
    generator = torch.Generator().manual_seed(11)
    worst = 0.0
    for step in range(8):
        shift = 2 * torch.randn(12, 3, 1, 1, generator=generator) + 0.3 * (step % 3)
        x = (torch.randn(12, 3, 8, 8, generator=generator) + shift).sigmoid()
        expected = official(x)
        got = ours(x)
        worst = max(worst, (got - expected).abs().max().item())
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    named = dict(ours.model.student.named_parameters())
    param_gap = max((named[n] - p).abs().max().item() for n, p in official.model.named_parameters())
    buffers = dict(ours.model.anchor.named_buffers())
    stat_gap = max((buffers[n] - b).abs().max().item() for n, b in official.source_model.named_buffers() if n in buffers and "local" in n)
    moved = max((p - q).abs().max().item() for p, q in zip(official.model.parameters(), source.parameters()))
    assert moved > 1e-3, "the comparison should cover training steps"
    assert param_gap < 1e-5 and stat_gap < 1e-4
    print(f"tribe vs official (eta {eta}, gamma {gamma}, h0 {h0}): max |output difference| {worst:.3g}, "
          f"parameters {param_gap:.3g}, anchor statistics {stat_gap:.3g}")
