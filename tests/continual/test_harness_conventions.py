"""Harness conventions: --help, tracks on the leaderboard, scenario checksums, the memory
verdict under scheduling delays, progress lines in logs (issue 16, item 6)."""

from __future__ import annotations

import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from continual.harness import wire
from continual.harness.__main__ import main
from continual.harness.config import HarnessConfig
from continual.harness.records import render_leaderboard
from continual.harness.scenario_files import load_scenario, save_scenario
from continual.harness.task import ScenarioMismatch, build_task

SUBMISSIONS = Path(__file__).parent / "submissions"


@pytest.fixture(scope="module")
def base_config(tmp_path_factory) -> HarnessConfig:
    return HarnessConfig(
        submission=str(SUBMISSIONS / "tiny_ok.py"), benchmark="split_digits", train_per_class=20, test_per_class=10,
        experience_size=20, eval_period=100, time_budget_s=120.0, memory_budget_mb=1024,
        results_dir=str(tmp_path_factory.mktemp("results")),
    )


@pytest.fixture(scope="module")
def task(base_config):
    return build_task(base_config, rng_seed=0)


def _run(config: HarnessConfig, task, name: str, progress: bool = False, **overrides):
    from continual.harness.app import run_competition

    config = replace(config, submission=str(SUBMISSIONS / f"{name}.py"), name=name, **overrides)
    return run_competition(config, progress=progress, task=task)


def test_help_exits_zero_and_bad_usage_two(capsys) -> None:
    assert main(["--help"]) == 0
    assert "submission=" in capsys.readouterr().out
    assert main(["-h"]) == 0
    assert main([]) == 2
    assert main(["bogus=1"]) == 2
    assert main(["no-equals-sign"]) == 2


def _ok(run_id: str, a_auc: float, **config) -> dict:
    metrics = {"A_auc": a_auc, "A_last": 0.5, "A_avg": 0.5, "F_last": 0.1}
    return {"run_id": run_id, "name": run_id, "status": "ok", "metrics": metrics, "run_s": 1.0,
            "config": {"benchmark": "split_digits", "num_tasks": 5, "seed": 0, "train_per_class": None, **config}}


def test_leaderboard_never_ranks_across_tracks() -> None:
    board = render_leaderboard([
        _ok("digits-strong", 0.9), _ok("digits-weak", 0.4),
        _ok("cifar", 0.3, benchmark="split_cifar10"),
        _ok("digits-subset", 0.95, train_per_class=20),  # easier setting: its own track
    ])
    sections = board.split("## Track ")[1:]
    assert len(sections) == 3
    by_first_row = {re.search(r"\| 1 \| (\S+) \|", section).group(1): section for section in sections}
    assert set(by_first_row) == {"digits-strong", "cifar", "digits-subset"}
    full = by_first_row["digits-strong"]
    assert "| 2 | digits-weak |" in full and "digits-subset" not in full and "cifar" not in full
    # The settings of every track are shown.
    assert "train_per_class all" in full and "train_per_class 20" in by_first_row["digits-subset"]
    assert "split_cifar10" in by_first_row["cifar"].splitlines()[0]


def test_runs_on_different_scenario_data_are_different_tracks() -> None:
    first = {**_ok("a", 0.5), "scenario_sha256": "1" * 64}
    second = {**_ok("b", 0.6), "scenario_sha256": "2" * 64}
    board = render_leaderboard([first, second])
    assert board.count("## Track ") == 2 and board.count("| 1 |") == 2


def test_scenario_files_are_verified(base_config, tmp_path) -> None:
    folder = tmp_path / "scenario"
    manifest = save_scenario(base_config, folder)
    task, settings = load_scenario(folder)
    assert settings["train_per_class"] == 20
    assert task.scenario_sha256 == manifest["scenario_sha256"] and task.labels_sha256 == manifest["labels_sha256"]
    # A fresh secret test order does not change the checksums.
    again, _ = load_scenario(folder)
    assert not np.array_equal(again.test_order, task.test_order) and again.labels_sha256 == task.labels_sha256
    # One flipped label in the file: refused before anything runs.
    labels = np.load(folder / "labels.npy")
    labels[0] = (labels[0] + 1) % 10
    np.save(folder / "labels.npy", labels)
    with pytest.raises(ScenarioMismatch, match="labels.npy"):
        load_scenario(folder)


def test_mismatched_scenario_is_recorded_not_scored(base_config, tmp_path) -> None:
    folder = tmp_path / "scenario"
    save_scenario(base_config, folder)
    config = replace(base_config, results_dir=str(tmp_path / "results"), scenario_dir=str(folder))
    pinned = _run(config, None, "tiny_ok", labels_sha256="0" * 64)
    assert pinned["status"] == "invalid_scenario" and "published checksum" in pinned["reason"]
    assert pinned["metrics"] is None and "scenario_sha256" not in pinned
    data = bytearray((folder / "scenario.npz").read_bytes())
    data[len(data) // 2] ^= 1  # one flipped bit in the training images
    (folder / "scenario.npz").write_bytes(bytes(data))
    tampered = _run(config, None, "tiny_ok")
    assert tampered["status"] == "invalid_scenario" and "scenario.npz" in tampered["reason"]


def test_labels_changed_during_the_run_are_not_scored(base_config, task, tmp_path, monkeypatch) -> None:
    from continual.harness import app

    real = app.run_submission

    def run_then_corrupt(config, task, *args, **kwargs):
        outcome = real(config, task, *args, **kwargs)
        task.test_labels[0] = (task.test_labels[0] + 1) % task.num_classes  # e.g. a stray in-place write
        return outcome

    monkeypatch.setattr(app, "run_submission", run_then_corrupt)
    task = build_task(base_config, rng_seed=0)
    record = _run(replace(base_config, results_dir=str(tmp_path)), task, "tiny_ok")
    assert record["status"] == "invalid_scenario" and "hidden labels changed" in record["reason"]
    assert record["metrics"] is None


def test_memory_verdict_does_not_depend_on_scheduling(base_config, task, monkeypatch) -> None:
    """The kernel stops the submission at its memory limit; a harness delayed (e.g. by load)
    until long after that still records the cause, not a crash or a broken pipe."""
    real_request = wire.HarnessChannel.request
    delayed = []

    def request_then_stall(self, header, reply, **kwargs):
        if header["type"] == "test_images":
            delayed.append(True)
            time.sleep(3)  # the submission allocates, is killed and exits meanwhile
        return real_request(self, header, reply, **kwargs)

    monkeypatch.setattr(wire.HarnessChannel, "request", request_then_stall)
    record = _run(base_config, task, "memory_hog", memory_budget_mb=256)
    assert delayed
    assert record["status"] == "over_memory_budget", record["reason"]


def test_progress_lines_when_stderr_is_not_a_terminal(base_config, task, capfd) -> None:
    record = _run(base_config, task, "tiny_ok", progress=True)
    assert record["status"] == "ok", record["reason"]
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if re.match(r"tiny_ok: evaluation \d+/6 after \d+ training samples", line)]
    # 5 task ends (every 40 samples) and anytime points at 100 and 200 (200 is both): 6.
    assert len(lines) == 6, err
    assert lines[-1].startswith("tiny_ok: evaluation 6/6 after 200 training samples")
