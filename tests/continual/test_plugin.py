"""NormalizationPlugin with Avalanche's Naive and Replay strategies on online Split digits."""

from __future__ import annotations

import pytest
import torch
from avalanche.training import Naive, Replay
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from continual.convert import adab2n_layers
from continual.layers import AdaB2N
from continual.models import small_cnn
from continual.plugin import ClassTaskMap, NormalizationPlugin
from continual.replay import ReservoirReplayPlugin
from continual.scenarios import online_stream, split_digits

pytestmark = pytest.mark.filterwarnings("ignore:No loggers specified")


@pytest.fixture(scope="module")
def digits():
    return split_digits(n_experiences=5)


class ContextRecorder:
    """Records the task context each training forward of the first AdaB²N layer receives."""

    def __init__(self) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor, int]] = []

    def __call__(self, layer: AdaB2N, inputs: tuple[torch.Tensor]) -> None:
        if layer.training and layer.context is not None:
            context = layer.context
            self.batches.append((context.sample_tasks.clone(), context.counts.clone(), int(layer.finished_tasks)))


def _strategy(kind: str, model: nn.Module, plugins: list, train_mb_size: int = 10):
    common = dict(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), criterion=nn.CrossEntropyLoss(),
        train_mb_size=train_mb_size, train_epochs=1, eval_mb_size=256, evaluator=EvaluationPlugin(loggers=[]),
    )
    if kind == "naive":
        return Naive(plugins=plugins, **common)
    return Replay(mem_size=100, plugins=plugins, **common)


def _install_recorder(strategy, plugin: NormalizationPlugin) -> ContextRecorder:
    strategy.model = plugin.install(strategy.model)
    recorder = ContextRecorder()
    adab2n_layers(strategy.model)[0].register_forward_pre_hook(recorder)
    return recorder


@pytest.mark.parametrize("kind", ["naive", "replay"])
def test_adab2n_plugin_feeds_task_counts_and_ends_tasks(digits, kind: str) -> None:
    model = small_cnn(10, width=8)
    plugin = NormalizationPlugin("adab2n", num_tasks=5, kappa=0.4, lambd=0.5)
    strategy = _strategy(kind, model, [plugin])
    recorder = _install_recorder(strategy, plugin)
    before = [p.detach().clone() for p in strategy.model.parameters()]

    strategy.train(online_stream(digits.train_stream, 20, seed=0))

    layers = adab2n_layers(strategy.model)
    assert len(layers) == 4 and all(isinstance(m, AdaB2N) for m in layers)
    assert all(int(layer.finished_tasks) == 5 for layer in layers)
    assert plugin.current_task == 5
    # Every training batch got its tasks: digits arrive in order, 2 classes per task, so the
    # first-seen task of a sample equals the official label // 2.
    assert len(recorder.batches) > 50
    for tasks, counts, finished in recorder.batches:
        assert counts.numel() == finished + 1 and int(counts.sum()) == tasks.numel()
        assert torch.equal(torch.bincount(tasks, minlength=finished + 1), counts)
    # The task prior is trained (it is in the optimizer) once a second task has started.
    optimized = {id(p) for group in strategy.optimizer.param_groups for p in group["params"]}
    assert all(id(layer.task_weight) in optimized for layer in layers)
    assert any(layer.task_weight.detach().abs().sum() > 0 for layer in layers)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, strategy.model.parameters()))
    if kind == "replay":
        # Replay batches mix tasks, and the regularizer joined the loss on replay steps.
        assert any(int((counts > 0).sum()) > 1 for _, counts, _ in recorder.batches)
        assert plugin.last_regularization is not None and plugin.last_regularization > 0
    else:
        # Naive has no replay-augmented step: no regularizer with regularize_on="replay".
        assert plugin.last_regularization is None
        assert all(int((counts > 0).sum()) == 1 for _, counts, _ in recorder.batches)


def test_online_er_with_reservoir_replay_samples_labels_of_the_batch(digits) -> None:
    model = small_cnn(10, width=8)
    plugin = NormalizationPlugin("adab2n", num_tasks=5, kappa=0.1, lambd=1.0, regularize_on="always")
    replay = ReservoirReplayPlugin(mem_size=60, batch_size=10, batch_size_mem=10)
    strategy = _strategy("naive", model, [plugin, replay])
    recorder = _install_recorder(strategy, plugin)
    seen_labels: list[torch.Tensor] = []
    original = strategy._before_forward

    def spy(**kwargs):
        seen_labels.append(strategy.mb_y.clone())
        original(**kwargs)

    strategy._before_forward = spy
    strategy.train(online_stream(digits.train_stream, 10, seed=1))
    assert len(replay.storage_policy.buffer) == 60
    # From the second step on, batches are 10 new + 10 replayed samples; the recorded tasks are
    # exactly the first-seen tasks (label // 2) of the batch labels.
    assert len(seen_labels) == len(recorder.batches)
    for labels, (tasks, _, _) in zip(seen_labels, recorder.batches):
        assert torch.equal(tasks, labels // 2)
    assert max(labels.numel() for labels in seen_labels) == 20


def test_bn_plugin_keeps_batchnorm(digits) -> None:
    model = small_cnn(10, width=8)
    plugin = NormalizationPlugin("bn")
    strategy = _strategy("replay", model, [plugin])
    strategy.train(online_stream(digits.train_stream, 50, seed=0))
    assert not adab2n_layers(strategy.model)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in strategy.model.modules()) == 4


def test_bcn_ws_plugin_installs_batch_channel_norm(digits) -> None:
    from tta.layers import bcn

    model = small_cnn(10, width=8)
    strategy = _strategy("naive", model, [NormalizationPlugin("bcn_ws")])
    strategy.train(online_stream(digits.train_stream, 50, seed=0))
    assert any(isinstance(m, bcn.BatchChannelNorm2d) for m in strategy.model.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in strategy.model.modules())
    # Avalanche's first make_optimizer (after the plugin's install) registered the new layers.
    optimized = {id(p) for group in strategy.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in strategy.model.parameters())


def test_boundary_agnostic_online_stream_is_rejected(digits) -> None:
    from avalanche.benchmarks.scenarios.online import split_online_stream

    model = small_cnn(10, width=8)
    strategy = _strategy("naive", model, [NormalizationPlugin("adab2n", num_tasks=5)])
    with pytest.raises(ValueError, match="task boundaries"):
        strategy.train(split_online_stream(digits.train_stream, 10, access_task_boundaries=False))


def test_class_task_map_first_seen_and_fixed() -> None:
    mapping = ClassTaskMap()
    assert mapping.assign(torch.tensor([3, 7, 3]), 0).tolist() == [0, 0, 0]
    assert mapping.assign(torch.tensor([7, 1, 3, 9]), 2).tolist() == [0, 2, 0, 2]
    fixed = ClassTaskMap({0: 0, 1: 0, 2: 1})
    assert fixed.assign(torch.tensor([2, 0]), 5).tolist() == [1, 0]
    with pytest.raises(KeyError):
        fixed.assign(torch.tensor([4]), 1)
    assert ClassTaskMap(lambda y: y // 5).assign(torch.tensor([4, 5]), 0).tolist() == [0, 1]
