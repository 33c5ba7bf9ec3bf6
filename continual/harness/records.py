"""Run records and the leaderboard: write-once files, atomic rewrites, nothing ever lost.

Layout under the results folder::

    runs/<run id>.json     one record per run (success or failure), never overwritten
    logs/<run id>.log      the tail of the submission's output
    leaderboard.md         rebuilt from all records after every run (atomic replace)

The records are the source of truth; the table is derived from them, so a crash between two
writes cannot lose an entry.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.filelock import exclusive_lock


def _atomic_write(path: Path, data: bytes, exclusive: bool) -> None:
    """Write ``data`` to ``path`` through a synced temporary file in the same folder.

    ``exclusive``: publish with ``os.link``, which fails if ``path`` exists (write-once);
    otherwise ``os.replace`` (atomic overwrite, for derived files).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        if exclusive:
            os.link(temporary, path)
        else:
            os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


class ResultsStore:
    """The results folder of a competition."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.runs = self.root / "runs"
        self.logs = self.root / "logs"
        self.leaderboard = self.root / "leaderboard.md"

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise leaderboard rebuilds of concurrent harness processes."""
        self.root.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.root / ".lock"):
            yield

    @staticmethod
    def new_run_id(name: str) -> str:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40] or "submission"
        return f"{stamp}-{safe}-{uuid.uuid4().hex[:8]}"

    def write_record(self, record: dict[str, Any]) -> Path:
        """Publish a run record; never replaces an existing one (FileExistsError)."""
        path = self.runs / f"{record['run_id']}.json"
        _atomic_write(path, json.dumps(record, indent=1, sort_keys=True).encode(), exclusive=True)
        return path

    def write_log(self, run_id: str, text: bytes) -> Path:
        path = self.logs / f"{run_id}.log"
        _atomic_write(path, text, exclusive=True)
        return path

    def records(self) -> list[dict[str, Any]]:
        """All readable run records, oldest first."""
        found = []
        for path in sorted(self.runs.glob("*.json")):
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError) as error:
                warnings.warn(f"skipping unreadable record {path}: {error}", stacklevel=2)
        return sorted(found, key=lambda r: r.get("finished_at", ""))

    def write_leaderboard(self) -> Path:
        """Rebuild ``leaderboard.md`` from every record (under the lock, atomically)."""
        with self.locked():
            _atomic_write(self.leaderboard, render_leaderboard(self.records()).encode(), exclusive=False)
        return self.leaderboard


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * float(value):.2f}"


#: the harness settings that make two runs comparable: the scenario (benchmark, tasks, stream
#: seed, subsets) and the rules (experience size, evaluation period, budgets, threads).
TRACK_SETTINGS = (
    "benchmark", "data_part", "num_tasks", "seed", "train_per_class", "test_per_class", "experience_size", "eval_period",
    "time_budget_s", "memory_budget_mb", "threads",
)


def track_of(config: dict[str, Any], scenario_sha256: str = "") -> dict[str, Any]:
    """The track of a run: its comparable settings and the checksum of its scenario."""
    track = {name: config.get(name) for name in TRACK_SETTINGS}
    track["scenario_sha256"] = scenario_sha256
    return track


def _track(record: dict[str, Any]) -> dict[str, Any]:
    # Records written before tracks existed carry only their config.
    return record.get("track") or track_of(record.get("config", {}), record.get("scenario_sha256", ""))


def _describe(track: dict[str, Any]) -> str:
    parts = []
    for name, value in track.items():
        if name in ("benchmark", "tuning"):
            continue
        if name == "scenario_sha256":
            value = str(value)[:12] or "unknown"
        parts.append(f"{name} {'all' if value is None else value}")
    if track.get("tuning"):
        tuning = track["tuning"]
        part = "" if tuning.get("data_part", "all") == "all" else f" half {tuning['data_part']}"
        trials = f", at most {tuning['max_trials']} trials" if tuning.get("max_trials") else ""
        parts.append(f"tuned on {tuning['benchmark']}{part} (scenario {str(tuning.get('scenario_sha256', ''))[:12]}) "
                     f"by {tuning['criterion']} within {tuning['budget_s']:g} s{trials}")
    return " · ".join(parts)


def render_leaderboard(records: list[dict[str, Any]]) -> str:
    """Markdown: one ranked table per track (successful runs by A_auc, then A_last), then
    every failed run. Runs of different tracks are never ranked against each other.

    Two-phase (tuning → evaluation) runs are ranked by their evaluation phase; their table
    also shows the tuning-phase A_auc of the frozen values and the gap between the two.
    """
    tracks: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("status") == "ok":
            tracks.setdefault(json.dumps(_track(r), sort_keys=True), []).append(r)
    lines = [
        "# Leaderboard",
        "",
        "One table per track (benchmark, scenario checksum and settings): runs are ranked only",
        "within their track, by A_auc (anytime accuracy), then A_last; accuracies in %, on the",
        "classes seen so far. Two-phase tracks rank by the evaluation phase.",
    ]
    for number, (key, runs) in enumerate(sorted(tracks.items()), 1):
        track = json.loads(key)
        runs.sort(key=lambda r: (-(r["metrics"].get("A_auc") or 0.0), -(r["metrics"].get("A_last") or 0.0)))
        two_phase = bool(track.get("tuning"))
        extra = " tuning A_auc | gap |" if two_phase else ""
        lines += [
            "",
            f"## Track {number}: {track['benchmark']}",
            "",
            _describe(track),
            "",
            f"| rank | submission | A_auc | A_last | A_avg | F_last |{extra} time (s) | run |",
            "|---:|---|---:|---:|---:|---:|" + ("---:|---:|" if two_phase else "") + "---:|---|",
        ]
        for rank, r in enumerate(runs, 1):
            m = r["metrics"]
            cells = ""
            if two_phase:
                tuned = (r.get("tuning") or {}).get("best_metrics") or {}
                gap = None
                if tuned.get("A_auc") is not None and m.get("A_auc") is not None:
                    gap = tuned["A_auc"] - m["A_auc"]
                cells = f" {_pct(tuned.get('A_auc'))} | {'–' if gap is None else f'{100 * gap:+.2f}'} |"
            lines.append(
                f"| {rank} | {r['name']} | {_pct(m.get('A_auc'))} | {_pct(m.get('A_last'))} | {_pct(m.get('A_avg'))} | "
                f"{_pct(m.get('F_last'))} |{cells} {r.get('run_s', 0):.1f} | {r['run_id']} |"
            )
    failed = [r for r in records if r.get("status") != "ok"]
    if failed:
        lines += ["", "## Failed runs", "", "| submission | status | reason | benchmark | run |", "|---|---|---|---|---|"]
        for r in failed:
            reason = str(r.get("reason", "")).replace("|", "/").replace("\n", " ")[:160]
            lines.append(f"| {r['name']} | {r['status']} | {reason} | {_track(r)['benchmark']} | {r['run_id']} |")
    return "\n".join(lines) + "\n"
