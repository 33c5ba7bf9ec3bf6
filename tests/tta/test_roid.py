"""ROID (tta/methods/roid.py): the spec on hand-computed cases and, when a checkout of
mariodoebler/test-time-adaptation is given (ROID_OFFICIAL_SRC = the repository root), the
official ROID class step by step."""

from __future__ import annotations

import ast
import copy
import functools
import importlib.util
import logging
import math
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta
from tta.methods.roid import (
    AugmentDraw,
    apply_augmentation,
    draw_augmentation,
    prior_correction,
    roid_weights,
    soft_likelihood_ratio,
    symmetric_cross_entropy,
    weight_ensemble_,
)
from tests.official import checkout_root
from tests.conftest import small_bn_cnn


def _logits(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log().float()


def _images(n: int = 8, size: int = 32, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(16, 3, size, size, generator=generator) for _ in range(n)]


# -- the spec on hand-computed cases -------------------------------------------------------
def test_soft_likelihood_ratio_by_hand() -> None:
    loss = soft_likelihood_ratio(_logits([[0.5, 0.25, 0.25], [0.995, 0.004, 0.001]]))
    eps = 1e-5
    first = -(0.5 * math.log(1.0 + eps) + 2 * 0.25 * math.log(0.25 / 0.75 + eps))
    # the dominant probability is clipped at 0.99 (0.99 / 0.01 = 99)
    second = -(0.99 * math.log(99.0 + eps) + 0.004 * math.log(0.004 / 0.996 + eps) + 0.001 * math.log(0.001 / 0.999 + eps))
    assert loss.tolist() == pytest.approx([first, second], rel=1e-5)


def test_symmetric_cross_entropy_by_hand() -> None:
    p, q = [0.7, 0.3], [0.4, 0.6]
    value = symmetric_cross_entropy(_logits([p]), _logits([q]))
    expected = -0.5 * sum(qc * math.log(pc) for pc, qc in zip(p, q)) - 0.5 * sum(pc * math.log(qc) for pc, qc in zip(p, q))
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_certainty_and_diversity_weights_by_hand() -> None:
    probs = [[1 / 3, 1 / 3, 1 / 3], [0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]]
    average = [0.5, 0.3, 0.2]
    temperature = 1 / 3

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    def minmax(v):
        return [(x - min(v)) / (max(v) - min(v)) for x in v]

    div = minmax([1 - cos(average, p) for p in probs])
    cert = minmax([sum(x * math.log(x) for x in p) for p in probs])  # -H
    keep = [d >= sum(div) / len(div) for d in div]
    expected = [math.exp(d * c / temperature) if k else 0.0 for d, c, k in zip(div, cert, keep)]

    weights, kept = roid_weights(_logits(probs), torch.tensor(average), temperature)
    assert kept.tolist() == keep
    assert weights.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert keep.count(True) not in (0, len(keep))  # the case exercises both branches


def test_prior_correction_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits.tolist()]
    prior = [(probs[0][c] + probs[1][c]) / 2 for c in range(3)]
    smooth = max(1 / 2, 1 / 3) / max(prior)
    smoothed = [(pc + smooth) / (1 + smooth * 3) for pc in prior]
    expected = [[v * s for v, s in zip(row, smoothed)] for row in logits.tolist()]
    assert prior_correction(logits).tolist() == [pytest.approx(row, rel=1e-6) for row in expected]
    assert sum(smoothed) == pytest.approx(1.0)


def test_weight_ensembling_update() -> None:
    params = [torch.tensor([1.0, 2.0]), torch.tensor([[-4.0]])]
    weight_ensemble_(params, [torch.tensor([0.0, 1.0]), torch.tensor([[4.0]])], 0.9)
    assert params[0].tolist() == pytest.approx([0.9, 1.9])
    assert params[1].tolist() == [[pytest.approx(-3.2)]]


