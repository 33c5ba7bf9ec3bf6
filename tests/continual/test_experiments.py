"""The BN vs AdaB²N comparison script runs end to end (tiny model) and tabulates."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from avalanche.benchmarks.utils.data_loader import ReplayDataLoader
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import ReplayPlugin

from continual.experiments.compare_norms import (
    RunConfig,
    _parse,
    build_model,
    build_scenario,
    build_strategy,
    run,
    summarize,
    training_plugins,
)
from continual.metrics.online import OnlineAccuracyMetrics
from continual.replay import ReservoirReplayPlugin
from continual.scenarios import online_stream

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_compare_runs_and_summarizes() -> None:
    runs = []
    for norm in ("bn", "adab2n"):
        config = RunConfig(benchmark="digits", norm=norm, seed=0, model="cnn", nf=4, eval_period=400, mem_size=50)
        runs.append(run(config, progress=False))
    for result in runs:
        assert set(result["metrics"]) == {"A_auc", "A_last", "A_avg", "F_last"}
        assert len(result["task_accuracies"]) == 5
        assert [seen for seen, _ in result["curve"]] == [405, 807]
    # The same seed gives both normalizations the same stream and initial weights; the
    # normalization (and nothing else) makes the runs differ.
    assert runs[0]["task_accuracies"] != runs[1]["task_accuracies"]
    table = summarize(runs + [{**runs[0], "metrics": {k: 0.0 for k in runs[0]["metrics"]}}])
    assert "| digits | split | er | bn | 2 |" in table and "| digits | split | er | adab2n | 1 |" in table
    assert "±" in table


# Digits cut to 20 training / 10 test images per class: 200 training samples, well under a
# second per run with the tiny CNN.
TINY = dict(benchmark="digits", seed=0, model="cnn", nf=4, train_per_class=20, test_per_class=10,
            eval_period=50, mem_size=30)


class _BatchProbe(SupervisedPlugin):
    """Records the size of every training mini-batch and whether it was replay-augmented."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []
        self.replayed: list[bool] = []

    def before_forward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self.sizes.append(len(strategy.mb_x))
        self.replayed.append(isinstance(strategy.dataloader, ReplayDataLoader))


def _train_with_probe(config: RunConfig) -> tuple[_BatchProbe, Any]:
    scenario = build_scenario(config)
    metric = OnlineAccuracyMetrics.from_stream(scenario.test_stream, 10, eval_period=config.eval_period)
    strategy = build_strategy(config, build_model(config, 10), metric)
    probe = _BatchProbe()
    strategy.plugins.append(probe)
    for experience in online_stream(scenario.train_stream, config.batch_size, seed=config.seed):
        strategy.train(experience)
    return probe, strategy


def test_naive_strategy_has_no_replay() -> None:
    naive = RunConfig(**TINY, norm="adab2n", strategy="naive")
    assert not any(isinstance(p, ReplayPlugin) for p in training_plugins(naive))
    assert any(isinstance(p, ReservoirReplayPlugin) for p in training_plugins(RunConfig(**TINY, strategy="er")))
    probe, strategy = _train_with_probe(naive)
    # Every step trains on the incoming batch of 10 alone, never through a replay loader.
    assert max(probe.sizes) == 10 and not any(probe.replayed)
    assert not any(isinstance(p, ReplayPlugin) for p in strategy.plugins)
    # AdaB²N's regularizer, official on replay steps only, acts on every naive step ...
    norm = strategy.plugins[0]
    assert norm.regularize_on == "always" and norm.last_regularization is not None
    assert norm.current_task == 5
    # ... and stays the official rule under ER, or whatever is asked for.
    assert training_plugins(RunConfig(norm="adab2n"))[0].regularize_on == "replay"
    asked = RunConfig(norm="adab2n", strategy="naive", regularize_on="replay")
    assert training_plugins(asked)[0].regularize_on == "replay"
    # Control: the same probe sees replay-augmented batches of 10 + 10 under ER.
    er_probe, _ = _train_with_probe(RunConfig(**TINY, norm="adab2n", strategy="er"))
    assert max(er_probe.sizes) == 20 and any(er_probe.replayed)


