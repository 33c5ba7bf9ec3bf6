"""CMF (tta/methods/cmf.py): the filter on hand-computed cases and, when a checkout of
mariodoebler/test-time-adaptation is given (ROID_OFFICIAL_SRC = the repository root), the
official CMF class step by step."""

from __future__ import annotations

import copy
import types

import pytest
import torch

import tta
from tests.conftest import small_bn_cnn
from tests.tta.test_roid import official_benchmark_method
from tta.methods.cmf import filter_gain, momentum_filter_
from tta.methods.roid import prior_correction

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int = 4, batch_size: int = 16, size: int = 32, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(batch_size, 3, size, size, generator=generator) for _ in range(n)]


# -- the spec on hand-computed cases -------------------------------------------------------
def test_filter_gain_by_hand() -> None:
    alpha, q = 0.9, 0.1
    r = 1 - q
    # step 1 from P = 0: predict P = q = 0.1, beta = 0.9 / (0.1 + 0.9) = 0.9, P = 0.09
    beta, variance = filter_gain(0.0, alpha, q)
    assert beta == pytest.approx(0.9) and variance == pytest.approx(0.09)
    # step 2: P = 0.81 * 0.09 + 0.1 = 0.1729, beta = 0.9 / 1.0729 = 0.8388 -> raised to 0.89
    beta, variance = filter_gain(variance, alpha, q)
    assert r / (0.81 * 0.09 + 0.1 + r) < 0.89
    assert beta == 0.89 and variance == pytest.approx(0.89 * 0.1729)
    # a tiny process noise: beta = r / (q + r) = 1 - q >= 0.9999 counts as 1 (no correction)
    beta, variance = filter_gain(0.0, 0.99, 5e-5)
    assert beta == 1.0 and variance == pytest.approx(5e-5)


def test_momentum_filter_by_hand() -> None:
    theta, hidden, source = [torch.tensor([1.0, 4.0])], [torch.tensor([0.0, 2.0])], [torch.tensor([2.0, 0.0])]
    momentum_filter_(theta, hidden, source, alpha=0.5, beta=0.75, gamma=0.8)
    # predict: h = 0.5 h + 0.5 src = [1, 1]; update: h = 0.75 h + 0.25 theta = [1, 1.75];
    # ensemble: theta = 0.8 theta + 0.2 h = [1, 3.55]
    assert hidden[0].tolist() == pytest.approx([1.0, 1.75])
    assert theta[0].tolist() == pytest.approx([1.0, 3.55])
    theta, hidden = [torch.tensor([1.0])], [torch.tensor([3.0])]
    momentum_filter_(theta, hidden, [torch.tensor([3.0])], alpha=1.0, beta=1.0, gamma=0.5)  # only the ensemble
    assert hidden[0].tolist() == [3.0] and theta[0].tolist() == [2.0]


