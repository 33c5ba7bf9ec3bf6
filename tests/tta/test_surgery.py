"""Layer surgery on timm, torchvision and hand-made models."""

import pytest
import timm
import torch
import torchvision
from torch import nn

import tta
from tta.layers import AdaptiveNorm, NormAct
from tta.surgery import find_norm_layers, replace_modules


def _randomize_stats(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, module in find_norm_layers(model):
            n = module.running_mean.numel()
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return model.eval()


@pytest.mark.parametrize(
    "build",
    [
        lambda: timm.create_model("resnet18", pretrained=False, num_classes=10),
        lambda: torchvision.models.resnet18(weights=None, num_classes=10),
        lambda: torchvision.models.resnet18(weights=None, num_classes=10, norm_layer=torchvision.ops.FrozenBatchNorm2d),
        lambda: timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10),
    ],
    ids=["timm_resnet18", "torchvision_resnet18", "torchvision_frozen_bn", "timm_bn_act"],
)
@pytest.mark.parametrize("method", ["norm", "alpha_bn", "unmix_tns"])
def test_every_batch_norm_is_replaced_in_library_models(build, method):
    model = _randomize_stats(build())
    n_norm = len(find_norm_layers(model))
    assert n_norm > 0
    adapted = tta.adapt(model, method)
    assert not find_norm_layers(adapted.model)
    assert len(adapted.adaptive_layers()) == n_norm
    out = adapted(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_alpha_one_reproduces_library_models_exactly():
    for model in [
        timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10),
        torchvision.models.resnet18(weights=None, num_classes=10, norm_layer=torchvision.ops.FrozenBatchNorm2d),
    ]:
        model = _randomize_stats(model)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(tta.adapt(model, "alpha_bn", alpha=1.0)(x), expected, rtol=1e-4, atol=1e-4)


def test_fused_bn_act_keeps_its_activation():
    from timm.layers import BatchNormAct2d

    layer = BatchNormAct2d(4, act_layer=nn.ReLU)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), layer).eval()
    adapted = tta.adapt(model, "norm")
    assert isinstance(adapted.model[1], NormAct)
    assert isinstance(adapted.model[1].act, nn.ReLU)
    assert (adapted(torch.randn(2, 3, 6, 6)) >= 0).all()


@pytest.mark.parametrize(
    "norm,shape",
    [(nn.BatchNorm1d(4), (5, 4)), (nn.BatchNorm1d(4), (5, 4, 7)), (nn.BatchNorm3d(4), (2, 4, 3, 3, 3)), (nn.SyncBatchNorm(4), (2, 4, 3, 3))],
    ids=["bn1d_2d_input", "bn1d_3d_input", "bn3d", "sync_bn"],
)
def test_other_batch_norm_flavours(norm, shape):
    model = nn.Sequential(norm).eval()
    root = nn.Sequential(nn.Identity(), model)
    for method in ["norm", "alpha_bn"]:
        adapted = tta.adapt(root, method, input_ndim=None)
        assert isinstance(adapted.model[1][0], AdaptiveNorm)
        x = torch.randn(*shape)
        expected = nn.functional.batch_norm(x, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
        out = adapted(x)
        if method == "norm":
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_replace_modules_skips_children_of_replaced_modules_and_the_root():
    model = nn.Sequential(nn.Sequential(nn.ReLU(), nn.ReLU()), nn.ReLU())
    names = replace_modules(model, lambda name, m: isinstance(m, nn.Sequential) or isinstance(m, nn.ReLU), lambda n, m: nn.Identity())
    assert names == ["0", "1"]
    assert isinstance(model[0], nn.Identity) and isinstance(model[1], nn.Identity)