def test_si_blurry_scenario_is_blurry_and_seeded() -> None:
    scenarios = [build_scenario(RunConfig(**{**TINY, "seed": seed}, scenario="si_blurry")) for seed in (0, 1)]
    tasks = [[set(np.unique(e.dataset.targets)) for e in scenario.train_stream] for scenario in scenarios]
    # Blurred samples put some class into more than one task; each seed draws its own split.
    assert any(len([t for t in seed_tasks if c in t]) > 1 for seed_tasks in tasks for c in range(10))
    assert tasks[0] != tasks[1]


@pytest.mark.parametrize(("strategy", "scenario"), [("naive", "split"), ("er", "si_blurry"), ("naive", "si_blurry")])
def test_strategies_and_scenarios_run_and_split_the_summary(strategy: str, scenario: str) -> None:
    runs = [run(RunConfig(**TINY, norm=norm, strategy=strategy, scenario=scenario), progress=False)
            for norm in ("bn", "adab2n")]
    for result in runs:
        assert result["config"]["strategy"] == strategy and result["config"]["scenario"] == scenario
        assert ("ReservoirReplayPlugin" in result["plugins"]) == (strategy == "er")
        assert set(result["metrics"]) == {"A_auc", "A_last", "A_avg", "F_last"}
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in result["metrics"].values())
        assert 1 <= len(result["task_accuracies"]) <= 5  # a Si-Blurry task may be empty
    # A split ER record of the same norms must not be averaged with these runs.
    other = {**runs[0], "config": {**runs[0]["config"], "strategy": "er", "scenario": "split"}}
    table = summarize(runs + [other])
    assert f"| digits | {scenario} | {strategy} | bn | 1 |" in table
    assert f"| digits | {scenario} | {strategy} | adab2n | 1 |" in table
    assert "| digits | split | er | bn | 1 |" in table


def test_summary_reads_records_without_strategy_or_scenario() -> None:
    # JSON written before the options existed: split-scenario ER runs.
    old = {"config": {"benchmark": "digits", "norm": "bn"}, "seconds": 1.0,
           "metrics": {"A_auc": 0.5, "A_last": 0.4, "A_avg": 0.6, "F_last": 0.1}}
    new = {**old, "config": {**old["config"], "strategy": "naive", "scenario": "split"}}
    table = summarize([old, old, new])
    assert "| digits | split | er | bn | 2 |" in table and "| digits | split | naive | bn | 1 |" in table


def test_cli_options() -> None:
    _, config = _parse(["--strategy", "naive", "--scenario", "si_blurry", "--disjoint-pct", "40"])
    assert (config.strategy, config.scenario, config.disjoint_pct, config.blurry_pct) == ("naive", "si_blurry", 40, 10)
    _, default = _parse([])
    assert (default.strategy, default.scenario, default.regularize_on) == ("er", "split", "auto")
    with pytest.raises(SystemExit):
        _parse(["--strategy", "der"])
    with pytest.raises(ValueError, match="scenario"):
        RunConfig(scenario="blurry")


def test_runs_carry_a_protocol_block() -> None:
    from benchmarks.protocol import PROTOCOL_SCHEMA, differences, fingerprint_of

    bn = run(RunConfig(**TINY, norm="bn"), progress=False)
    ada = run(RunConfig(**TINY, norm="adab2n"), progress=False)
    block = bn["protocol"]
    assert block["schema"] == PROTOCOL_SCHEMA and block["kind"] == "continual"
    assert bn["fingerprint"] == fingerprint_of(block)
    assert block["data"]["train_samples"] == 200 and block["data"]["test_samples"] == 100
    assert block["setting"]["replay"] == {"mem_size": 30, "mem_batch_size": 10}
    # same seed, same data and initial weights: only the method part differs
    changed = {key.split(".")[0] for key, _, _ in differences(block, ada["protocol"])}
    assert changed == {"method"}
