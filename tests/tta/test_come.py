"""COME's entropy of the opinion (tta/methods/entropy.py, docs/METHODS.md §10.10), the ``loss``
option of tent, eta/eata, sar and deyo: the loss by hand, its wiring into each method and,
when a checkout of BlueWhaleLab/COME is given (COME_OFFICIAL_SRC = the repository root), the
authors' Tent_COME, EATA_COME (without the Fisher term) and SAR_COME."""

from __future__ import annotations

import copy
import importlib.util
import math
import types

import pytest
import torch
from torch import nn

import tta
import tta.methods.entropy as entropy_module
from tests.conftest import small_bn_cnn
from tests.official import checkout_root
from tta.methods.eata import select_samples
from tta.methods.entropy import OPINION_EPS, opinion_entropy, sample_entropy, softmax_entropy


def inner(adapted):
    return getattr(adapted.method, "method", adapted.method)


def by_hand(logits: list[float], prior: float | None = None) -> float:
    """The entropy of the opinion, written out: evidence exp(y), S = sum + K, masses
    b_c = e_c / S and u = K / S, each smoothed by 1e-7."""
    k = len(logits) if prior is None else prior
    evidence = [math.exp(v) for v in logits]
    strength = sum(evidence) + k
    masses = [e / strength for e in evidence] + [k / strength]
    return -sum((m + OPINION_EPS) * math.log(m + OPINION_EPS) for m in masses)


# -- the loss ----------------------------------------------------------------------------------------
def test_opinion_entropy_by_hand() -> None:
    rows = [[0.0, math.log(2.0), math.log(3.0)], [2.0, -1.0, 0.5], [0.0, 0.0, 0.0]]
    got = opinion_entropy(torch.tensor(rows, dtype=torch.float64))
    # first row: evidence 1, 2, 3 and K = 3: masses 1/9, 2/9, 3/9 and u = 3/9
    first = -sum((m + 1e-7) * math.log(m + 1e-7) for m in (1 / 9, 2 / 9, 3 / 9, 3 / 9))
    assert got[0].item() == pytest.approx(first, rel=1e-6)
    assert got.tolist() == pytest.approx([by_hand(r) for r in rows], rel=1e-6)  # zero logits: finite
    assert got.dtype == torch.float32  # computed in fp32, like softmax_entropy
    other_prior = opinion_entropy(torch.tensor([[2.0, -1.0]]), prior=1000.0)
    assert other_prior.item() == pytest.approx(by_hand([2.0, -1.0], prior=1000.0), rel=1e-5)


def test_opinion_entropy_is_conservative_and_stable() -> None:
    # scaling confident logits up lowers the softmax entropy towards 0; the opinion keeps the
    # uncertainty mass of a sample with little evidence
    weak = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert opinion_entropy(weak).item() > softmax_entropy(weak).item()
    huge = opinion_entropy(torch.tensor([[500.0, 0.0], [-500.0, 0.0]]))
    assert torch.isfinite(huge).all()  # exp(500) would overflow fp32
    assert huge[0].item() == pytest.approx(by_hand([60.0, 0.0]), abs=1e-5)  # all mass on one belief


def test_opinion_entropy_gradient_keeps_the_logit_norm() -> None:
    """The gradient with respect to the logits is the plain opinion entropy's gradient with
    its component along the logits removed."""
    y = torch.tensor([[1.5, -0.5, 0.25], [0.2, 0.1, 2.0]], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(opinion_entropy(y).sum(), y)
    plain = y.detach().clone().requires_grad_(True)
    evidence = torch.cat([plain, torch.full((2, 1), math.log(3.0), dtype=torch.float64)], 1)
    q = torch.softmax(evidence, 1) + OPINION_EPS
    (raw,) = torch.autograd.grad(-(q * q.log()).sum(), plain)
    unit = y.detach() / y.detach().norm(dim=1, keepdim=True)
    projected = raw - (raw * unit).sum(1, keepdim=True) * unit
    torch.testing.assert_close(grad.double(), projected, rtol=1e-5, atol=1e-7)
    assert (grad.double() * y.detach()).sum(1).abs().max() < 1e-6


def test_sample_entropy_dispatch() -> None:
    y = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_entropy(y), softmax_entropy(y))
    assert torch.equal(sample_entropy(y, "come"), opinion_entropy(y))
    with pytest.raises(ValueError, match="loss"):
        sample_entropy(y, "kl")


