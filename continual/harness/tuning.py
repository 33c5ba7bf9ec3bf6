"""The two-phase (reality-check) protocol: tune on public data, evaluate the frozen values once.

Cha & Moon, "Hyperparameters in Continual Learning: a Reality Check" (2024): choosing
hyperparameters by the score on the scenario that is then reported overstates a method.
Their protocol, as the harness runs it (``tuning_benchmark=...``, see
:class:`~continual.harness.config.HarnessConfig`):

1. **tuning phase**, on the tuning scenario (a different dataset, or the other half of the
   same one; same scenario type, every setting and budget the same): every point of the
   submission's declared ``SEARCH_SPACE`` (Hydra sweep syntax, expanded by
   :func:`continual.search_space.grid`, read from the file without running it) is one
   sandboxed run with ``context.hparams`` set to it, scored by the harness. Points run in
   grid order while the phase's total wall time is below ``tuning_budget_s`` (and at most
   ``max_trials``); the rest are recorded as skipped. The best ``criterion`` wins (the first
   in grid order on a tie);
2. **evaluation phase**: the frozen values run once on the evaluation scenario, whose labels
   only the harness holds. Nothing of this phase flows back: the choice is made before it
   starts, from tuning scores alone.

One record holds both phases; its metrics are the evaluation phase's (the leaderboard ranks
by them and shows the tuning score of the frozen values, and the gap).
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import Any

from continual.harness.app import load_task, run_competition
from continual.harness.config import HarnessConfig
from continual.harness.records import ResultsStore, track_of
from continual.harness.task import ScenarioMismatch, build_task
from continual.search_space import declared_space, grid


def tuning_config(config: HarnessConfig) -> HarnessConfig:
    """The tuning phase's settings: the evaluation's, on the tuning data."""
    return replace(
        config, benchmark=config.tuning_benchmark, data_part=config.tuning_data_part, scenario_dir="",
        scenario_sha256="", labels_sha256="", tuning_benchmark="",
    )


def _failed(config: HarnessConfig, status: str, reason: str, tuning: dict[str, Any]) -> dict[str, Any]:
    store = ResultsStore(config.results_dir, config.key_file or None)
    run_id = store.new_run_id(config.display_name)
    record = {
        "run_id": run_id, "name": config.display_name, "submission": config.submission, "config": asdict(config),
        "status": status, "reason": reason, "metrics": None, "run_s": 0.0, "tuning": tuning,
        "track": track_of(asdict(config)),
    }
    record["log"] = str(store.write_log(run_id, b""))
    record["record"] = str(store.write_record(record))
    store.write_leaderboard()
    return record


def run_two_phase(config: HarnessConfig, progress: bool = True) -> dict[str, Any]:
    """Tune ``config.submission`` on the tuning scenario, evaluate the frozen values once;
    returns (and stores) the record of both phases. Failures never raise."""
    config.validate()
    if not config.tuning_benchmark:
        raise ValueError("a two-phase run needs tuning_benchmark")
    phase_config = tuning_config(config)
    tuning: dict[str, Any] = {
        "benchmark": phase_config.benchmark, "data_part": phase_config.data_part, "criterion": config.criterion,
        "budget_s": config.tuning_budget_s, "max_trials": config.max_trials,
    }
    try:
        space = declared_space(config.submission)
        points = grid(space)
    except (OSError, SyntaxError, ValueError) as error:
        return _failed(config, "invalid_submission", f"search space: {error}", tuning)
    tuning["space"] = space
    try:
        evaluation_config, evaluation_task = load_task(config)
        evaluation_config.validate()  # a scenario folder's settings must keep the phases apart
    except (ScenarioMismatch, ValueError) as error:
        return _failed(config, "invalid_scenario", str(error), tuning)
    tuning_task = build_task(phase_config)
    if tuning_task.scenario_sha256 == evaluation_task.scenario_sha256:
        return _failed(config, "invalid_scenario", "the tuning and evaluation scenarios are the same data", tuning)
    tuning["scenario_sha256"] = tuning_task.scenario_sha256

    store = ResultsStore(config.results_dir, config.key_file or None)
    trials: list[dict[str, Any]] = []
    started = time.monotonic()
    for number, hparams in enumerate(points):
        spent = time.monotonic() - started
        if spent >= config.tuning_budget_s or (config.max_trials and number >= config.max_trials):
            trials.append({"hparams": hparams, "status": "skipped", "reason": "tuning budget spent"})
            continue
        if progress:
            print(f"{config.display_name}: tuning trial {number + 1}/{len(points)} {hparams}", flush=True)
        trial = run_competition(phase_config, progress=False, task=tuning_task, hparams=hparams, store_record=False)
        log = store.write_log(f"{trial['run_id']}-tuning", trial.pop("log_text").encode())
        trials.append({
            "hparams": hparams, "status": trial["status"], "reason": trial["reason"], "metrics": trial["metrics"],
            "run_s": trial["run_s"], "scenario_sha256": trial.get("scenario_sha256"), "log": str(log),
        })
    tuning["spent_s"] = round(time.monotonic() - started, 3)
    tuning["trials"] = trials
    scored = [t for t in trials if t["status"] == "ok" and t["metrics"].get(config.criterion) is not None]
    if not scored:
        return _failed(config, "tuning_failed", "no tuning trial was scored", tuning)
    best = max(scored, key=lambda t: t["metrics"][config.criterion])  # first of equal scores
    tuning.update(best_hparams=best["hparams"], best_metrics=best["metrics"])
    if progress:
        print(f"{config.display_name}: frozen {best['hparams']} ({config.criterion} "
              f"{100 * best['metrics'][config.criterion]:.2f} in tuning); evaluation phase", flush=True)

    evaluation_run = replace(evaluation_config, tuning_benchmark="")
    record = run_competition(
        evaluation_run, progress=progress, task=evaluation_task, hparams=best["hparams"], store_record=False
    )
    log = record.pop("log_text").encode()
    record["config"] = {**asdict(evaluation_config), "submission": record["submission"]}
    record["tuning"] = tuning
    track = track_of(record["config"], record.get("scenario_sha256", ""))
    track["tuning"] = {key: tuning[key] for key in ("benchmark", "data_part", "scenario_sha256", "criterion", "budget_s", "max_trials")}
    record["track"] = track
    record["log"] = str(store.write_log(record["run_id"], log))
    record["record"] = str(store.runs / f"{record['run_id']}.json")
    store.write_record(record)
    store.write_leaderboard()
    return record
