"""AdaB²N (docs/METHODS.md §6) against hand-computed statistics, the spec's momentum values and,
when a local checkout is available, the official layer."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.official import checkout_root
from continual.convert import (
    adab2n_layers,
    convert_norm,
    convert_to_adab2n,
    end_task,
    regularization_loss,
    set_task_context,
)
from continual.layers import AdaB2N, TaskBatchContext, eta_sequence


def _crafted_batch() -> torch.Tensor:
    """3 samples, 2 channels, 1x2 positions; samples 0, 1 are task 0, sample 2 is task 1."""
    return torch.tensor(
        [
            [[[1.0, 3.0]], [[0.0, 2.0]]],
            [[[2.0, 2.0]], [[4.0, 0.0]]],
            [[[6.0, 10.0]], [[-2.0, 2.0]]],
        ]
    )


def _layer_after_one_task(log_prior: list[float], kappa: float = 1.0) -> AdaB2N:
    layer = AdaB2N(2, num_tasks=len(log_prior), kappa=kappa, affine=False)
    with torch.no_grad():
        layer.task_weight.copy_(torch.tensor(log_prior))
    layer.end_task()
    return layer


def test_two_task_batch_matches_hand_computed_weighted_statistics() -> None:
    # Prior a = exp(w) = [1, 2]; counts n = [2, 1] -> posterior a + n = [3, 3] -> pi = [1/2, 1/2];
    # sample weights omega = pi_t / n_t = [1/4, 1/4, 1/2].
    layer = _layer_after_one_task([0.0, math.log(2.0)])
    x = _crafted_batch()
    layer.set_task_context(TaskBatchContext.from_sample_tasks(torch.tensor([0, 0, 1]), 2))
    out = layer(x)

    omega = [0.25, 0.25, 0.5]
    # Per-sample spatial means: channel 0 -> [2, 2, 8], channel 1 -> [1, 2, 0].
    mean = [0.25 * 2 + 0.25 * 2 + 0.5 * 8, 0.25 * 1 + 0.25 * 2 + 0.5 * 0]  # [5.0, 0.75]
    # Per-sample mean squared deviation from the *weighted* mean, then weighted.
    dev0 = [((1 - 5) ** 2 + (3 - 5) ** 2) / 2, ((2 - 5) ** 2 + (2 - 5) ** 2) / 2, ((6 - 5) ** 2 + (10 - 5) ** 2) / 2]
    dev1 = [
        ((0 - 0.75) ** 2 + (2 - 0.75) ** 2) / 2,
        ((4 - 0.75) ** 2 + (0 - 0.75) ** 2) / 2,
        ((-2 - 0.75) ** 2 + (2 - 0.75) ** 2) / 2,
    ]
    var = [sum(w * d for w, d in zip(omega, dev0)), sum(w * d for w, d in zip(omega, dev1))]
    expected = (x - torch.tensor(mean)[None, :, None, None]) / torch.sqrt(
        torch.tensor(var)[None, :, None, None] + layer.eps
    )
    torch.testing.assert_close(out, expected)
    # Running statistics: EMA with eta = momentum (kappa = 1) toward the *weighted, biased* stats.
    torch.testing.assert_close(layer.running_mean, 0.9 * torch.zeros(2) + 0.1 * torch.tensor(mean))
    torch.testing.assert_close(layer.running_var, 0.9 * torch.ones(2) + 0.1 * torch.tensor(var))
    # Regularizer: against the updated running stats, mean over channels.
    reg = sum((m - rm) ** 2 for m, rm in zip(mean, layer.running_mean.tolist())) / 2 + sum(
        (v - rv) ** 2 for v, rv in zip(var, layer.running_var.tolist())
    ) / 2
    assert layer.regularization is not None
    assert layer.regularization.item() == pytest.approx(reg, rel=1e-6)
    # ... which equals (1 - eta)^2 times the squared gap to the old running stats.
    old_gap = (sum(m**2 for m in mean) + sum((v - 1) ** 2 for v in var)) / 2
    assert layer.regularization.item() == pytest.approx(0.81 * old_gap, rel=1e-6)


def test_absent_task_weights_do_not_sum_to_one() -> None:
    # Three started tasks, no sample of task 1: omega sums to pi_0 + pi_2 = 1 - pi_1 < 1.
    layer = _layer_after_one_task([0.0, 0.0, 0.0])
    layer.end_task()
    x = _crafted_batch()
    context = TaskBatchContext.from_sample_tasks(torch.tensor([0, 0, 2]), 3)
    assert context.counts.tolist() == [2, 0, 1]
    layer.set_task_context(context)
    layer(x)
    # a = [1 + 2, 1 + 0, 1 + 1] = [3, 1, 2]; pi = [1/2, 1/6, 1/3]; omega = [1/4, 1/4, 1/3].
    omega = [0.25, 0.25, 1.0 / 3.0]
    assert sum(omega) == pytest.approx(5.0 / 6.0)
    expected_mean = torch.tensor([0.25 * 2 + 0.25 * 2 + 8 / 3, 0.25 * 1 + 0.25 * 2 + 0.0])
    torch.testing.assert_close(layer.running_mean, 0.1 * expected_mean)


def test_first_task_uses_plain_biased_batch_statistics() -> None:
    layer = AdaB2N(2, num_tasks=3, affine=False)
    x = _crafted_batch()
    # A context in the first task is ignored (no earlier task to balance against).
    layer.set_task_context(TaskBatchContext.from_sample_tasks(torch.zeros(3, dtype=torch.long), 1))
    out = layer(x)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(out, (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + 1e-5))
    # Unlike nn.BatchNorm2d, the biased variance enters the running variance (§6 step 4).
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * var)


@pytest.mark.parametrize(
    ("kappa", "first_three", "limit"),
    [
        (0.1, [0.794, 0.445, 0.310], 0.0105),
        (0.4, [0.398, 0.293, 0.234], 0.0413),
        (0.7, [0.200, 0.177, 0.160], 0.0711),
    ],
)
def test_modified_momentum_matches_spec_values(kappa: float, first_three: list[float], limit: float) -> None:
    values = eta_sequence(0.1, kappa, 20000)
    assert values[:3] == pytest.approx(first_three, abs=6e-4)
    assert values[-1] == pytest.approx(1 - 0.9**kappa, rel=1e-2)
    assert values[-1] == pytest.approx(limit, abs=6e-4)
    # Strictly decreasing toward the limit.
    assert all(a > b for a, b in zip(values[:50], values[1:51]))


def test_modified_momentum_endpoints() -> None:
    assert eta_sequence(0.1, 1.0, 5) == [0.1] * 5
    # kappa = 0: cumulative average counted from the wrapped BN's batch counter.
    assert eta_sequence(0.1, 0.0, 3) == pytest.approx([1.0, 0.5, 1 / 3])
    assert eta_sequence(0.1, 0.0, 2, start_batches=9) == pytest.approx([0.1, 1 / 11])


def test_layer_applies_the_momentum_sequence_to_running_stats() -> None:
    layer = AdaB2N(2, num_tasks=2, kappa=0.4, affine=False)
    expected_mean = torch.zeros(2)
    for step, eta in enumerate(eta_sequence(0.1, 0.4, 4)):
        x = torch.randn(4, 2, 3, 3) + step
        batch_mean = x.mean(dim=(0, 2, 3))
        layer(x)
        assert layer.last_eta == pytest.approx(eta)
        expected_mean = (1 - eta) * expected_mean + eta * batch_mean
        torch.testing.assert_close(layer.running_mean, expected_mean)
    # The sequence survives a state_dict round trip (saved as extra state).
    clone = AdaB2N(2, num_tasks=2, kappa=0.4, affine=False)
    clone.load_state_dict(layer.state_dict())
    assert clone.last_eta == layer.last_eta
    assert clone.next_eta() == pytest.approx(layer.next_eta())


def test_finished_tasks_round_trip_through_state_dict() -> None:
    layer = AdaB2N(2, num_tasks=4)
    layer.end_task()
    layer.end_task()
    clone = AdaB2N(2, num_tasks=4)
    assert clone.num_started_tasks == 1
    clone.load_state_dict(layer.state_dict())
    assert clone.num_started_tasks == 3 and int(clone.finished_tasks) == 2


def test_context_is_used_by_one_forward_only() -> None:
    layer = _layer_after_one_task([0.0, 0.0])
    x = _crafted_batch()
    layer.set_task_context(TaskBatchContext.from_sample_tasks(torch.tensor([0, 0, 1]), 2))
    layer(x)
    assert layer.context is None
    # A second forward of a different batch size uses plain statistics instead of failing.
    layer(x[:2])


def test_gradient_reaches_task_prior_only_with_task_context() -> None:
    layer = _layer_after_one_task([0.0, 0.0])
    x = _crafted_batch().requires_grad_()
    layer.set_task_context(TaskBatchContext.from_sample_tasks(torch.tensor([0, 0, 1]), 2))
    (layer(x) * torch.arange(12.0).view(3, 2, 1, 2)).sum().backward()
    assert layer.task_weight.grad is not None and layer.task_weight.grad.abs().sum() > 0
    layer.task_weight.grad = None
    layer.set_task_context(None)
    (layer(x) * torch.arange(12.0).view(3, 2, 1, 2)).sum().backward()
    assert layer.task_weight.grad is None


def test_eval_uses_running_statistics_and_affine() -> None:
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
        bn.weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
        bn.num_batches_tracked.fill_(7)
    layer = AdaB2N.from_batch_norm(bn.eval(), num_tasks=4, kappa=0.0)
    assert not layer.training and int(layer.num_batches_tracked) == 7
    x = torch.randn(5, 3, 4, 4)
    torch.testing.assert_close(layer(x), bn(x))


def test_context_validation() -> None:
    with pytest.raises(ValueError, match="task indices"):
        TaskBatchContext.from_sample_tasks(torch.tensor([0, 2]), 2)
    layer = _layer_after_one_task([0.0, 0.0])
    layer.set_task_context(TaskBatchContext.from_sample_tasks(torch.tensor([0, 1]), 2))
    with pytest.raises(ValueError, match="does not match"):
        layer(_crafted_batch())
    full = AdaB2N(2, num_tasks=1)
    full.end_task()
    full.set_task_context(TaskBatchContext.from_sample_tasks(torch.tensor([0, 0, 1]), 2))
    with pytest.raises(RuntimeError, match="built for 1 tasks"):
        full(_crafted_batch())


def _small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )


def test_converter_replaces_every_bn_and_model_helpers_work() -> None:
    model = _small_cnn()
    replaced = convert_to_adab2n(model, num_tasks=3, kappa=0.7)
    assert replaced == ["1", "3.1"]
    assert len(adab2n_layers(model)) == 2
    assert convert_to_adab2n(model, num_tasks=3) == []  # idempotent
    end_task(model)
    assert all(int(layer.finished_tasks) == 1 for layer in adab2n_layers(model))
    set_task_context(model, TaskBatchContext.from_sample_tasks(torch.tensor([0, 1, 1, 0]), 2))
    model(torch.randn(4, 3, 8, 8))
    loss = regularization_loss(model)
    assert loss.requires_grad and loss.item() > 0
    with pytest.raises(ValueError, match="has none"):
        convert_norm(nn.Linear(2, 2), "adab2n", num_tasks=2)
    with pytest.raises(ValueError, match="unknown norm"):
        convert_norm(_small_cnn(), "layernorm")  # type: ignore[arg-type]


def _official_layer_class():
    """The official AdaB2N class from a local checkout (never vendored)."""
    path = checkout_root("ADAB2N_OFFICIAL_SRC") / "models" / "utils" / "adab2n.py"
    spec = importlib.util.spec_from_file_location("official_adab2n", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.AdaB2N


@pytest.mark.official
@pytest.mark.parametrize("kappa", [0.0, 0.4, 1.0])
def test_matches_official_layer_over_a_task_sequence(kappa: float) -> None:
    official_cls = _official_layer_class()
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    official = official_cls(bn, num_tasks=3, num_classes_per_task=2, kappa=kappa)
    ours = AdaB2N.from_batch_norm(bn, num_tasks=3, kappa=kappa)
    with torch.no_grad():
        init = torch.tensor([0.3, -0.2, 0.1])
        official.task_weight.copy_(init)
        ours.task_weight.copy_(init)
    for task in range(3):
        for _ in range(3):
            labels = torch.randint(0, 2 * (task + 1), (6,))
            x = torch.randn(6, 3, 4, 4) * 2 + task
            task_ids = labels // 2
            uniq, inverse, counts = torch.unique(task_ids, return_inverse=True, return_counts=True)
            extended = labels.new_zeros(task + 1)
            extended[uniq] = counts
            official.set_counts(uniq[inverse], counts[inverse], extended)
            ours.set_task_context(TaskBatchContext.from_sample_tasks(task_ids, task + 1))
            out_official, out_ours = official(x), ours(x)
            torch.testing.assert_close(out_ours, out_official, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours.regularization, official.loss, rtol=1e-5, atol=1e-6)
            grads = torch.autograd.grad(out_official.square().sum(), official.task_weight, allow_unused=True)
            ours_grads = torch.autograd.grad(out_ours.square().sum(), ours.task_weight, allow_unused=True)
            if grads[0] is None:
                assert ours_grads[0] is None or ours_grads[0].abs().max() == 0
            else:
                torch.testing.assert_close(ours_grads[0], grads[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours.running_mean, official.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.running_var, official.running_var, rtol=1e-5, atol=1e-6)
        official.end_task()
        ours.end_task()
    official.eval()
    ours.eval()
    x = torch.randn(4, 3, 4, 4)
    torch.testing.assert_close(ours(x), official(x))
    assert F.mse_loss(ours.running_mean, official.running_mean) < 1e-10
