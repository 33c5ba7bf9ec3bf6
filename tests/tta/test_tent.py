"""TENT (docs/METHODS.md §2): trainable set, optimizer defaults, pre-update prediction,
episodic mode, state round trips, entropy decrease on a shifted batch."""

import copy

import pytest
import torch
from torch import nn

import tta
from tta.layers.batch_stats import TestTimeBatchNorm
from tta.methods.entropy import softmax_entropy


def bn_cnn(classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes),
    ).eval()


def gn_cnn(classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes),
    ).eval()


def shifted_batch(n: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=g) * 2.0 + 0.5


def inner(adapted: tta.Adapted):
    method = adapted.method
    return getattr(method, "method", method)


def test_tent_alone_runs_on_norm_and_trains_only_norm_affine():
    adapted = tta.adapt(bn_cnn(), "tent")
    assert adapted.method_name == "tent"
    assert isinstance(adapted.model[1], TestTimeBatchNorm)
    tent = inner(adapted)
    assert tent.param_names == ["1.weight", "1.bias", "4.weight", "4.bias"]
    trainable = {name for name, p in adapted.model.named_parameters() if p.requires_grad}
    assert trainable == set(tent.param_names)
    optimizer = tent.optimizer
    assert isinstance(optimizer.inner, torch.optim.Adam)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-3, (0.9, 0.999), 0.0)


def test_tent_runs_directly_on_groupnorm_models():
    adapted = tta.adapt(gn_cnn(), "tent")
    assert isinstance(adapted.model[1], nn.GroupNorm)  # no statistics layer on GN models
    assert inner(adapted).param_names == ["1.weight", "1.bias"]
    before = adapted.model[1].weight.detach().clone()
    adapted(torch.randn(1, 3, 8, 8))  # batch size 1 is fine with GN
    assert not torch.equal(adapted.model[1].weight, before)


def test_tent_sgd_option():
    tent = inner(tta.adapt(bn_cnn(), "tent", optimizer="sgd", lr=2.5e-4))
    group = tent.optimizer.param_groups[0]
    assert isinstance(tent.optimizer.inner, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["nesterov"], group["dampening"]) == (2.5e-4, 0.9, True, 0.0)
    with pytest.raises(ValueError, match="optimizer"):
        tta.adapt(bn_cnn(), "tent", optimizer="rmsprop")


def test_tent_lowers_entropy_on_shifted_batch():
    adapted = tta.adapt(bn_cnn(), "tent", lr=5e-2)
    x = shifted_batch()
    with adapted.no_adapt():
        before = softmax_entropy(adapted(x)).mean()
    for _ in range(10):
        adapted(x)
    with adapted.no_adapt():
        after = softmax_entropy(adapted(x)).mean()
    assert after < before - 0.05, (before, after)


def test_tent_returns_the_pre_update_prediction():
    adapted = tta.adapt(bn_cnn(), "tent", lr=1e-2)
    x = shifted_batch()
    with adapted.no_adapt():
        expected = adapted(x)
    out = adapted(x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)  # grad vs no-grad kernels
    assert not out.requires_grad
    with adapted.no_adapt():
        assert not torch.allclose(adapted(x), expected)  # the update happened after predicting


def test_tent_adapts_inside_no_grad():
    adapted = tta.adapt(bn_cnn(), "tent")
    before = adapted.model[1].weight.detach().clone()
    with torch.no_grad():
        adapted(shifted_batch())
    assert not torch.equal(adapted.model[1].weight, before)


def test_tent_steps_option_updates_several_times():
    adapted = tta.adapt(bn_cnn(), "tent", steps=3)
    adapted(shifted_batch())
    state = inner(adapted).optimizer.state_dict()["optimizer"]["state"]
    assert all(float(s["step"]) == 3 for s in state.values())


def test_tent_episodic_restores_state_before_each_batch():
    model = bn_cnn()
    x, other = shifted_batch(), shifted_batch() * 0.5
    episodic = tta.adapt(model, "tent", episodic=True, lr=1e-2)
    first = episodic(x)
    episodic(other)
    assert torch.equal(episodic(x), first)  # same prediction: the state was restored
    params_after_x = copy.deepcopy(episodic.state_dict())
    episodic(other)
    episodic(x)
    for key, value in episodic.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, params_after_x[key]), key

    online = tta.adapt(model, "tent", lr=1e-2)
    online(x)
    online(other)
    assert not torch.equal(online(x), first)


def test_tent_state_dict_round_trip_and_reset():
    model = bn_cnn()
    adapted = tta.adapt(model, "tent")
    initial = copy.deepcopy(adapted.state_dict())
    for scale in (1.0, 2.0, 0.5):
        adapted(shifted_batch() * scale)
    saved = copy.deepcopy(adapted.state_dict())
    restored = tta.adapt(model, "tent")
    restored.load_state_dict(saved)
    for _ in range(2):  # Adam moments and step counts must match for identical continuation
        x = shifted_batch() * 1.5
        assert torch.equal(adapted(x), restored(x))
    adapted.reset()
    fresh = tta.adapt(model, "tent")
    assert torch.equal(adapted(shifted_batch()), fresh(shifted_batch()))
    adapted.load_state_dict(initial)


def test_tent_nan_batch_leaves_parameters_finite():
    adapted = tta.adapt(bn_cnn(), "tent", lr=1e-2)
    bad = shifted_batch()
    bad[0, 0, 0, 0] = float("nan")
    adapted(bad)
    assert all(torch.isfinite(p).all() for p in adapted.parameters())
    assert torch.isfinite(adapted(shifted_batch())).all()


def test_tent_rejects_models_without_norm_layers():
    with pytest.raises(ValueError, match="normalization"):
        tta.adapt(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), "tent")
