"""Competition harness: budgets, failures, label secrecy and the append-only leaderboard.

Each run starts a fresh Python process (the isolation under test), so each test costs a
runtime start-up (a few seconds) on top of its tiny workload.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from continual.harness.config import HarnessConfig, parse_overrides
from continual.harness.records import ResultsStore, render_leaderboard
from continual.harness.audit import Policy, SandboxViolation
from continual.harness.task import build_task

SUBMISSIONS = Path(__file__).parent / "submissions"


@pytest.fixture(scope="module")
def base_config(tmp_path_factory) -> HarnessConfig:
    return HarnessConfig(
        submission=str(SUBMISSIONS / "tiny_ok.py"),
        benchmark="split_digits",
        train_per_class=20,
        test_per_class=10,
        experience_size=20,
        eval_period=100,
        time_budget_s=120.0,
        memory_budget_mb=1024,
        results_dir=str(tmp_path_factory.mktemp("results")),
    )


@pytest.fixture(scope="module")
def task(base_config):
    return build_task(base_config, rng_seed=0)


def _run(config: HarnessConfig, task, name: str, **overrides):
    from continual.harness.app import run_competition

    config = replace(config, submission=str(SUBMISSIONS / f"{name}.py"), name=name, **overrides)
    return run_competition(config, progress=False, task=task)


def test_well_behaved_submission_is_scored(base_config, task) -> None:
    record = _run(base_config, task, "tiny_ok")
    assert record["status"] == "ok", record["reason"]
    metrics = record["metrics"]
    assert 0.0 <= metrics["A_last"] <= 1.0 and metrics["A_auc"] is not None
    # 200 samples, an anytime evaluation every 100: two of them.
    assert metrics["num_anytime_evaluations"] == 2
    stored = json.loads(Path(record["record"]).read_text())
    assert stored["status"] == "ok" and stored["metrics"] == metrics
    from benchmarks.protocol import PROTOCOL_SCHEMA, fingerprint_of

    protocol = stored["protocol"]  # the typed protocol block: submission, data checksums, setting
    assert protocol["schema"] == PROTOCOL_SCHEMA and protocol["kind"] == "continual.harness"
    assert stored["fingerprint"] == fingerprint_of(protocol)
    assert protocol["submission"]["sha256"] == stored["submission_sha256"]
    assert protocol["data"]["scenario_sha256"] == stored["scenario_sha256"] and protocol["setting"]["experience_size"] == 20


def test_over_time_budget_is_stopped_and_recorded(base_config, task) -> None:
    record = _run(base_config, task, "sleepy", time_budget_s=2.0)
    assert record["status"] == "timeout"
    assert "time budget" in record["reason"]
    assert record["run_s"] < 30  # killed near the 2 s budget, not after the hour-long sleep
    assert record["metrics"] is None


def test_over_memory_budget_is_stopped_and_recorded(base_config, task) -> None:
    record = _run(base_config, task, "memory_hog", memory_budget_mb=256)
    assert record["status"] == "over_memory_budget", record["reason"]
    assert record["metrics"] is None


@pytest.mark.parametrize("name", ["crashing", "aborting"])
def test_crashing_submission_is_recorded(base_config, task, name: str) -> None:
    record = _run(base_config, task, name)
    assert record["status"] == "crashed"
    if name == "crashing":
        assert "boom in experience 3" in record["reason"]
        assert "boom in experience 3" in Path(record["log"]).read_text()
    else:
        assert record["exit_code"] == -6 and "SIGABRT" in record["reason"]  # killed by the signal


def test_malformed_and_missing_submissions_are_recorded(base_config, task) -> None:
    record = _run(base_config, task, "malformed")
    assert record["status"] == "invalid_submission"
    assert "make_strategy" in record["reason"]
    missing = _run(base_config, task, "does_not_exist")
    assert missing["status"] == "invalid_submission" and "does not exist" in missing["reason"]


def test_invalid_predictions_are_rejected(base_config, task) -> None:
    record = _run(base_config, task, "bad_predictions")
    assert record["status"] == "invalid_predictions"
    assert "(100, 11)" in record["reason"]


def test_leaderboard_keeps_every_entry(base_config, task, tmp_path) -> None:
    config = replace(base_config, results_dir=str(tmp_path / "board"))
    first = _run(config, task, "tiny_ok")
    second = _run(config, task, "does_not_exist")  # recorded without starting a process
    third = _run(config, task, "does_not_exist")
    store = ResultsStore(config.results_dir)
    ids = {record["run_id"] for record in store.records()}
    assert ids == {first["run_id"], second["run_id"], third["run_id"]}
    board = store.leaderboard.read_text()
    for record in (first, second, third):
        assert record["run_id"] in board
    assert "## Failed runs" in board and "invalid_submission" in board
    # A record is write-once: publishing the same run id again fails instead of overwriting.
    with pytest.raises(FileExistsError):
        store.write_record({**first, "status": "tampered"})
    assert json.loads(Path(first["record"]).read_text())["status"] == "ok"
    # A corrupt record is skipped with a warning, the others stay on the board.
    (store.runs / "zzz-corrupt.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        store.write_leaderboard()
    assert all(record["run_id"] in store.leaderboard.read_text() for record in (first, second, third))


def test_leaderboard_ranks_by_a_auc() -> None:
    def record(run_id: str, a_auc: float) -> dict:
        metrics = {"A_auc": a_auc, "A_last": 0.5, "A_avg": 0.5, "F_last": 0.1}
        return {"run_id": run_id, "name": run_id, "status": "ok", "metrics": metrics, "run_s": 1.0,
                "config": {"benchmark": "split_digits"}}

    board = render_leaderboard([record("low", 0.2), record("high", 0.8)])
    assert board.index("| 1 | high |") < board.index("| 2 | low |")


def test_command_line_overrides() -> None:
    config = parse_overrides(["submission=x.py", "time_budget_s=12.5", "train_per_class=none", "protected_paths=[/a,/b]"])
    assert config.time_budget_s == 12.5 and config.train_per_class is None
    assert config.protected_paths == ["/a", "/b"]
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["submission=x.py", "bogus=1"])
    with pytest.raises(ValueError, match="required"):
        parse_overrides(["seed=3"])


def test_segments_cut_at_task_ends_and_eval_points(task) -> None:
    segments = task.segments(experience_size=30, eval_period=100)
    assert segments[0].start == 0 and segments[-1].end == len(task.train_labels)
    assert all(a.end == b.start for a, b in zip(segments, segments[1:]))
    assert [s.end for s in segments if s.periodic_eval] == [100, 200]
    assert sum(s.last_in_task for s in segments) == 5
    # Classes arrive two per task and the test set is privately shuffled (not class-sorted).
    assert np.array_equal(np.unique(task.train_labels[: task.task_sizes[0]]), [0, 1])
    assert not np.all(np.diff(task.test_labels) >= 0)


def test_policy_rules(tmp_path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    policy = Policy(scratch, readable=[tmp_path / "code"], protected=[tmp_path / "code" / "data"])
    policy.check("open", (str(tmp_path / "code" / "module.py"), "r", 0))
    policy.check("open", (str(scratch / "out.bin"), "w", 577))
    for event, args in [
        ("open", (str(tmp_path / "code" / "data" / "labels.npy"), "r", 0)),
        ("open", (str(tmp_path / "elsewhere.txt"), "r", 0)),
        ("open", (str(tmp_path / "code" / "module.py"), "w", 577)),
        ("os.remove", (str(tmp_path / "code" / "module.py"),)),
        ("subprocess.Popen", ("cat", ["cat"], None, None)),
        ("ctypes.dlopen", ("libc.so.6",)),
        ("os.kill", (1, 9)),
    ]:
        with pytest.raises(SandboxViolation):
            policy.check(event, args)
