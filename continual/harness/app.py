"""One competition run: build the stream, run the submission, score it, record it."""

from __future__ import annotations

import hashlib
import platform
import tempfile
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.protocol import harness_protocol
from continual.harness.config import HarnessConfig
from continual.harness import sandbox
from continual.harness.records import ResultsStore, track_of
from continual.harness.scoring import score
from continual.harness.supervisor import Outcome, run_submission
from continual.harness.task import CompetitionTask, ScenarioMismatch, build_task


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_file(path: Path) -> str:
    """Why the submission file cannot be run, or "" if it can."""
    if not path.is_file():
        return f"submission file {path} does not exist"
    if path.suffix != ".py":
        return "the submission must be a Python (.py) file"
    return ""


def load_task(config: HarnessConfig) -> tuple[HarnessConfig, CompetitionTask]:
    """The task of ``config`` and the config with the settings of its scenario folder, if any.

    Raises:
        ScenarioMismatch: the scenario folder does not match its manifest.
    """
    if not config.scenario_dir:
        return config, build_task(config)
    from continual.harness.scenario_files import load_scenario

    task, settings = load_scenario(config.scenario_dir)
    # The folder's labels file must never be readable by the submission.
    protected = [*config.protected_paths, str(Path(config.scenario_dir).resolve())]
    return replace(config, **settings, protected_paths=protected), task


def run_competition(
    config: HarnessConfig,
    progress: bool = True,
    task: CompetitionTask | None = None,
    hparams: dict[str, Any] | None = None,
    store_record: bool = True,
) -> dict[str, Any]:
    """Run ``config.submission`` and return (and store) its record.

    ``progress``: a bar when stderr is a terminal, otherwise one line per evaluation point on
    stderr. ``task`` may be given to reuse one stream for several submissions (tests and the
    tuning phase). ``hparams`` are handed to the submission as ``context.hparams``.
    ``store_record=False`` returns the record without publishing it (tuning trials). The
    scenario and its hidden labels are checked against their checksums (recorded ones, and
    published ones in the config) before the run and again before scoring; a mismatch is
    recorded as ``invalid_scenario`` and never scored. Submission failures never raise:
    they are recorded with their status and reason.

    Raises:
        SandboxUnavailable: the operating-system sandbox cannot be built here and the
            organiser did not pass ``unsafe_no_sandbox`` (nothing is run or recorded).
    """
    config.validate()
    isolation: dict[str, Any] = {"sandboxed": False}
    if not config.unsafe_no_sandbox:
        problem = sandbox.probe()
        if problem:
            raise sandbox.SandboxUnavailable(
                f"cannot build the submission sandbox: {problem}. Refusing to score; pass unsafe_no_sandbox=true to "
                "run unprotected (runs are then marked unsandboxed)"
            )
        isolation = {"sandboxed": True, **sandbox.describe()}
    store = ResultsStore(config.results_dir, config.key_file or None)
    run_id = store.new_run_id(config.display_name)
    path = Path(config.submission).expanduser().resolve()
    record: dict[str, Any] = {
        "run_id": run_id,
        "name": config.display_name,
        "submission": str(path),
        "config": {**asdict(config), "submission": str(path)},
        "hparams": dict(hparams or {}),
        "started_at": _now(),
        "host": {"python": platform.python_version(), "machine": platform.machine()},
        "isolation": isolation,
    }
    problem = _check_file(path)
    log = b""
    log_bytes = 0
    if problem:
        outcome = Outcome(status="invalid_submission", reason=problem)
    else:
        record["submission_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        try:
            if task is None:
                config, task = load_task(config)
                record["config"] = {**asdict(config), "submission": str(path)}
            task.verify(config.scenario_sha256, config.labels_sha256)
        except ScenarioMismatch as error:
            outcome = Outcome(status="invalid_scenario", reason=str(error))
        else:
            record.update(scenario_sha256=task.scenario_sha256, labels_sha256=task.labels_sha256)
            run_config = replace(config, submission=str(path))
            with tempfile.TemporaryDirectory(prefix="cl-harness-") as folder:
                outcome = run_submission(
                    run_config, task, Path(folder), progress=progress, hparams=hparams, run_id=run_id
                )
            log, log_bytes = outcome.log, outcome.log_bytes
    record["track"] = track_of(record["config"], record.get("scenario_sha256", ""))
    metrics = None
    if outcome.status == "ok":
        assert task is not None
        try:
            # The labels about to be scored against are the ones the run was built with.
            task.verify(config.scenario_sha256, config.labels_sha256)
            metrics = score(task, task.segments(config.experience_size, config.eval_period), outcome.predictions)
        except ScenarioMismatch as error:
            outcome.status, outcome.reason = "invalid_scenario", str(error)
        except ValueError as error:
            outcome.status, outcome.reason = "invalid_predictions", str(error)
    record.update(
        status=outcome.status,
        reason=outcome.reason,
        metrics=metrics,
        startup_s=round(outcome.startup_s, 3),
        run_s=round(outcome.run_s, 3),
        exit_code=outcome.exit_code,
        log_bytes=log_bytes,
        memory_limit_bytes=outcome.memory_limit,
        task_limit_hits=outcome.task_limit_hits,
        finished_at=_now(),
    )
    protocol = harness_protocol(record)
    record.update(protocol=protocol.to_dict(), fingerprint=protocol.fingerprint())
    if not store_record:
        record["log_text"] = log.decode(errors="replace")
        return record
    record["log"] = str(store.write_log(run_id, log))
    record["record"] = str(store.runs / f"{run_id}.json")
    store.write_record(record)
    store.write_leaderboard()
    return record
