"""EATA / ETA (tta/methods/eata.py): the spec on hand-computed cases and, when a checkout of
mr-eggplant/EATA is given (EATA_OFFICIAL_SRC = the repository root), the official code."""

from __future__ import annotations

import ast
import copy
import importlib.util
import logging
import math
import types

import pytest
import torch
from torch import nn

import tta
from tta.methods.eata import compute_fisher, eata_loss, select_samples, update_probs_average
from tests.official import checkout_root
from tests.conftest import small_bn_cnn


def _logits(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log().float()


def _entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p)


def _confident_model(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():  # the conv/linear weights come from the global RNG
        torch.manual_seed(seed)
        model = small_bn_cnn(num_classes=4, width=8, seed=seed)
    with torch.no_grad():
        model[-1].weight.mul_(6.0)  # a spread of entropies around 0.4 ln 4
    return model


def _images(n: int, seed: int = 1, batch: int = 16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 3, 8, 8, generator=generator) * 2 - 0.5 for _ in range(n)]


# -- the spec on hand-computed cases -------------------------------------------------------
def test_selection_masks_by_hand() -> None:
    probs = [[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]]
    e0 = 0.55  # H = 0.325, 0.693, 0.500
    unset = torch.zeros(2), torch.zeros((), dtype=torch.bool)
    ent, reliable, selected = select_samples(_logits(probs), e0, 0.5, *unset)
    assert ent.tolist() == pytest.approx([_entropy(p) for p in probs], rel=1e-5)
    assert reliable.tolist() == [True, False, True]
    assert selected.tolist() == [True, False, True]  # no average yet: nothing is redundant
    # |cos([0.9, 0.1], [1, 0])| = 0.994 (redundant), |cos([0.2, 0.8], [1, 0])| = 0.243
    _, _, selected = select_samples(_logits(probs), e0, 0.5, torch.tensor([1.0, 0.0]), torch.tensor(True))
    assert selected.tolist() == [False, False, True]


def test_moving_average_of_predictions() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])
    empty, unset = torch.zeros(0), torch.zeros((), dtype=torch.bool)
    avg, flag = update_probs_average(probs, torch.tensor([False, False, False]), empty, unset)
    assert not flag  # an empty selection leaves the average unset
    avg, flag = update_probs_average(probs, torch.tensor([True, False, True]), avg, flag)
    assert bool(flag) and avg.tolist() == pytest.approx([0.55, 0.45])
    avg, flag = update_probs_average(probs, torch.tensor([False, True, False]), avg, flag)
    assert avg.tolist() == pytest.approx([0.9 * 0.55 + 0.1 * 0.5, 0.9 * 0.45 + 0.1 * 0.5])
    same, _ = update_probs_average(probs, torch.tensor([False, False, False]), avg, flag)
    assert torch.equal(same, avg)


def test_weighted_entropy_loss_by_hand() -> None:
    ent = torch.tensor([0.3, 0.7, 0.5])
    loss = eata_loss(ent, torch.tensor([True, False, True]), 0.6)
    assert loss.item() == pytest.approx((math.exp(0.3) * 0.3 + math.exp(0.1) * 0.5) / 2, rel=1e-6)
    assert eata_loss(ent, torch.zeros(3, dtype=torch.bool), 0.6).item() == 0.0


def test_fisher_by_hand() -> None:
    # logits z = W x; CE against argmax y: dL/dW = (softmax(z) - onehot(y)) x^T (batch mean)
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    batches = [torch.tensor([[1.0, 0.5]]), (torch.tensor([[0.5, 1.0], [2.0, 0.0]]), torch.tensor([0, 1]))]

    def grad(x: list[float]) -> list[list[float]]:
        z = [x[0], 2 * x[1]]
        p = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
        y = max(range(2), key=lambda c: z[c])
        return [[(p[c] - (c == y)) * x[j] for j in range(2)] for c in range(2)]

    g1 = grad([1.0, 0.5])
    g2a, g2b = grad([0.5, 1.0]), grad([2.0, 0.0])
    g2 = [[(g2a[c][j] + g2b[c][j]) / 2 for j in range(2)] for c in range(2)]
    expected = [[(g1[c][j] ** 2 + g2[c][j] ** 2) / 2 for j in range(2)] for c in range(2)]
    fisher = compute_fisher(layer, [layer.weight], batches)
    assert fisher[0].tolist() == [pytest.approx(row, rel=1e-5) for row in expected]
    with pytest.raises(ValueError, match="no batch"):
        compute_fisher(layer, [layer.weight], [])


def test_fisher_term_and_skipped_steps() -> None:
    model = _confident_model()
    xs = _images(4)
    adapted = tta.adapt(model, "eata", fisher_loader=[xs[0], xs[1]], fisher_alpha=50.0, optimizer="sgd", lr=0.01)
    method = adapted.method.method
    assert method.fisher and all(f.min() >= 0 for f in method.fisher) and any(f.sum() > 0 for f in method.fisher)
    for x in xs[2:]:
        adapted(x)
    moved = [(p.detach().float() - a) for p, a in zip(method.params, method.anchors)]
    expected = 50.0 * sum((f * d.square()).sum() for f, d in zip(method.fisher, moved))
    assert method.regularizer().item() == pytest.approx(expected.item(), rel=1e-6)
    assert expected > 0 and int(method.num_selected) > 0
    # no sample selected: no step at all, so SGD momentum does not move the parameters
    before = [p.detach().clone() for p in method.params]
    method.hparams.e0 = 1e-9
    adapted(xs[0])
    assert all(torch.equal(p, b) for p, b in zip(method.params, before))
    # the Fisher survives reset() and a state_dict round trip into a wrapper built without data
    adapted.reset()
    fresh = tta.adapt(model, "eata", fisher_alpha=50.0, optimizer="sgd", lr=0.01)
    fresh.load_state_dict(adapted.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.method.method.fisher, method.fisher))


