"""One competition run: build the stream, run the submission, score it, record it."""

from __future__ import annotations

import hashlib
import platform
import tempfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from continual.harness.config import HarnessConfig
from continual.harness.records import ResultsStore
from continual.harness.scoring import score
from continual.harness.supervisor import Outcome, run_submission
from continual.harness.task import CompetitionTask, build_task

_LOG_TAIL_BYTES = 256 * 1024


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_file(path: Path) -> str:
    """Why the submission file cannot be run, or "" if it can."""
    if not path.is_file():
        return f"submission file {path} does not exist"
    if path.suffix != ".py":
        return "the submission must be a Python (.py) file"
    return ""


def run_competition(
    config: HarnessConfig, progress: bool = True, task: CompetitionTask | None = None
) -> dict[str, Any]:
    """Run ``config.submission`` and return (and store) its record.

    ``task`` may be given to reuse one stream for several submissions (tests). Submission
    failures never raise: they are recorded with their status and reason.
    """
    config.validate()
    store = ResultsStore(config.results_dir)
    run_id = store.new_run_id(config.display_name)
    path = Path(config.submission).expanduser().resolve()
    record: dict[str, Any] = {
        "run_id": run_id,
        "name": config.display_name,
        "submission": str(path),
        "config": {**asdict(config), "submission": str(path)},
        "started_at": _now(),
        "host": {"python": platform.python_version(), "machine": platform.machine()},
    }
    problem = _check_file(path)
    if problem:
        outcome = Outcome(status="invalid_submission", reason=problem)
        log = b""
    else:
        record["submission_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        task = task if task is not None else build_task(config)
        run_config = HarnessConfig(**{**asdict(config), "submission": str(path)})
        with tempfile.TemporaryDirectory(prefix="cl-harness-") as folder:
            scratch, log_path = Path(folder) / "scratch", Path(folder) / "submission.log"
            outcome = run_submission(run_config, task, scratch, log_path, progress=progress)
            raw = log_path.read_bytes() if log_path.exists() else b""
            log = raw[-_LOG_TAIL_BYTES:]
    metrics = None
    if outcome.status == "ok":
        assert task is not None
        try:
            metrics = score(task, task.segments(config.experience_size, config.eval_period), outcome.predictions)
        except ValueError as error:
            outcome.status, outcome.reason = "invalid_predictions", str(error)
    record.update(
        status=outcome.status,
        reason=outcome.reason,
        metrics=metrics,
        startup_s=round(outcome.startup_s, 3),
        run_s=round(outcome.run_s, 3),
        exit_code=outcome.exit_code,
        finished_at=_now(),
    )
    record["log"] = str(store.write_log(run_id, log))
    record["record"] = str(store.runs / f"{run_id}.json")
    store.write_record(record)
    store.write_leaderboard()
    return record