def test_one_step_is_roid_then_the_filter() -> None:
    """The loss and prediction are ROID's; after the step the parameters are ROID's trained
    ones (without ensembling) run through the filter, and the variance moved as by hand."""
    model = small_bn_cnn(width=5)
    x = _images(1)[0]
    q_scale = 300.0  # 20 trained values: q = 300 * 20 / 38400
    cmf = tta.adapt(model, "cmf", q=q_scale, seed=3)
    roid = tta.adapt(model, "roid", momentum_src=1.0, seed=3)
    source = [p.detach().clone() for p in cmf.method.method.params]
    out, expected = cmf(x), roid(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    method = cmf.method.method
    q = q_scale * 20 / 38400
    assert sum(p.numel() for p in method.params) == 20 and method.process_noise == pytest.approx(q)
    beta = max((1 - q) / (q + 1 - q), 0.89)
    assert method.hidden_var == pytest.approx(beta * q)
    for param, trained, src, hidden in zip(method.params, roid.method.method.params, source, method.hidden_params):
        h = beta * src + (1 - beta) * trained.detach()  # alpha h + (1 - alpha) src = src at the first step
        torch.testing.assert_close(hidden, h, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(param.detach(), 0.99 * trained.detach() + 0.01 * h, rtol=1e-6, atol=1e-7)


def test_prediction_state_and_reset() -> None:
    model = small_bn_cnn(width=5)
    xs = _images(3)
    adapted = tta.adapt(model, "cmf", consistency=False)
    with adapted.no_adapt():
        predicted = adapted(xs[0])
    out = adapted(xs[0])
    assert torch.equal(predicted, out)
    with torch.no_grad():
        raw = tta.adapt(model, "norm")(xs[0])
    torch.testing.assert_close(out, prior_correction(raw), rtol=1e-5, atol=1e-6)
    for x in xs[1:]:
        adapted(x)
    method = adapted.method.method
    assert method.hidden_var > 0 and not torch.equal(method.hidden_params[0], method.source_params[0])
    adapted.reset()
    assert method.hidden_var == 0.0 and torch.equal(method.hidden_params[0], method.source_params[0])


def test_bad_hyperparameters_raise() -> None:
    with pytest.raises(ValueError, match="process noise"):
        tta.adapt(small_bn_cnn(width=5), "cmf", q=2000.0)
    with pytest.raises(ValueError, match="gamma"):
        tta.adapt(small_bn_cnn(width=5), "cmf", gamma=1.5)


# -- the official code ---------------------------------------------------------------------
def _official_cmf():
    return official_benchmark_method("cmf.py", "CMF")


def _cfg(batch_size: int, consistency: bool, q: float) -> types.SimpleNamespace:
    ns = types.SimpleNamespace
    return ns(
        MODEL=ns(EPISODIC=False, RESET_AFTER_NUM_UPDATES=0, ADAPTATION="cmf"),
        CORRUPTION=ns(DATASET="cifar10_c"),
        OPTIM=ns(STEPS=1, LR=1e-3, METHOD="Adam", BETA=0.9, MOMENTUM=0.9, DAMPENING=0.0, NESTEROV=True, WD=0.0),
        TEST=ns(BATCH_SIZE=batch_size, WINDOW_LENGTH=1, DEBUG=False),
        MIXED_PRECISION=False,
        ROID=ns(USE_WEIGHTING=True, USE_PRIOR_CORRECTION=True, USE_CONSISTENCY=consistency,
                MOMENTUM_SRC=0.99, MOMENTUM_PROBS=0.9, TEMPERATURE=1 / 3),
        CMF=ns(ALPHA=0.99, GAMMA=0.99, Q=q, TYPE="lp"),
    )


@pytest.mark.official
@pytest.mark.parametrize("consistency, q", [(False, 0.005), (False, 150.0), (True, 150.0)])
def test_matches_official_cmf(monkeypatch: pytest.MonkeyPatch, consistency: bool, q: float) -> None:
    """The official CMF class on the same model and batches (its consistency augmentation
    draws from the global RNG exactly as ROID's reimplementation draws from our generator).
    Q = 0.005 is the official value: on this model of 32 trained values it gives gains of 1
    (no correction); Q = 150 (q = 0.125) runs the correction and the 0.89 bound."""
    official_cls = _official_cmf()
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)  # the official prior is built on CUDA
    with torch.random.fork_rng():  # the conv/linear weights come from the global RNG
        torch.manual_seed(0)
        source = small_bn_cnn(num_classes=4, width=8)
    with torch.no_grad():
        source[-1].weight.mul_(4.0)  # confident enough predictions for non-trivial weights
    xs = _images(6)
    seed = 7
    ours = tta.adapt(source, "cmf", consistency=consistency, q=q, seed=seed)
    official = official_cls(_cfg(xs[0].shape[0], consistency, q), copy.deepcopy(source), 4)
    torch.manual_seed(seed)  # the official augmentation draws from the global RNG
    worst = 0.0
    for x in xs:
        expected = official(x)
        got = ours(x)
        worst = max(worst, (got - expected).abs().max().item())
    method = ours.method.method
    ours_params = dict(ours.model.named_parameters())
    param_diff = max((ours_params[n] - p).abs().max().item() for n, p in official.model.named_parameters())
    hidden = dict(official.hidden_model.named_parameters())
    hidden_diff = max((h - hidden[n]).abs().max().item() for n, h in zip(method.param_names, method.hidden_params))
    print(f"cmf consistency={consistency} Q={q}: max |output diff| {worst:.3g}, parameters {param_diff:.3g}, "
          f"hidden {hidden_diff:.3g}, variance {method.hidden_var:.6g} vs {official.hidden_var:.6g}")
    assert method.hidden_var == pytest.approx(official.hidden_var, rel=1e-12)
    assert worst < 1e-4 and param_diff < 1e-5 and hidden_diff < 1e-5
