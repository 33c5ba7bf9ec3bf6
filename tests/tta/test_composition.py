"""Statistics methods under objective/output methods through the one Composite mechanism:
timm and torchvision models, single statistics update per step under SAR, determinism."""

import copy

import pytest
import torch
from torch import nn

import tta
from tta.layers import AlphaBatchNorm, TestTimeBatchChannelNorm, TestTimeBatchNorm, UnMixTNS
from tta.layers.bcn import convert_to_bcn_ws
from tta.methods.composite import Composite

STATISTICS_LAYER = {"unmix_tns": UnMixTNS, "alpha_bn": AlphaBatchNorm, "norm": TestTimeBatchNorm, "bcn": TestTimeBatchChannelNorm}


def timm_resnet():
    import timm
    return timm.create_model("resnet18", num_classes=10).eval()


def tv_resnet():
    import torchvision
    return torchvision.models.resnet18(num_classes=10).eval()


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()


def norm_layers(model, kind):
    return [m for m in model.modules() if isinstance(m, kind)]


@pytest.mark.parametrize("build", [timm_resnet, tv_resnet], ids=["timm", "torchvision"])
@pytest.mark.parametrize("spec", ["unmix_tns+tent", "unmix_tns+sar", "alpha_bn+tent", "norm+sar", "unmix_tns+lame"])
def test_compositions_run_on_timm_and_torchvision(build, spec):
    model = build()
    stats, objective = spec.split("+")
    hparams = {"e0": 100.0, "lr": 1e-3} if objective == "sar" else {}
    torch.manual_seed(0)
    adapted = tta.adapt(model, spec, **hparams)
    assert adapted.method_name == spec
    assert isinstance(adapted.method, Composite)
    assert norm_layers(adapted.model, STATISTICS_LAYER[stats])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in adapted.model.modules())
    inner = adapted.method.method
    before = [p.detach().clone() for p in getattr(inner, "params", [])]
    x = torch.randn(4, 3, 32, 32)
    out = adapted(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    if objective in ("tent", "sar"):
        assert any(not torch.equal(b, p) for b, p in zip(before, inner.params))
        # the trainable set is the statistics layers' affine parameters
        owners = {name.rsplit(".", 1)[0] for name in inner.param_names}
        layer_names = {n for n, m in adapted.model.named_modules() if isinstance(m, STATISTICS_LAYER[stats])}
        assert owners <= layer_names
    else:  # output method: the model (statistics layers aside) does not train
        assert all(p.grad is None for p in adapted.model.parameters())


def test_bcn_composes_with_sar():
    model = convert_to_bcn_ws(small_cnn(), num_groups=4, estimated_stats=True)
    adapted = tta.adapt(model.eval(), "bcn+sar", e0=100.0, lr=1e-2)
    assert norm_layers(adapted.model, TestTimeBatchChannelNorm)
    assert torch.isfinite(adapted(torch.randn(2, 3, 8, 8))).all()


def test_hyperparameters_route_to_their_part():
    adapted = tta.adapt(small_cnn(), "unmix_tns+sar", k=4, tau=0.1, rho=0.1, e_m=0.1)
    assert (adapted.method.statistics.hparams.k, adapted.method.statistics.hparams.tau) == (4, 0.1)
    assert (adapted.method.method.hparams.rho, adapted.method.method.hparams.e_m) == (0.1, 0.1)
    adapted = tta.adapt(small_cnn(), "alpha_bn+tent", alpha=0.7, lr=5e-4)
    assert adapted.method.statistics.hparams.alpha == 0.7
    assert adapted.method.method.optimizer.param_groups[0]["lr"] == 5e-4
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        tta.adapt(small_cnn(), "norm+sar", knn=3)


def test_sar_updates_statistics_layers_once_per_step():
    """SAR forwards twice; a stateful statistics layer moves once, from the first forward, so
    its state after one step equals that of the statistics method alone on the same batch."""
    model = small_cnn()
    x = torch.randn(8, 3, 8, 8) * 2
    torch.manual_seed(0)
    with_sar = tta.adapt(model, "unmix_tns+sar", e0=100.0, lr=1e-2)
    torch.manual_seed(0)
    alone = tta.adapt(model, "unmix_tns")
    calls: list[int] = []
    with_sar.model.register_forward_hook(lambda *a: calls.append(1))
    with with_sar.no_adapt():
        with_sar_prediction = with_sar(x)
    calls.clear()
    out = with_sar(x)
    alone(x)
    assert len(calls) == 2
    torch.testing.assert_close(out, with_sar_prediction, rtol=1e-6, atol=1e-6)  # the first forward's
    for a, b in zip(norm_layers(with_sar.model, UnMixTNS), norm_layers(alone.model, UnMixTNS)):
        assert torch.equal(a.component_means, b.component_means)
        assert torch.equal(a.component_vars, b.component_vars)


@pytest.mark.parametrize("spec", ["unmix_tns+sar", "unmix_tns+tent", "alpha_bn+tent", "lame"])
def test_compositions_are_deterministic_with_a_fixed_seed(spec):
    model = small_cnn()
    batches = [torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)) * 2 for i in range(3)]

    def run():
        torch.manual_seed(123)
        adapted = tta.adapt(copy.deepcopy(model), spec)
        return [adapted(b) for b in batches], adapted.state_dict()

    (first, state1), (second, state2) = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for key, value in state1.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, state2[key]), key
