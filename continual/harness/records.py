"""Run records and the leaderboard: write-once files, atomic rewrites, nothing ever lost.

Layout under the results folder::

    runs/<run id>.json     one record per run (success or failure), never overwritten
    logs/<run id>.log      the tail of the submission's output
    leaderboard.md         rebuilt from all records after every run (atomic replace)
    .harness-key           the secret that signs records (mode 0600; or ``key_file``)

The records are the source of truth; the table is derived from them, so a crash between two
writes cannot lose an entry. The sandbox never shows this folder to a submission. Each record
carries an HMAC-SHA256 of its canonical JSON under the harness's secret key; the leaderboard
ranks only records whose signature verifies, and lists the others as rejected, so a record
written or edited by anyone without the key never reaches the table. Every text that reaches
the rendered table is escaped (:func:`cell`): control characters, table pipes, HTML and
Markdown markup cannot change its structure.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
import unicodedata
import uuid
import warnings
from collections.abc import Iterator, Sequence
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


#: the record field that holds its signature
SIGNATURE = "signature"


def _canonical(record: dict[str, Any]) -> bytes:
    body = {key: value for key, value in record.items() if key != SIGNATURE}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(record: dict[str, Any], key: bytes) -> str:
    return hmac.new(key, _canonical(record), hashlib.sha256).hexdigest()


def verified(record: dict[str, Any], key: bytes) -> bool:
    signature = record.get(SIGNATURE)
    return isinstance(signature, str) and hmac.compare_digest(signature, sign(record, key))


def load_key(path: str | Path) -> bytes:
    """The signing key at ``path``, created (32 random bytes, mode 0600) if absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(descriptor, "w") as stream:
            stream.write(secrets.token_hex(32))
    key = path.read_text().strip()
    if len(key) < 32:
        raise ValueError(f"the record key in {path} is too short")
    return key.encode()


class ResultsStore:
    """The results folder of a competition.

    Args:
        root: the folder.
        key_file: the secret that signs records (default ``root/.harness-key``).
    """

    def __init__(self, root: str | Path, key_file: str | Path | None = None) -> None:
        self.root = Path(root)
        self.runs = self.root / "runs"
        self.logs = self.root / "logs"
        self.leaderboard = self.root / "leaderboard.md"
        self.key_file = Path(key_file) if key_file else self.root / ".harness-key"
        self._key: bytes | None = None

    @property
    def key(self) -> bytes:
        if self._key is None:
            self._key = load_key(self.key_file)
        return self._key

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
        """Sign and publish a run record; never replaces an existing one (FileExistsError)."""
        path = self.runs / f"{record['run_id']}.json"
        signed = {**record, SIGNATURE: sign(record, self.key)}
        _atomic_write(path, json.dumps(signed, indent=1, sort_keys=True).encode(), exclusive=True)
        return path

    def write_log(self, run_id: str, text: bytes) -> Path:
        path = self.logs / f"{run_id}.log"
        _atomic_write(path, text, exclusive=True)
        return path

    def records(self) -> list[dict[str, Any]]:
        """All readable records whose signature verifies, oldest first."""
        return self.load()[0]

    def load(self) -> tuple[list[dict[str, Any]], list[str]]:
        """(verified records oldest first, names of the files rejected: unreadable, unsigned,
        forged or edited, or published under another run's name)."""
        found, rejected = [], []
        for path in sorted(self.runs.glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError, RecursionError) as error:
                warnings.warn(f"skipping unreadable record {path}: {error}", stacklevel=2)
                rejected.append(path.name)
                continue
            if not (isinstance(record, dict) and verified(record, self.key) and path.name == f"{record.get('run_id')}.json"):
                warnings.warn(f"skipping record {path}: its signature does not verify", stacklevel=2)
                rejected.append(path.name)
                continue
            found.append(record)
        return sorted(found, key=lambda r: str(r.get("finished_at", ""))), rejected

    def write_leaderboard(self) -> Path:
        """Rebuild ``leaderboard.md`` from every verified record (under the lock, atomically)."""
        with self.locked():
            records, rejected = self.load()
            _atomic_write(self.leaderboard, render_leaderboard(records, rejected).encode(), exclusive=False)
        return self.leaderboard


def _pct(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–"
    return f"{100 * float(value):.2f}"


_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}
#: characters that could end a table cell or start a link or code span inside one
_MARKDOWN = set("\\`[]|")


def cell(value: Any, limit: int = 160) -> str:
    """``value`` as the text of one Markdown table cell: control and format characters
    (newlines, carriage returns, escape sequences, bidirectional overrides) become spaces,
    HTML is entity-escaped and pipes, backslashes, backticks and brackets are backslash-escaped,
    so no text can end the cell, the row or the table, or inject a link, a code span or HTML.
    Cut to ``limit`` characters."""
    text = str(value)[:limit]
    out = []
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(" ")
        elif char in _HTML:
            out.append(_HTML[char])
        elif char in _MARKDOWN:
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)


#: the harness settings that make two runs comparable: the scenario (benchmark, tasks, stream
#: seed, subsets), the rules (experience size, evaluation period, budgets, threads) and whether
#: the run was sandboxed (an unsandboxed run is never ranked beside sandboxed ones).
TRACK_SETTINGS = (
    "benchmark", "data_part", "num_tasks", "seed", "train_per_class", "test_per_class", "experience_size", "eval_period",
    "time_budget_s", "memory_budget_mb", "threads", "unsafe_no_sandbox",
)