def test_momentum_src_zero_pins_the_parameters_to_the_source() -> None:
    model = small_bn_cnn()
    adapted = tta.adapt(model, "roid", momentum_src=0.0)
    initial = {n: p.detach().clone() for n, p in adapted.model.named_parameters()}
    for x in _images(3):
        adapted(x)
    for name, param in adapted.model.named_parameters():
        assert torch.equal(param, initial[name]), name
    moving = tta.adapt(model, "roid", momentum_src=1.0)
    for x in _images(2):
        moving(x)
    assert any(not torch.equal(p, initial[n]) for n, p in moving.model.named_parameters())


def test_class_probability_average_and_prediction() -> None:
    model = small_bn_cnn()
    adapted = tta.adapt(model, "roid", prior_correction=False, consistency=False)
    x = _images(1)[0]
    with torch.no_grad():
        raw = tta.adapt(model, "norm")(x)
    out = adapted(x)
    torch.testing.assert_close(out, raw, rtol=1e-5, atol=1e-6)  # the pre-update forward
    expected = 0.9 * torch.full((4,), 0.25) + 0.1 * raw.softmax(1).mean(0)
    torch.testing.assert_close(adapted.method.method.class_probs, expected, rtol=1e-5, atol=1e-7)
    corrected = tta.adapt(model, "roid", consistency=False)(x)
    torch.testing.assert_close(corrected, prior_correction(raw), rtol=1e-5, atol=1e-6)
    adapted.reset()
    assert adapted.method.method.class_probs.numel() == 0


def test_augmentation_identity_draw_and_flip() -> None:
    x = _images(1)[0][:4]
    identity = AugmentDraw((0, 1, 2, 3, 4), (1.0, 1.0, 1.0, 0.0, 1.0), 0.0, (0, 0), 1.0, False)
    torch.testing.assert_close(apply_augmentation(x, identity), x, rtol=0, atol=1e-5)
    flipped = AugmentDraw((0, 1, 2, 3, 4), (1.0, 1.0, 1.0, 0.0, 1.0), 0.0, (0, 0), 1.0, True)
    torch.testing.assert_close(apply_augmentation(x, flipped), x.flip(-1), rtol=0, atol=1e-5)
    brighter = AugmentDraw((0, 1, 2, 3, 4), (1.2, 1.0, 1.0, 0.0, 1.0), 0.0, (0, 0), 1.0, False)
    torch.testing.assert_close(apply_augmentation(x, brighter), (1.2 * x).clamp(0, 1), rtol=0, atol=1e-5)
    draw = draw_augmentation(torch.Generator().manual_seed(3), 32, 32)
    assert sorted(draw.order) == [0, 1, 2, 3, 4] and -15 <= draw.angle <= 15 and 0.9 <= draw.scale <= 1.1
    assert max(abs(t) for t in draw.translate) <= 4  # 1/16 of the padded 64 pixels


def test_runs_are_seeded_and_consistency_needs_images() -> None:
    model = small_bn_cnn()
    xs = _images(3)
    first = [tta.adapt(model, "roid", seed=5)(x) for x in xs[:1]]
    a, b = tta.adapt(model, "roid", seed=5), tta.adapt(model, "roid", seed=5)
    for x in xs:
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert torch.equal(first[0], tta.adapt(model, "roid", seed=5)(xs[0]))
    flat = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="consistency=False"):
        tta.adapt(flat, "roid")(torch.randn(8, 5))
    tta.adapt(flat, "roid", consistency=False)(torch.randn(8, 5))


def test_bad_hyperparameters_raise() -> None:
    with pytest.raises(ValueError, match="temperature"):
        tta.adapt(small_bn_cnn(), "roid", temperature=0.0)
    with pytest.raises(ValueError, match="momentum_src"):
        tta.adapt(small_bn_cnn(), "roid", momentum_src=1.5)


