"""The two-phase (reality-check) protocol in the harness (issue 18): the tuning phase
searches the declared space on public data, the frozen values run once on the evaluation
scenario, whose labels never leave the harness; the leaderboard ranks by evaluation."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from continual.harness.config import HarnessConfig, parse_overrides
from continual.harness.records import render_leaderboard
from continual.harness.task import build_task
from continual.harness.tuning import run_two_phase, tuning_config
from continual.search_space import declared_space, grid

SUBMISSIONS = Path(__file__).parent / "submissions"


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> HarnessConfig:
    # Disjoint halves of the digits: 10 training and 10 test images per class in each phase.
    return HarnessConfig(
        submission=str(SUBMISSIONS / "tunable_knn.py"), benchmark="split_digits", data_part="b",
        tuning_benchmark="split_digits", tuning_data_part="a", train_per_class=10, test_per_class=10,
        experience_size=20, eval_period=50, time_budget_s=120.0, memory_budget_mb=1024, tuning_budget_s=600.0,
        results_dir=str(tmp_path_factory.mktemp("results")),
    )


@pytest.fixture(scope="module")
def record(config) -> dict:
    return run_two_phase(config, progress=False)


def _hparams_lines(log: str) -> list[dict]:
    return [json.loads(line[len("HPARAMS "):]) for line in log.splitlines() if line.startswith("HPARAMS ")]


def test_search_space_is_read_without_running_the_file_and_expanded_by_hydra(tmp_path) -> None:
    path = tmp_path / "s.py"
    path.write_text("import os\nos.system('touch /tmp/never')\nSEARCH_SPACE = {'lr': '0.1,0.3', 'k': [1, 2]}\n")
    assert declared_space(path) == {"lr": "0.1,0.3", "k": [1, 2]}
    assert grid(declared_space(path)) == [{"lr": 0.1, "k": 1}, {"lr": 0.1, "k": 2}, {"lr": 0.3, "k": 1}, {"lr": 0.3, "k": 2}]
    path.write_text("SEARCH_SPACE = make_space()\n")
    with pytest.raises(ValueError, match="literal"):
        declared_space(path)
    with pytest.raises(ValueError, match="interval"):
        grid({"lr": "interval(0, 1)"})


def test_phases_must_share_the_scenario_and_differ_in_data() -> None:
    base = ["submission=x.py", "tuning_benchmark=split_digits"]
    with pytest.raises(ValueError, match="disjoint halves"):
        parse_overrides(base)
    with pytest.raises(ValueError, match="scenario type"):
        parse_overrides(["submission=x.py", "tuning_benchmark=si_blurry_digits", "benchmark=split_cifar10"])
    parse_overrides([*base, "tuning_data_part=a", "data_part=b"])
    parse_overrides(["submission=x.py", "tuning_benchmark=split_digits", "benchmark=split_cifar10"])


def test_halves_are_disjoint(config) -> None:
    tuning, evaluation = build_task(tuning_config(config), rng_seed=0), build_task(config, rng_seed=0)
    def rows(images):
        return {image.tobytes() for image in images}
    assert not rows(tuning.train_images) & rows(evaluation.train_images)
    assert not rows(tuning.test_images) & rows(evaluation.test_images)
    assert tuning.scenario_sha256 != evaluation.scenario_sha256


def test_frozen_values_are_the_tuning_phases_choice(config, record) -> None:
    assert record["status"] == "ok", record["reason"]
    tuning = record["tuning"]
    trials = tuning["trials"]
    assert [t["hparams"] for t in trials] == [{"mode": "constant"}, {"mode": "knn"}]
    assert all(t["status"] == "ok" for t in trials)
    scores = [t["metrics"]["A_auc"] for t in trials]
    assert scores[1] > scores[0]
    assert tuning["best_hparams"] == {"mode": "knn"} and tuning["best_metrics"] == trials[1]["metrics"]
    # Every trial ran on the tuning scenario, and received its point of the grid.
    tuning_sha = build_task(tuning_config(config), rng_seed=0).scenario_sha256
    assert {t["scenario_sha256"] for t in trials} == {tuning_sha} == {tuning["scenario_sha256"]}
    assert [_hparams_lines(Path(t["log"]).read_text()) for t in trials] == [[{"mode": "constant"}], [{"mode": "knn"}]]
    # The evaluation phase ran once, with the frozen values, on the other scenario.
    assert _hparams_lines(Path(record["log"]).read_text()) == [{"mode": "knn"}]
    assert record["hparams"] == {"mode": "knn"} and record["scenario_sha256"] != tuning_sha
    assert record["metrics"]["A_auc"] > 0.5


@pytest.mark.slow  # two more sandboxed processes
def test_the_budget_stops_the_search(config, tmp_path) -> None:
    record = run_two_phase(replace(config, max_trials=1, results_dir=str(tmp_path)), progress=False)
    trials = record["tuning"]["trials"]
    assert [t["status"] for t in trials] == ["ok", "skipped"]
    assert record["tuning"]["best_hparams"] == {"mode": "constant"}  # the only point it could see


def test_evaluation_labels_are_never_exposed(config, tmp_path) -> None:
    """The label thief, run through both phases: in the tuning trial and in the evaluation
    run every attempt at the labels is blocked, and the evaluation labels never reach it."""
    results = tmp_path / "results"
    results.mkdir()
    evaluation = build_task(config, rng_seed=0)
    np.save(results / "decoy_labels.npy", evaluation.test_labels)
    thief = replace(config, submission=str(SUBMISSIONS / "label_thief.py"), results_dir=str(results),
                    test_per_class=10)
    record = run_two_phase(thief, progress=False)
    assert record["status"] == "ok", record["reason"]
    logs = [Path(t["log"]).read_text() for t in record["tuning"]["trials"]] + [Path(record["log"]).read_text()]
    for log in logs:
        report = json.loads(next(line for line in log.splitlines() if line.startswith("THIEF "))[len("THIEF "):])
        for attempt, outcome in report.items():
            if attempt == "files in working folder":
                assert "label" not in outcome
            else:  # refused by the sandbox or the audit policy, or simply not there
                assert outcome.startswith("blocked: "), f"{attempt}: {outcome}"
    assert record["metrics"]["A_last"] < 0.5


def _two_phase(run_id: str, tuned: float, evaluated: float) -> dict:
    def metrics(a_auc):
        return {"A_auc": a_auc, "A_last": a_auc, "A_avg": a_auc, "F_last": 0.0}
    track = {"benchmark": "split_digits", "data_part": "b", "tuning": {
        "benchmark": "split_digits", "data_part": "a", "scenario_sha256": "ab" * 32, "criterion": "A_auc",
        "budget_s": 600.0, "max_trials": 0}}
    return {"run_id": run_id, "name": run_id, "status": "ok", "metrics": metrics(evaluated), "run_s": 1.0,
            "track": track, "tuning": {"best_metrics": metrics(tuned)}}


def test_leaderboard_ranks_by_the_evaluation_phase_and_shows_the_gap() -> None:
    board = render_leaderboard([_two_phase("overfit", 0.95, 0.40), _two_phase("robust", 0.80, 0.70)])
    assert board.index("| 1 | robust |") < board.index("| 2 | overfit |")
    assert "tuning A_auc | gap |" in board
    assert "| 1 | robust | 70.00 | 70.00 | 70.00 | 0.00 | 80.00 | +10.00 |" in board
    assert "| 2 | overfit | 40.00 | 40.00 | 40.00 | 0.00 | 95.00 | +55.00 |" in board
    assert "tuned on split_digits half a" in board
