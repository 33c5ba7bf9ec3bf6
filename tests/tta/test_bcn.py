"""BCN and WS layers against their formulas (docs/METHODS.md §7), the converter, and the
test-time ``bcn`` method through ``tta.adapt``."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta
from tta.layers.bcn import (
    BatchChannelNorm2d,
    TestTimeBatchChannelNorm,
    convert_to_bcn_ws,
    convs_followed_by_norm,
    largest_divisor_at_most,
)
from tta.layers.ws import WSConv2d, standardize_weight


# -- formulas written out independently ------------------------------------------------------
def ws_reference(w: torch.Tensor, eps: float, inside: bool) -> torch.Tensor:
    out = torch.empty_like(w)
    for o in range(w.shape[0]):
        filt = w[o].double()
        n = filt.numel()
        mean = filt.sum() / n
        var = ((filt - mean) ** 2).sum() / (n - 1)
        scale = (var + eps).sqrt() if inside else var.sqrt() + eps
        out[o] = ((filt - mean) / scale).to(w.dtype)
    return out


def group_stage_reference(z: torch.Tensor, groups: int, gw: torch.Tensor, gb: torch.Tensor, eps: float) -> torch.Tensor:
    n, c = z.shape[:2]
    zg = z.reshape(n, groups, -1).double()
    mean = zg.mean(-1, keepdim=True)
    var = ((zg - mean) ** 2).mean(-1, keepdim=True)
    out = (zg - mean) / (var + eps).sqrt()
    out = out * gw.double().view(1, groups, 1) + gb.double().view(1, groups, 1)
    return out.reshape(z.shape).float()


def channel_affine(z, mean, var, w, b, eps):
    view = (1, -1, 1, 1)
    return (z - mean.view(view)) / (var.view(view) + eps).sqrt() * w.view(view) + b.view(view)


def randomize(layer: BatchChannelNorm2d) -> BatchChannelNorm2d:
    with torch.no_grad():
        for tensor in (layer.weight, layer.bias, layer.group_weight, layer.group_bias, layer.running_mean):
            tensor.normal_()
        layer.running_var.uniform_(0.5, 2.0)
    return layer


# -- weight standardization ------------------------------------------------------------------
@pytest.mark.parametrize("inside", [True, False])
def test_standardize_weight_matches_formula(inside):
    w = torch.randn(6, 4, 3, 3) * 3 + 1
    torch.testing.assert_close(standardize_weight(w, 1e-5, inside), ws_reference(w, 1e-5, inside), rtol=1e-5, atol=1e-5)


def test_ws_conv_forward_gradient_and_state_dict():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=True)
    ws = WSConv2d.from_conv(conv)
    x = torch.randn(2, 3, 9, 9)
    expected = F.conv2d(x, ws_reference(conv.weight.detach(), 1e-5, True), conv.bias, stride=2, padding=1)
    torch.testing.assert_close(ws(x), expected, rtol=1e-5, atol=1e-5)
    ws(x).sum().backward()
    assert ws.weight.grad is not None and ws.weight.grad.abs().sum() > 0
    # standardized weights are invariant to shifting/scaling a filter: the gradient is
    # orthogonal to the filter's mean direction
    assert ws.weight.grad.flatten(1).sum(1).abs().max() < 1e-4
    assert ws.state_dict().keys() == conv.state_dict().keys()
    assert (ws.stride, ws.padding, ws.groups) == (conv.stride, conv.padding, conv.groups)


def test_ws_single_entry_filter_is_finite():
    conv = WSConv2d(4, 4, 1, groups=4)
    assert torch.isfinite(conv(torch.randn(1, 4, 3, 3))).all()


# -- BatchChannelNorm2d ----------------------------------------------------------------------
def test_bcn_batchnorm_stage_training_and_eval_match_formula():
    layer = randomize(BatchChannelNorm2d(8, num_groups=4, momentum=0.1))
    x = torch.randn(3, 8, 5, 5) * 2 + 0.5
    old_mean, old_var = layer.running_mean.clone(), layer.running_var.clone()
    out = layer.train()(x)
    mean = x.mean((0, 2, 3))
    var = x.var((0, 2, 3), unbiased=False)
    stage = channel_affine(x, mean, var, layer.weight, layer.bias, 1e-5)
    expected = group_stage_reference(stage, 4, layer.group_weight, layer.group_bias, 1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.running_mean, 0.9 * old_mean + 0.1 * mean)
    torch.testing.assert_close(layer.running_var, 0.9 * old_var + 0.1 * x.var((0, 2, 3), unbiased=True))

    out = layer.eval()(x)
    stage = channel_affine(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, 1e-5)
    expected = group_stage_reference(stage, 4, layer.group_weight, layer.group_bias, 1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_bcn_estimated_stats_match_estbn_formula():
    layer = randomize(BatchChannelNorm2d(6, num_groups=3, estimated_stats=True, moving_speed=0.2))
    x = torch.randn(1, 6, 4, 4) * 3 + 1  # a micro-batch of one image
    mu, var = layer.running_mean.clone(), layer.running_var.clone()
    out = layer.train()(x)
    m = x.mean((0, 2, 3))
    v = ((x - mu.view(1, -1, 1, 1)) ** 2).mean((0, 2, 3))  # deviation from the *old* estimate
    new_mu, new_var = 0.8 * mu + 0.2 * m, 0.8 * var + 0.2 * v
    torch.testing.assert_close(layer.running_mean, new_mu)
    torch.testing.assert_close(layer.running_var, new_var)
    stage = channel_affine(x, new_mu, new_var, layer.weight, layer.bias, 1e-5)
    expected = group_stage_reference(stage, 3, layer.group_weight, layer.group_bias, 1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)

    # eval: estimates used, not updated; the moving speed is a settable buffer
    frozen = layer.running_mean.clone()
    layer.eval()(x)
    assert torch.equal(layer.running_mean, frozen)
    layer.moving_speed.fill_(0.0)
    layer.train()(x)
    assert torch.equal(layer.running_mean, frozen)
    assert "moving_speed" in layer.state_dict()


def test_bcn_estimated_stats_two_forwards_one_backward():
    layer = BatchChannelNorm2d(4, num_groups=2, estimated_stats=True).train()
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss = layer(x).square().sum() + layer(x * 2).square().sum()
    loss.backward()  # the in-place buffer update of the second forward must not break the first
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bcn_rejects_bad_group_count():
    with pytest.raises(ValueError, match="divide"):
        BatchChannelNorm2d(6, num_groups=4)
    assert largest_divisor_at_most(48, 32) == 24
    assert largest_divisor_at_most(16, 32) == 16


# -- converter -------------------------------------------------------------------------------
def _timm_resnet():
    import timm
    return timm.create_model("resnet18", num_classes=5)


def _tv_resnet():
    import torchvision
    return torchvision.models.resnet18(num_classes=5)


@pytest.mark.parametrize("build", [_timm_resnet, _tv_resnet])
@pytest.mark.parametrize("estimated", [False, True])
def test_converter_swaps_layers_and_keeps_outputs_finite(build, estimated):
    model = build()
    bn_count = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    conv_count = sum(type(m) is nn.Conv2d for m in model.modules())
    converted = convert_to_bcn_ws(model, num_groups=32, estimated_stats=estimated)
    assert converted is model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, BatchChannelNorm2d) for m in model.modules()) == bn_count
    # every convolution of a ResNet feeds a normalization layer
    assert sum(isinstance(m, WSConv2d) for m in model.modules()) == conv_count
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(out).all()
    model.eval()
    assert torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()


def test_converter_keeps_statistics_and_fused_activation():
    import timm
    from timm.layers import BatchNormAct2d

    bn = BatchNormAct2d(16, act_layer=nn.ReLU)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.weight.normal_()
    model = nn.Sequential(nn.Conv2d(3, 16, 3), bn, nn.Conv2d(16, 4, 1), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))
    convert_to_bcn_ws(model, num_groups=32)
    norm_act = model[1]
    assert isinstance(norm_act, tta.layers.NormAct) and isinstance(norm_act.act, nn.ReLU)
    assert norm_act.norm.num_groups == 16  # 32 does not divide 16 channels
    torch.testing.assert_close(norm_act.norm.running_mean, bn.running_mean)
    torch.testing.assert_close(norm_act.norm.weight, bn.weight)
    assert isinstance(model[0], WSConv2d) and type(model[2]) is nn.Conv2d  # last conv feeds no norm
    assert convs_followed_by_norm(nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.BatchNorm2d(2))) == []
    del timm


def test_converted_model_trains():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )
    convert_to_bcn_ws(model, num_groups=4, estimated_stats=True, moving_speed=0.1)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    losses = []
    for _ in range(8):
        for i in range(0, 16, 2):  # micro-batches of two images
            loss = F.cross_entropy(model(x[i : i + 2]), y[i : i + 2])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            losses.append(F.cross_entropy(model.eval()(x), y).item())
        model.train()
    assert losses[-1] < 0.5 * losses[0], losses


# -- test-time bcn method --------------------------------------------------------------------
def _bcn_model(estimated=True):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )
    convert_to_bcn_ws(model, num_groups=4, estimated_stats=estimated, moving_speed=0.05)
    randomize(model[1])
    return model.eval()


def test_bcn_method_updates_estimates_with_estbn_rule():
    model = _bcn_model()
    adapted = tta.adapt(model, "bcn", moving_speed=0.3)
    layer = adapted.model[1]
    assert isinstance(layer, TestTimeBatchChannelNorm)
    x = torch.randn(4, 3, 6, 6)
    z = model[0](x)  # input of the norm layer (the conv is frozen)
    mu, var = model[1].running_mean, model[1].running_var
    new_mu = 0.7 * mu + 0.3 * z.mean((0, 2, 3))
    new_var = 0.7 * var + 0.3 * ((z - mu.view(1, -1, 1, 1)) ** 2).mean((0, 2, 3))
    out = adapted(x)
    torch.testing.assert_close(layer.estimated_mean[0], new_mu.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.estimated_var[0], new_var.detach(), rtol=1e-5, atol=1e-6)
    # the output normalizes with the updated estimates (EstBN semantics)
    reference = copy.deepcopy(model[1]).eval()
    with torch.no_grad():
        reference.running_mean.copy_(new_mu)
        reference.running_var.copy_(new_var)
        expected = model[5](model[4](model[3](model[2](reference(z)))))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_bcn_method_default_rate_is_the_layers_and_core_semantics_hold():
    model = _bcn_model()
    adapted = tta.adapt(model, "bcn")
    layer = adapted.model[1]
    assert layer.moving_speed == pytest.approx(0.05)
    x = torch.randn(4, 3, 6, 6)
    initial = copy.deepcopy(adapted.state_dict())
    with adapted.no_adapt():
        predicted = adapted(x)
    assert torch.equal(layer.estimated_mean, initial["model.1.estimated_mean"])
    torch.testing.assert_close(adapted(x), predicted)
    assert not torch.equal(layer.estimated_mean, initial["model.1.estimated_mean"])
    after = copy.deepcopy(adapted.state_dict())
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    adapted(bad)
    assert torch.equal(layer.estimated_mean, after["model.1.estimated_mean"])  # NaN batch not kept
    adapted.reset()
    assert torch.equal(layer.estimated_mean, initial["model.1.estimated_mean"])
    restored = tta.adapt(model, "bcn")
    restored.load_state_dict(after)
    adapted.load_state_dict(after)
    assert torch.equal(restored(x), adapted(x))


def test_bcn_method_batchnorm_stage_and_streams():
    model = _bcn_model(estimated=False)
    single = tta.adapt(model, "bcn")
    assert single.model[1].moving_speed == pytest.approx(0.1)  # the BN momentum
    x = torch.randn(6, 3, 5, 5)
    a, b = single(x[:3]), tta.adapt(model, "bcn")(x[3:])
    both = tta.adapt(model, "bcn", num_streams=2)(x)
    torch.testing.assert_close(both, torch.cat([a, b]), rtol=1e-5, atol=1e-6)


def test_bcn_method_needs_bcn_layers_and_composes_with_tent():
    with pytest.raises(ValueError, match="BatchChannelNorm2d"):
        tta.adapt(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), "bcn")
    model = _bcn_model()
    adapted = tta.adapt(model, "bcn+tent")
    names = adapted.method.method.param_names
    assert {"1.weight", "1.bias", "1.group_weight", "1.group_bias"} <= set(names)
    before = adapted.model[1].group_weight.detach().clone()
    adapted(torch.randn(4, 3, 6, 6))
    assert not torch.equal(adapted.model[1].group_weight, before)