def test_eata_without_data_is_eta(caplog: pytest.LogCaptureFixture) -> None:
    model = _confident_model()
    xs = _images(3)
    with caplog.at_level(logging.WARNING, logger="tta"):
        eata = tta.adapt(model, "eata")
    assert "running as ETA" in caplog.text
    eta = tta.adapt(model, "eta")
    for x in xs:
        torch.testing.assert_close(eata(x), eta(x), rtol=0, atol=0)
    assert "fisher_loader='list'" in tta.adapt(model, "eata", fisher_loader=[xs[0]]).method.describe()


def test_bad_input_raises() -> None:
    with pytest.raises(TypeError, match="fisher_loader must yield"):
        tta.adapt(_confident_model(), "eata", fisher_loader=["not a tensor"])
    with pytest.raises(ValueError, match="d_margin"):
        tta.adapt(_confident_model(), "eta", d_margin=0.0)


# -- the official code ---------------------------------------------------------------------
def _official() -> tuple[types.ModuleType, ast.For]:
    root = checkout_root("EATA_OFFICIAL_SRC")
    spec = importlib.util.spec_from_file_location("official_eata", root / "eata.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    # the Fisher loop sits inline in main.py's __main__ block: take that for-statement
    tree = ast.parse((root / "main.py").read_text())
    loop = next(
        node for node in ast.walk(tree)
        if isinstance(node, ast.For) and isinstance(node.iter, ast.Call) and ast.unparse(node.iter).startswith("enumerate(fisher_loader")
    )
    return module, loop


def _official_fisher(loop: ast.For, model: nn.Module, params: list[nn.Parameter], batches: list) -> dict:
    namespace = {
        "fisher_loader": batches, "subnet": model, "fishers": {}, "torch": torch,
        "train_loss_fn": nn.CrossEntropyLoss(), "ewc_optimizer": torch.optim.SGD(params, 0.001),
        "args": types.SimpleNamespace(gpu=None),
    }
    exec(compile(ast.Module(body=[loop], type_ignores=[]), "main.py", "exec"), namespace)
    return namespace["fishers"]


@pytest.mark.official
@pytest.mark.parametrize("with_fisher", [False, True])
def test_matches_official_eata(with_fisher: bool) -> None:
    official_module, loop = _official()
    source = _confident_model(seed=1)
    generator = torch.Generator().manual_seed(3)  # per-image contrast: diverse predictions
    xs = [torch.rand(16, 3, 8, 8, generator=generator) * torch.rand(16, 3, 1, 1, generator=generator) * 3 for _ in range(8)]
    fisher_batches = [(x, torch.zeros(x.shape[0], dtype=torch.long)) for x in _images(3, seed=9)]
    # a margin near 1 on 4 classes, so that several batches update and the Fisher term acts
    e0, d_margin, alpha, lr = 0.4 * math.log(4), 0.99, 2000.0, 0.01

    subnet = official_module.configure_model(copy.deepcopy(source))
    params, _ = official_module.collect_params(subnet)
    fishers = _official_fisher(loop, subnet, params, fisher_batches) if with_fisher else None
    optimizer = torch.optim.SGD(params, lr, momentum=0.9)
    official = official_module.EATA(subnet, optimizer, fishers, alpha, e_margin=e0, d_margin=d_margin)

    kwargs = dict(optimizer="sgd", lr=lr, sgd_momentum=0.9, nesterov=False, e0=e0, d_margin=d_margin)
    if with_fisher:
        ours = tta.adapt(source, "eata", fisher_loader=fisher_batches, fisher_alpha=alpha, **kwargs)
        ours_fisher = ours.method.method.fisher
        fisher_diff = max((f - fishers[n][0]).abs().max().item() for f, n in zip(ours_fisher, _bn_names(subnet)))
    else:
        ours = tta.adapt(source, "eta", **kwargs)
        fisher_diff = 0.0
    worst = 0.0
    for x in xs:
        worst = max(worst, (ours(x) - official(x)).abs().max().item())
    ours_params = dict(ours.model.named_parameters())
    param_diff = max((ours_params[n] - p).abs().max().item() for n, p in subnet.named_parameters())
    method = ours.method.method
    counts = (int(method.num_reliable), int(method.num_selected))
    moved = max((p.detach() - s).abs().max().item() for p, s in zip(method.params, entropy_params(source)))
    penalty = 0.0 if method.regularizer() is None else method.regularizer().item()
    print(f"eata fisher={with_fisher}: max |output diff| {worst:.3g}, |param diff| {param_diff:.3g}, "
          f"|fisher diff| {fisher_diff:.3g}, params moved {moved:.3g}, penalty {penalty:.3g}, "
          f"reliable/selected {counts} vs official "
          f"{(official.num_samples_update_1, official.num_samples_update_2)}")
    assert counts == (official.num_samples_update_1, official.num_samples_update_2)
    assert 0 < counts[1] < counts[0] < 8 * 16  # both filters were active
    assert moved > 1e-3 and (penalty > 1e-3 or not with_fisher)
    assert worst < 1e-4 and param_diff < 1e-5 and fisher_diff < 1e-6


def entropy_params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in (m.weight, m.bias)]


def _bn_names(model: nn.Module) -> list[str]:
    return [f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) for p in ("weight", "bias")]
