"""gated_bn: the correlation statistic, the gate, the layer's two forwards on hand-computed
values, and the method's switch between test-time BN and the robust averages."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tta
from tests.conftest import label_readout, labelled_batch
from tta.layers.gated_bn import GatedBatchNorm, sample_rate
from tta.methods.gated_bn import gate_from_score, label_correlation, label_counts
from tta.surgery import source_state


def test_label_correlation_hand_computed() -> None:
    uniform = torch.full((1, 4), 0.25)
    # counts 2, 1, 1, 0 (n = 4): P_in = 2 / 12; s2 = 1/4, s3 = 1/16, so s3 - s2^2 = 0 and
    # var = 2 / 12 * (1/4 - 1/16) = 1/32; z = (1/6 - 1/4) / sqrt(1/32)
    z = label_correlation(label_counts(torch.tensor([[0, 0, 1, 2]]), 4), 4, uniform)
    torch.testing.assert_close(z, torch.tensor([(1 / 6 - 1 / 4) / math.sqrt(1 / 32)]))
    # one class, skewed marginal: P_in = 1, s2 = 0.52, s3 = 0.346
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]])
    var = 4 * 2 / 12 * (0.346 - 0.52**2) + 2 / 12 * (0.52 - 0.52**2)
    z = label_correlation(label_counts(torch.tensor([[3, 3, 3, 3]]), 4), 4, skewed)
    torch.testing.assert_close(z, torch.tensor([(1 - 0.52) / math.sqrt(var)]))
    # streams are scored separately; a single sample has no pairs
    z = label_correlation(label_counts(torch.tensor([[0, 1, 2, 3], [1, 1, 1, 1]]), 4), 4, uniform.expand(2, -1))
    assert z[0] < 0 < 3 < z[1]
    torch.testing.assert_close(label_correlation(label_counts(torch.tensor([[2]]), 4), 1, uniform), torch.zeros(1))


def test_gate_is_linear_between_the_thresholds() -> None:
    z = torch.tensor([-0.5, 3.0, 4.5, 6.0, 9.0])
    torch.testing.assert_close(gate_from_score(z, 3.0, 6.0), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


def _layer(span: float) -> GatedBatchNorm:
    bn = nn.BatchNorm2d(1).eval()
    with torch.no_grad():
        bn.running_mean.fill_(1.0)
        bn.running_var.fill_(4.0)
    return GatedBatchNorm(source_state(bn), span=span)


def test_layer_robust_then_gated_forward_hand_computed() -> None:
    span = -2.0 / math.log(0.75)  # a batch of 2 enters with weight 0.25
    assert sample_rate(2, span) == pytest.approx(0.25)
    layer = _layer(span)
    x = torch.tensor([[[[1.0, 3.0]]], [[[5.0, 7.0]]]])  # mean 4, biased variance 5, second moment 21
    out = layer(x)
    # m1 = 0.75 * 1 + 0.25 * 4 = 1.75; m2 = 0.75 * (4 + 1) + 0.25 * 21 = 9; var = 9 - 1.75^2
    var = 9.0 - 1.75**2
    torch.testing.assert_close(out, (x - 1.75) / math.sqrt(var + layer.eps))
    layer.gate = torch.tensor([0.5])
    gated = layer(x)  # lerp(batch, robust, 0.5)
    torch.testing.assert_close(gated, (x - 2.875) / math.sqrt(0.5 * 5.0 + 0.5 * var + layer.eps))
    layer.end_step()
    layer.commit()
    torch.testing.assert_close(layer.moment1, torch.tensor([[1.75]]))
    torch.testing.assert_close(layer.moment2, torch.tensor([[9.0]]))


def test_gated_forward_without_robust_forward_is_an_error() -> None:
    layer = _layer(64.0)
    layer.gate = torch.tensor([0.0])
    with pytest.raises(RuntimeError, match="robust forward"):
        layer(torch.randn(2, 1, 2, 2))


_readout = label_readout
_batch = labelled_batch


def _norm_output(x: torch.Tensor) -> torch.Tensor:
    return tta.adapt(_readout(), method="norm")(x)


def test_balanced_batch_uses_test_statistics_and_sorted_batch_the_robust_ones() -> None:
    balanced = _batch([0, 1, 2, 3] * 4)
    adapted = tta.adapt(_readout(), method="gated_bn")
    out = adapted(balanced)
    assert adapted.method.last_gate.item() == 0.0
    torch.testing.assert_close(out, _norm_output(balanced))  # gate 0 is test-time BN

    sorted_batch = _batch([2] * 16, seed=1)
    robust_only = tta.adapt(_readout(), method="gated_bn", fixed_gate=1.0)
    robust_only(balanced)
    expected = robust_only(sorted_batch)
    out = adapted(sorted_batch)
    assert adapted.method.last_score.item() > 6.0
    assert adapted.method.last_gate.item() == 1.0
    torch.testing.assert_close(out, expected)
    assert out.argmax(1).eq(2).all()  # test-time BN would normalize the class away
    assert not _norm_output(sorted_batch).argmax(1).eq(2).all()


def test_marginal_update_and_small_batches() -> None:
    adapted = tta.adapt(_readout(), method="gated_bn", label_span=16.0)
    adapted(_batch([2] * 16))
    rate = 1 - math.exp(-1.0)
    expected = torch.full((1, 4), 0.25 * (1 - rate))
    expected[0, 2] += rate
    torch.testing.assert_close(adapted.method.marginal, expected)
    adapted(_batch([0, 1, 2, 3] * 2))  # 8 < min_batch_size: robust statistics
    assert adapted.method.last_gate.item() == 1.0


def test_fixed_gate_zero_is_test_time_bn() -> None:
    x = _batch([3] * 16)
    out = tta.adapt(_readout(), method="gated_bn", fixed_gate=0.0)(x)
    torch.testing.assert_close(out, _norm_output(x))


def test_predict_equals_step_and_changes_nothing() -> None:
    adapted = tta.adapt(_readout(), method="gated_bn")
    adapted(_batch([1] * 16))
    before = {k: v.clone() for k, v in adapted.state_dict().items() if isinstance(v, torch.Tensor)}
    x = _batch([0, 1, 2, 3] * 4, seed=3)
    with adapted.no_adapt():
        predicted = adapted(x)
    after = {k: v for k, v in adapted.state_dict().items() if isinstance(v, torch.Tensor)}
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, msg=key)
    torch.testing.assert_close(adapted(x), predicted)


def test_streams_gate_independently() -> None:
    adapted = tta.adapt(_readout(), method="gated_bn", num_streams=2)
    x = torch.cat([_batch([0, 1, 2, 3] * 4), _batch([1] * 16, seed=2)])
    adapted(x)
    torch.testing.assert_close(adapted.method.last_gate, torch.tensor([0.0, 1.0]))


def test_thresholds_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="z_high"):
        tta.adapt(_readout(), method="gated_bn", z_low=5.0, z_high=2.0)