# -- the official code ---------------------------------------------------------------------
def _module_from(path: Path, namespace: dict) -> dict:
    """Execute a file of the official repository without its import statements (the names
    it imports are given in ``namespace``)."""
    tree = ast.parse(path.read_text())
    body = [node for node in tree.body if not isinstance(node, (ast.Import, ast.ImportFrom))]
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def _load(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def official_benchmark_method(filename: str, class_name: str) -> type:
    """A method class of the ROID authors' benchmark (``classification/methods/<filename>``),
    executed with the names it imports given directly (also used by test_cmf.py)."""
    root = checkout_root("ROID_OFFICIAL_SRC") / "classification"
    import torchvision
    from torch.nn.utils.weight_norm import WeightNorm

    dummy = type("ResNetDomainNet126", (nn.Module,), {})
    common = {"torch": torch, "nn": nn, "F": F, "deepcopy": copy.deepcopy, "wraps": functools.wraps,
              "WeightNorm": WeightNorm, "ResNetDomainNet126": dummy, "transforms": torchvision.transforms,
              "logging": logging, "logger": logging.getLogger("official")}
    base = _module_from(root / "methods" / "base.py", dict(common))
    losses = _load(root / "utils" / "losses.py", "official_losses")
    misc = _load(root / "utils" / "misc.py", "official_misc")
    cotta = _load(root / "augmentations" / "transforms_cotta.py", "official_transforms_cotta")
    registry = types.SimpleNamespace(register=lambda: (lambda cls: cls))
    namespace = dict(common, TTAMethod=base["TTAMethod"], ADAPTATION_REGISTRY=registry,
                     get_tta_transforms=cotta.get_tta_transforms, Entropy=losses.Entropy,
                     SymmetricCrossEntropy=losses.SymmetricCrossEntropy,
                     SoftLikelihoodRatio=losses.SoftLikelihoodRatio, ema_update_model=misc.ema_update_model)
    return _module_from(root / "methods" / filename, namespace)[class_name]


def _official_roid():
    return official_benchmark_method("roid.py", "ROID")


def _cfg(batch_size: int, consistency: bool) -> types.SimpleNamespace:
    ns = types.SimpleNamespace
    return ns(
        MODEL=ns(EPISODIC=False, RESET_AFTER_NUM_UPDATES=0, ADAPTATION="roid"),
        CORRUPTION=ns(DATASET="cifar10_c"),
        OPTIM=ns(STEPS=1, LR=1e-3, METHOD="Adam", BETA=0.9, MOMENTUM=0.9, DAMPENING=0.0, NESTEROV=True, WD=0.0),
        TEST=ns(BATCH_SIZE=batch_size, WINDOW_LENGTH=1),
        MIXED_PRECISION=False,
        ROID=ns(USE_WEIGHTING=True, USE_PRIOR_CORRECTION=True, USE_CONSISTENCY=consistency,
                MOMENTUM_SRC=0.99, MOMENTUM_PROBS=0.9, TEMPERATURE=1 / 3),
    )


@pytest.mark.official
@pytest.mark.parametrize("consistency", [False, True])
def test_matches_official_roid(consistency: bool) -> None:
    official_cls = _official_roid()
    with torch.random.fork_rng():  # the conv/linear weights come from the global RNG
        torch.manual_seed(0)
        source = small_bn_cnn(num_classes=4, width=8)
    with torch.no_grad():
        source[-1].weight.mul_(4.0)  # confident enough predictions for non-trivial weights
    xs = _images(6)
    seed = 7
    ours = tta.adapt(source, "roid", consistency=consistency, seed=seed)
    official = official_cls(_cfg(xs[0].shape[0], consistency), copy.deepcopy(source), 4)
    torch.manual_seed(seed)  # the official augmentation draws from the global RNG
    worst = 0.0
    for x in xs:
        expected = official(x)
        got = ours(x)
        worst = max(worst, (got - expected).abs().max().item())
    ours_params = dict(ours.model.named_parameters())
    param_diff = max((ours_params[n] - p).abs().max().item() for n, p in official.model.named_parameters())
    print(f"roid consistency={consistency}: max |output diff| {worst:.3g}, max |param diff| {param_diff:.3g}")
    assert worst < 1e-4 and param_diff < 1e-5
