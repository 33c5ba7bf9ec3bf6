"""Exactness of the statistics methods against hand-computed forwards."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta
from tests.conftest import batches, small_bn_cnn
from tta.layers import UnMixTNS
from tta.surgery import source_state


def _manual_forward(model: nn.Module, x: torch.Tensor, stats) -> torch.Tensor:
    """Run ``model`` with every BatchNorm2d normalizing with ``stats(bn, z) -> (mean, var)``."""
    for module in model:
        if isinstance(module, nn.BatchNorm2d):
            mean, var = stats(module, x)
            x = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + module.eps)
            x = x * module.weight[None, :, None, None] + module.bias[None, :, None, None]
        else:
            x = module(x)
    return x


def _batch_stats(bn, z):
    return z.mean(dim=(0, 2, 3)), z.var(dim=(0, 2, 3), unbiased=False)


def test_norm_equals_hand_computed_batch_statistics_forward():
    model = small_bn_cnn()
    x = batches(1)[0]
    out = tta.adapt(model, "norm")(x)
    with torch.no_grad():
        expected = _manual_forward(model, x, _batch_stats)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_norm_equals_train_mode_batchnorm_output():
    model = small_bn_cnn()
    x = batches(1)[0]
    reference = copy.deepcopy(model).train()
    with torch.no_grad():
        expected = reference(x)
    torch.testing.assert_close(tta.adapt(model, "norm")(x), expected, rtol=1e-5, atol=1e-5)


def test_alpha_bn_extremes_equal_source_and_test_time_bn():
    model = small_bn_cnn()
    x = batches(1)[0]
    with torch.no_grad():
        source_out = model(x)
    torch.testing.assert_close(tta.adapt(model, "alpha_bn", alpha=1.0)(x), source_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tta.adapt(model, "alpha_bn", alpha=0.0)(x), tta.adapt(model, "norm")(x))


def test_alpha_bn_mixes_statistics():
    model = small_bn_cnn()
    x = batches(1)[0]
    alpha = 0.3

    def mixed(bn, z):
        mean, var = _batch_stats(bn, z)
        return alpha * bn.running_mean + (1 - alpha) * mean, alpha * bn.running_var + (1 - alpha) * var

    with torch.no_grad():
        expected = _manual_forward(model, x, mixed)
    torch.testing.assert_close(tta.adapt(model, "alpha_bn", alpha=alpha)(x), expected, rtol=1e-5, atol=1e-5)


def test_norm_momentum_keeps_ema_of_target_statistics():
    model = small_bn_cnn()
    xs = batches(3)
    m = 0.25
    adapted = tta.adapt(model, "norm", momentum=m)
    ema = {}

    def ema_stats(bn, z):
        mean, var = _batch_stats(bn, z)
        old_mean, old_var = ema.get(id(bn), (bn.running_mean, bn.running_var))
        new = ((1 - m) * old_mean + m * mean, (1 - m) * old_var + m * var)
        ema[id(bn)] = new
        return new

    for x in xs:
        with torch.no_grad():
            expected = _manual_forward(model, x, ema_stats)
        torch.testing.assert_close(adapted(x), expected, rtol=1e-5, atol=1e-5)
    # momentum 1 is plain test-time BN
    torch.testing.assert_close(tta.adapt(model, "norm", momentum=1.0)(xs[0]), tta.adapt(model, "norm")(xs[0]))


def test_unmix_tns_step_equals_hand_computed_example():
    """A 2-component, 2-channel layer on a batch of 2 with 2 positions, computed by hand."""
    bn = nn.BatchNorm2d(2, momentum=0.1)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.0, 0.0]))
        bn.running_var.copy_(torch.tensor([1.0, 1.0]))
        bn.weight.copy_(torch.tensor([1.0, 2.0]))
        bn.bias.copy_(torch.tensor([0.0, 1.0]))
    layer = UnMixTNS(source_state(bn), k=2, tau=1.0, b_max=2)
    M = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    V = torch.tensor([[0.5, 0.5], [2.0, 2.0]])
    with torch.no_grad():
        layer.component_means.copy_(M[None])
        layer.component_vars.copy_(V[None])
    # sample 0: channel values (1, 3) and (0, 0) -> means (2, 0), vars (1, 0)
    # sample 1: channel values (0, 0) and (2, 2) -> means (0, 2), vars (0, 0)
    z = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]], [[[0.0, 0.0]], [[2.0, 2.0]]]])
    out = layer(z)
    # cosines: sample 0 ~ (1, 0) -> cos (1, 0); sample 1 ~ (0, 1) -> cos (0, 1)
    e = torch.exp(torch.tensor(1.0))
    p_hi, p_lo = e / (e + 1), 1 / (e + 1)
    P = torch.tensor([[p_hi, p_lo], [p_lo, p_hi]])
    inst_mean = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    inst_var = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    mix_means = (1 - P)[:, :, None] * M[None] + P[:, :, None] * inst_mean[:, None]
    mix_vars = (1 - P)[:, :, None] * V[None] + P[:, :, None] * inst_var[:, None]
    mean = mix_means.mean(1)
    var = mix_vars.mean(1) + mix_means.square().mean(1) - mean.square()
    expected = (z - mean[..., None, None]) / torch.sqrt(var[..., None, None] + 1e-5)
    expected = expected * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    torch.testing.assert_close(out, expected)
    # hand-checked value of one entry: sample 0, channel 0, position 0
    m00 = (((1 - p_hi) * 1 + p_hi * 2) + ((1 - p_lo) * 0 + p_lo * 2)) / 2
    assert abs(mean[0, 0].item() - m00) < 1e-6
    # update: lambda = 1 - 0.9^(B / B_max) = 0.1, averaged over the batch (divided by B)
    layer.commit()
    lam = 0.1
    expected_M = M + lam * (P[:, :, None] * (inst_mean[:, None] - M[None])).mean(0)
    expected_V = V + lam * (P[:, :, None] * (inst_var[:, None] - V[None])).mean(0)
    torch.testing.assert_close(layer.component_means[0], expected_M)
    torch.testing.assert_close(layer.component_vars[0], expected_V)


def test_unmix_tns_initialisation_and_k1_is_instance_norm():
    bn = nn.BatchNorm2d(64)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    torch.manual_seed(0)
    layer = UnMixTNS(source_state(bn), k=512, alpha_init=0.5)
    means, variances = layer.component_means[0], layer.component_vars[0]
    torch.testing.assert_close(variances, 0.5 * bn.running_var.expand(512, -1))
    # the uniform mixture keeps the source mean and total variance (in expectation)
    torch.testing.assert_close(means.mean(0), bn.running_mean, atol=0.15, rtol=0)
    total = variances.mean(0) + means.var(0, unbiased=False)
    torch.testing.assert_close(total, bn.running_var, atol=0.0, rtol=0.2)

    single = UnMixTNS(source_state(bn), k=1)
    z = torch.randn(3, 64, 4, 4)
    expected = F.instance_norm(z, weight=bn.weight, bias=bn.bias, eps=bn.eps)
    torch.testing.assert_close(single(z), expected, rtol=1e-4, atol=1e-4)


def test_unmix_tns_momentum_rule():
    bn = nn.BatchNorm2d(4, momentum=0.1)
    layer = UnMixTNS(source_state(bn), k=2, b_max=64)
    assert layer.update_rate(64) == pytest.approx(0.1)
    assert layer.update_rate(16) == pytest.approx(0.0260, abs=1e-4)
    assert layer.update_rate(1) == pytest.approx(0.00164, abs=1e-5)
    assert UnMixTNS(source_state(bn), k=2, b_max=16).update_rate(1) == pytest.approx(0.00656, abs=1e-5)


def test_unmix_tns_batch_norm_1d_uses_source_statistics():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(3, 5)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(tta.adapt(model, "unmix_tns")(x), expected)


def test_unmix_tns_gradients_flow_through_instance_statistics():
    model = small_bn_cnn()
    adapted = tta.adapt(model, "unmix_tns")
    x = batches(1)[0].requires_grad_(True)
    adapted.method.step = lambda m, inp: m(inp)  # plain forward with autograd
    adapted(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