# -- the option on each method -------------------------------------------------------------------------
METHODS = ["tent", "eta", "eata", "sar", "deyo"]


def confident_model(num_classes: int = 4, scale: float = 6.0, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = small_bn_cnn(num_classes=num_classes, width=8, seed=seed)
    with torch.no_grad():
        model[-1].weight.mul_(scale)
    return model


def inputs(n: int, batch: int = 16, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 3, 8, 8, generator=generator) * torch.rand(batch, 3, 1, 1, generator=generator) * 3
            for _ in range(n)]


@pytest.mark.parametrize("method", METHODS)
def test_every_entropy_method_takes_the_option(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = entropy_module.opinion_entropy

    def counting(logits: torch.Tensor, prior: float | None = None) -> torch.Tensor:
        calls.append(logits.shape[0])
        return original(logits, prior)

    monkeypatch.setattr(entropy_module, "opinion_entropy", counting)
    model, xs = confident_model(), inputs(2)
    extra = {"plpd_threshold": -1.0} if method == "deyo" else {}
    plain = tta.adapt(model, method, **extra)
    explicit = tta.adapt(model, method, loss="entropy", **extra)
    for x in xs:
        torch.testing.assert_close(plain(x), explicit(x), rtol=0, atol=0)  # the default is the entropy
    assert calls == [] and inner(plain).hparams.loss == "entropy"
    come = tta.adapt(model, method, loss="come", **extra)
    for x in xs:
        come(x)
    forwards = {"sar": 2}.get(method, 1)  # SAR: both of its forwards
    assert calls == [16] * (forwards * len(xs))
    assert "loss" in {h.name for h in tta.hparams(method) if h.method == method}
    with pytest.raises(ValueError, match="loss"):
        tta.adapt(model, method, loss="kl")


def test_tent_come_step_by_hand() -> None:
    model, (x,) = confident_model(), inputs(1)
    lr = 0.05
    adapted = tta.adapt(model, "tent", loss="come", optimizer="sgd", lr=lr, sgd_momentum=0.0)
    reference = copy.deepcopy(model)
    bns = [m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.track_running_stats, bn.running_mean, bn.running_var = False, None, None
    params = [p for bn in bns for p in (bn.weight, bn.bias)]
    grads = torch.autograd.grad(opinion_entropy(reference(x)).mean(), params)
    adapted(x)
    ours = [p.detach() for p in inner(adapted).params]
    for mine, param, grad in zip(ours, params, grads):
        torch.testing.assert_close(mine, param.detach() - lr * grad, rtol=1e-5, atol=1e-6)


def test_eata_selection_uses_the_opinion_entropy() -> None:
    logits = torch.tensor([[4.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.0, 3.0, 0.0]])
    opinion = [by_hand(r) for r in logits.tolist()]
    e0 = sorted(opinion)[1] + 1e-3  # two of three reliable
    ent, reliable, selected = select_samples(logits, e0, 0.5, torch.zeros(0), torch.zeros((), dtype=torch.bool), "come")
    assert ent.tolist() == pytest.approx(opinion, rel=1e-6)
    assert reliable.tolist() == [o < e0 for o in opinion] and selected.tolist() == reliable.tolist()


# -- the official code ---------------------------------------------------------------------------------
def _official(*names: str) -> list[types.ModuleType]:
    root = checkout_root("COME_OFFICIAL_SRC")
    modules = []
    for name in names:
        spec = importlib.util.spec_from_file_location(f"_official_come_{name}", root / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        modules.append(module)
    return modules


# the authors' code hard-codes K = 1000 (ImageNet's class count): the models have 1000 classes
CLASSES = 1000


def _compare(ours, official, xs, source_params: dict[str, torch.Tensor], official_model: nn.Module, label: str):
    worst = 0.0
    for x in xs:
        expected = official(x)
        worst = max(worst, (ours(x) - expected.detach()).abs().max().item())
    mine = dict(ours.model.named_parameters())
    param_diff = max((mine[n] - p).abs().max().item() for n, p in official_model.named_parameters())
    moved = max((mine[n] - source_params[n]).abs().max().item() for n in inner(ours).param_names)
    print(f"{label}: max |output diff| {worst:.3g}, |param diff| {param_diff:.3g}, params moved {moved:.3g}")
    return worst, param_diff, moved


@pytest.mark.official
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_tent_come_matches_official(optimizer: str) -> None:
    (tent_come,) = _official("tent_come")
    source = confident_model(CLASSES, scale=3.0)
    net = tent_come.configure_model(copy.deepcopy(source))
    params, _ = tent_come.collect_params(net)
    lr = 0.01 if optimizer == "sgd" else 1e-3
    opt = torch.optim.SGD(params, lr, momentum=0.9) if optimizer == "sgd" else torch.optim.Adam(params, lr)
    official = tent_come.Tent_COME(net, opt, args=None)
    ours = tta.adapt(source, "tent", loss="come", optimizer=optimizer, lr=lr, sgd_momentum=0.9, nesterov=False)
    initial = {n: p.detach().clone() for n, p in source.named_parameters()}
    worst, param_diff, moved = _compare(ours, official, inputs(6), initial, net, f"tent_come/{optimizer}")
    assert moved > 1e-3 and worst < 1e-4 and param_diff < 1e-5


@pytest.mark.official
def test_eta_come_matches_official() -> None:
    (eata_come,) = _official("eata_come")
    source = confident_model(CLASSES, scale=20.0, seed=1)
    e0, d_margin, lr = 0.4 * math.log(CLASSES), 0.9, 0.01
    net = eata_come.configure_model(copy.deepcopy(source))
    params, _ = eata_come.collect_params(net)
    official = eata_come.EATA_COME(net, torch.optim.SGD(params, lr, momentum=0.9), None, e_margin=e0, d_margin=d_margin)
    ours = tta.adapt(source, "eta", loss="come", optimizer="sgd", lr=lr, sgd_momentum=0.9, nesterov=False,
                     e0=e0, d_margin=d_margin)
    initial = {n: p.detach().clone() for n, p in source.named_parameters()}
    worst, param_diff, moved = _compare(ours, official, inputs(8, seed=3), initial, net, "eta_come")
    method = inner(ours)
    counts = (int(method.num_reliable), int(method.num_selected))
    print(f"eta_come reliable/selected {counts} vs official "
          f"{(official.num_samples_update_1, official.num_samples_update_2)}")
    assert counts == (official.num_samples_update_1, official.num_samples_update_2)
    assert 0 < counts[1] < counts[0] < 8 * 16  # both filters were active
    assert moved > 1e-3 and worst < 1e-4 and param_diff < 1e-5


def _ln_mlp(scale: float, bias: float) -> nn.Module:
    """A LayerNorm MLP whose class 0 leads by ``bias`` (confident, low opinion entropy) on many
    samples: the loss average crosses SAR's 0.2 now and then. Its logits stay below 88, where
    the authors' ``exp`` overflows in fp32."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, CLASSES))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
        model[3].weight.mul_(scale)
        model[3].bias[0] += bias
    return model.eval()


@pytest.mark.official
def test_sar_come_matches_official_through_recoveries(capsys: pytest.CaptureFixture[str]) -> None:
    """``faithful=True`` and ``loss="come"`` against SAR_COME + SAM on a LayerNorm model whose
    loss average falls below 0.2 on some batches, so the run goes through recoveries (after
    which the authors' code keeps the loss average and the SGD momentum buffers)."""
    sam, sar_come = _official("sam", "sar_come")
    source = _ln_mlp(scale=10.0, bias=20.0)
    net = copy.deepcopy(source).train()
    net.requires_grad_(False)
    params, _ = sar_come.collect_params(net)
    for p in params:
        p.requires_grad_(True)
    e0 = 0.4 * math.log(CLASSES)
    official = sar_come.SAR_COME(net, sam.SAM(params, torch.optim.SGD, lr=0.5, momentum=0.9), margin_e0=e0)
    ours = tta.adapt(source, "sar", loss="come", lr=0.5, faithful=True, exclude=())
    recoveries, worst = 0, 0.0
    for seed in range(20):
        x = torch.randn(16, 12, generator=torch.Generator().manual_seed(seed)) * 2
        expected = official(x)
        recoveries += "reset the model" in capsys.readouterr().out
        worst = max(worst, (ours(x) - expected.detach()).abs().max().item())
    mine = dict(ours.model.named_parameters())
    param_diff = max((mine[n] - p).abs().max().item() for n, p in net.named_parameters())
    with capsys.disabled():
        print(f"sar_come: max |output diff| {worst:.3g}, |param diff| {param_diff:.3g}, recoveries {recoveries} "
              f"vs ours {inner(ours).num_recoveries}")
    assert 20 > inner(ours).num_recoveries == recoveries >= 2
    assert worst < 1e-4 and param_diff < 1e-4
