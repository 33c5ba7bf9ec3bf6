"""``unmix_tns_mass`` (tta/layers/unmix_tns_mass.py): per-component rates on hand-computed
cases, and agreement with the faithful ``unmix_tns`` wherever the variant does not differ."""

from __future__ import annotations

import math

import pytest
import torch
import tta
from tta.layers.base import SourceNormState
from tta.layers.unmix_tns import UnMixTNS
from tta.layers.unmix_tns_mass import UnMixTNSMass, mass_rates
from tests.conftest import batches, small_bn_cnn


def _source(channels: int = 2, momentum: float = 0.1) -> SourceNormState:
    return SourceNormState(
        num_features=channels, eps=1e-5, momentum=momentum, weight=None, bias=None,
        running_mean=torch.zeros(channels), running_var=torch.ones(channels),
        source_type="torch.nn.BatchNorm2d", input_kind="2d",
    )


def test_mass_rates_by_hand() -> None:
    mass = torch.tensor([4.0, 0.0, 64.0, 1e-9])
    rate, per_mass = mass_rates(mass, k=16, momentum=0.1, b_max=64)
    # K w / B_max = 1 at the even share w = 64 / 16: exactly the BN momentum
    expected = [0.1, 0.0, 1 - 0.9**16, -math.expm1(16 * 1e-9 * math.log(0.9) / 64)]
    assert rate.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-12)
    limit = -16 * math.log(0.9) / 64
    assert per_mass.tolist() == pytest.approx([0.1 / 4, limit, (1 - 0.9**16) / 64, limit], rel=1e-5)


def test_component_update_with_hard_assignments_by_hand() -> None:
    # K = 2 components pointing along the two channels; tau tiny makes p one-hot:
    # samples 0, 1 -> component 0, sample 2 -> component 1
    layer = UnMixTNSMass(_source(), k=2, tau=1e-3, b_max=4)
    means = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    variances = torch.tensor([[[0.5, 0.5], [2.0, 2.0]]])
    with torch.no_grad():
        layer.component_means.copy_(means)
        layer.component_vars.copy_(variances)
    # (N, C, 1, 2): instance means (2, 0.2), (4, 0.2), (0.1, 3); variances 1, 0, 0 / 0.25 ...
    z = torch.tensor([
        [[[1.0, 3.0]], [[0.2, 0.2]]],
        [[[4.0, 4.0]], [[0.0, 0.4]]],
        [[[0.1, 0.1]], [[2.0, 4.0]]],
    ])
    layer(z)
    layer.commit()
    inst_mean = torch.tensor([[2.0, 0.2], [4.0, 0.2], [0.1, 3.0]])
    inst_var = torch.tensor([[1.0, 0.0], [0.0, 0.04], [0.0, 1.0]])
    rate0 = 1 - 0.9 ** (2 * 2 / 4)  # K w_0 / B_max = 2 * 2 / 4
    rate1 = 1 - 0.9 ** (2 * 1 / 4)
    expected_means = torch.stack([
        (1 - rate0) * means[0, 0] + rate0 * inst_mean[:2].mean(0),
        (1 - rate1) * means[0, 1] + rate1 * inst_mean[2],
    ])
    expected_vars = torch.stack([
        (1 - rate0) * variances[0, 0] + rate0 * inst_var[:2].mean(0),
        (1 - rate1) * variances[0, 1] + rate1 * inst_var[2],
    ])
    torch.testing.assert_close(layer.component_means[0], expected_means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.component_vars[0], expected_vars, rtol=1e-5, atol=1e-6)


def test_even_share_moves_k_times_faster_than_the_official_update() -> None:
    # every sample split evenly over K components (identical component means): the official
    # rate is lambda / K per component, the variant's lambda (B = B_max)
    k, b = 4, 8
    official, variant = (cls(_source(), k=k, b_max=b) for cls in (UnMixTNS, UnMixTNSMass))
    for layer in (official, variant):
        with torch.no_grad():
            layer.component_means.fill_(1.0)
            layer.component_vars.fill_(1.0)
    z = torch.full((b, 2, 2, 2), 3.0)
    for layer in (official, variant):
        layer(z)
        layer.commit()
    step_official = official.component_means - 1.0
    step_variant = variant.component_means - 1.0
    torch.testing.assert_close(step_official, torch.full_like(step_official, 0.1 / k * 2.0))
    torch.testing.assert_close(step_variant, torch.full_like(step_variant, 0.1 * 2.0))


def test_one_component_is_the_official_update() -> None:
    model = small_bn_cnn()
    official = tta.adapt(model, "unmix_tns", k=1)
    variant = tta.adapt(model, "unmix_tns_mass", k=1)
    for x in batches(4, batch_size=8):
        torch.testing.assert_close(variant(x), official(x), rtol=1e-5, atol=1e-6)


def test_same_normalization_as_unmix_tns_from_the_same_state() -> None:
    model = small_bn_cnn()
    xs = batches(3, batch_size=8)
    official = tta.adapt(model, "unmix_tns", k=4, seed=3)
    variant = tta.adapt(model, "unmix_tns_mass", k=4, seed=3)
    torch.testing.assert_close(variant(xs[0]), official(xs[0]), rtol=0, atol=0)  # same initial draw
    variant(xs[1])
    with torch.no_grad():  # the same component state in both, then the same prediction
        for mine, theirs in zip(variant.adaptive_layers(), official.adaptive_layers()):
            theirs.component_means.copy_(mine.component_means)
            theirs.component_vars.copy_(mine.component_vars)
    with official.no_adapt(), variant.no_adapt():
        torch.testing.assert_close(variant(xs[2]), official(xs[2]), rtol=0, atol=0)
    variant.reset()
    official.reset()
    variant(xs[0])
    official(xs[0])
    moved_variant = [l.component_means for l in variant.adaptive_layers()]
    moved_official = [l.component_means for l in official.adaptive_layers()]
    assert any(not torch.equal(a, b) for a, b in zip(moved_variant, moved_official))


def test_streams_and_state_round_trip() -> None:
    model = small_bn_cnn()
    xs = batches(2, batch_size=8)
    single = [tta.adapt(model, "unmix_tns_mass", k=4) for _ in range(2)]
    multi = tta.adapt(model, "unmix_tns_mass", k=4, num_streams=2)
    for x, y in zip(xs, reversed(xs)):
        out = multi(torch.cat([x, y]))
        torch.testing.assert_close(out, torch.cat([single[0](x), single[1](y)]), rtol=1e-5, atol=1e-5)
    copy = tta.adapt(model, "unmix_tns_mass", k=4)
    copy.load_state_dict(single[0].state_dict())
    with copy.no_adapt(), single[0].no_adapt():
        assert torch.equal(copy(xs[0]), single[0](xs[0]))