def track_of(config: dict[str, Any], scenario_sha256: str = "") -> dict[str, Any]:
    """The track of a run: its comparable settings and the checksum of its scenario."""
    track = {name: config.get(name) for name in TRACK_SETTINGS}
    track["unsafe_no_sandbox"] = bool(track["unsafe_no_sandbox"])
    track["scenario_sha256"] = scenario_sha256
    return track


def _track(record: dict[str, Any]) -> dict[str, Any]:
    # Records written before tracks existed carry only their config.
    track = record.get("track") or track_of(record.get("config", {}), record.get("scenario_sha256", ""))
    return track if isinstance(track, dict) else {}


def _describe(track: dict[str, Any]) -> str:
    parts = []
    for name, value in track.items():
        if name in ("benchmark", "tuning", "unsafe_no_sandbox"):
            continue
        if name == "scenario_sha256":
            value = str(value)[:12] or "unknown"
        parts.append(f"{name} {'all' if value is None else value}")
    tuning = track.get("tuning")
    if isinstance(tuning, dict):
        part = "" if tuning.get("data_part", "all") == "all" else f" half {tuning.get('data_part')}"
        trials = f", at most {tuning.get('max_trials')} trials" if tuning.get("max_trials") else ""
        budget = tuning.get("budget_s")
        parts.append(f"tuned on {tuning.get('benchmark')}{part} (scenario {str(tuning.get('scenario_sha256', ''))[:12]}) "
                     f"by {tuning.get('criterion')} within {budget:g} s{trials}" if isinstance(budget, (int, float))
                     else f"tuned on {tuning.get('benchmark')}{part}")
    return cell(" · ".join(parts), limit=2000)


def _metrics(record: dict[str, Any]) -> dict[str, Any]:
    metrics = record.get("metrics")
    return metrics if isinstance(metrics, dict) else {}


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def render_leaderboard(records: list[dict[str, Any]], rejected: Sequence[str] = ()) -> str:
    """Markdown: one ranked table per track (successful runs by A_auc, then A_last), then
    every failed run, then the record files that were rejected. Runs of different tracks are
    never ranked against each other; runs without the sandbox form tracks of their own,
    headed UNSANDBOXED. Every text from a record goes through :func:`cell`.

    Two-phase (tuning → evaluation) runs are ranked by their evaluation phase; their table
    also shows the tuning-phase A_auc of the frozen values and the gap between the two.
    """
    tracks: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("status") == "ok":
            tracks.setdefault(json.dumps(_track(r), sort_keys=True, default=str), []).append(r)
    lines = [
        "# Leaderboard",
        "",
        "One table per track (benchmark, scenario checksum and settings): runs are ranked only",
        "within their track, by A_auc (anytime accuracy), then A_last; accuracies in %, on the",
        "classes seen so far. Two-phase tracks rank by the evaluation phase. Only records signed",
        "by the harness are shown.",
    ]
    for number, (key, runs) in enumerate(sorted(tracks.items()), 1):
        track = json.loads(key)
        runs.sort(key=lambda r: (-_number(_metrics(r).get("A_auc")), -_number(_metrics(r).get("A_last"))))
        two_phase = isinstance(track.get("tuning"), dict)
        extra = " tuning A_auc | gap |" if two_phase else ""
        unsafe = " — UNSANDBOXED (the organiser ran these without the sandbox)" if track.get("unsafe_no_sandbox") else ""
        lines += [
            "",
            f"## Track {number}: {cell(track.get('benchmark'))}{unsafe}",
            "",
            _describe(track),
            "",
            f"| rank | submission | A_auc | A_last | A_avg | F_last |{extra} time (s) | run |",
            "|---:|---|---:|---:|---:|---:|" + ("---:|---:|" if two_phase else "") + "---:|---|",
        ]
        for rank, r in enumerate(runs, 1):
            m = _metrics(r)
            cells = ""
            if two_phase:
                tuned = (r.get("tuning") or {}).get("best_metrics") or {}
                gap = None
                if isinstance(tuned.get("A_auc"), (int, float)) and isinstance(m.get("A_auc"), (int, float)):
                    gap = tuned["A_auc"] - m["A_auc"]
                cells = f" {_pct(tuned.get('A_auc'))} | {'–' if gap is None else f'{100 * gap:+.2f}'} |"
            name = cell(r.get("name")) + (" (unsandboxed)" if track.get("unsafe_no_sandbox") else "")
            lines.append(
                f"| {rank} | {name} | {_pct(m.get('A_auc'))} | {_pct(m.get('A_last'))} | {_pct(m.get('A_avg'))} | "
                f"{_pct(m.get('F_last'))} |{cells} {_number(r.get('run_s')):.1f} | {cell(r.get('run_id'))} |"
            )
    failed = [r for r in records if r.get("status") != "ok"]
    if failed:
        lines += ["", "## Failed runs", "", "| submission | status | reason | benchmark | run |", "|---|---|---|---|---|"]
        for r in failed:
            lines.append(
                f"| {cell(r.get('name'))} | {cell(r.get('status'))} | {cell(r.get('reason', ''))} | "
                f"{cell(_track(r).get('benchmark'))} | {cell(r.get('run_id'))} |"
            )
    if rejected:
        lines += ["", "## Rejected record files", "",
                  "Unreadable, or not signed by this harness's key (forged or edited): never ranked.", ""]
        lines += [f"* {cell(name)}" for name in rejected]
    return "\n".join(lines) + "\n"
