"""Robust BN (RoTTA): the moving-average update on hand-computed values, the frozen mode,
and its use as a statistics method under an objective."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tta
from tests.conftest import batches, small_bn_cnn
from tta.layers.robust_bn import RobustBatchNorm
from tta.surgery import source_state


def _layer(alpha: float = 0.05, streams: int = 1) -> RobustBatchNorm:
    bn = nn.BatchNorm2d(1).eval()
    with torch.no_grad():
        bn.running_mean.fill_(1.0)
        bn.running_var.fill_(4.0)
    return RobustBatchNorm(source_state(bn), alpha=alpha, num_streams=streams)


def test_ema_update_hand_computed() -> None:
    layer = _layer(alpha=0.25)
    x = torch.tensor([[[[1.0, 3.0]]], [[[5.0, 7.0]]]])  # batch mean 4, biased variance 5
    out = layer(x)
    layer.commit()
    # mu = 0.75 * 1 + 0.25 * 4 = 1.75; var = 0.75 * 4 + 0.25 * 5 = 4.25
    torch.testing.assert_close(layer.ema_mean, torch.tensor([[1.75]]))
    torch.testing.assert_close(layer.ema_var, torch.tensor([[4.25]]))
    torch.testing.assert_close(out, (x - 1.75) / torch.sqrt(torch.tensor(4.25 + layer.eps)))
    layer(x)
    layer.commit()  # second step from the updated average: 0.75 * 1.75 + 0.25 * 4
    torch.testing.assert_close(layer.ema_mean, torch.tensor([[2.3125]]))


def test_frozen_normalizes_with_the_stored_average_and_keeps_it() -> None:
    layer = _layer(alpha=0.25)
    layer.frozen = True
    x = torch.tensor([[[[1.0, 3.0]]], [[[5.0, 7.0]]]])
    torch.testing.assert_close(layer(x), (x - 1.0) / torch.sqrt(torch.tensor(4.0 + layer.eps)))
    layer.commit()
    torch.testing.assert_close(layer.ema_mean, torch.tensor([[1.0]]))


def test_gradient_flows_through_the_batch_statistics() -> None:
    layer = _layer(alpha=0.5)
    x = torch.randn(4, 1, 3, 3, requires_grad=True)
    layer(x).square().sum().backward()
    # with alpha > 0 the normalization depends on x through the batch mean and variance
    reference = x.detach().clone().requires_grad_(True)
    mean = 0.5 * 1.0 + 0.5 * reference.mean()
    var = 0.5 * 4.0 + 0.5 * reference.var(unbiased=False)
    ((reference - mean) / torch.sqrt(var + layer.eps)).square().sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)


def test_rbn_equals_norm_with_the_same_momentum_and_composes() -> None:
    model = small_bn_cnn()
    rbn, norm = tta.adapt(model, "rbn", alpha=0.1), tta.adapt(model, "norm", momentum=0.1)
    for x in batches(4):
        torch.testing.assert_close(rbn(x), norm(x))
    composed = tta.adapt(model, "rbn+tent")
    assert composed.method_name == "rbn+tent"
    outs = [composed(x) for x in batches(3)]
    assert all(torch.isfinite(o).all() for o in outs)
    with pytest.raises(ValueError, match="alpha"):
        tta.adapt(model, "rbn", alpha=1.5)


def test_streams_are_independent() -> None:
    joint, singles = _layer(streams=2), [_layer(), _layer()]
    xs = batches(2, batch_size=4, shape=(1, 3, 3))
    out = joint(torch.cat(xs))
    joint.commit()
    outs = []
    for layer, x in zip(singles, xs):
        outs.append(layer(x))
        layer.commit()
    torch.testing.assert_close(out, torch.cat(outs))
    torch.testing.assert_close(joint.ema_var, torch.cat([s.ema_var for s in singles]))
