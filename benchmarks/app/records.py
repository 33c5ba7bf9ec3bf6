"""The completion record of a run (``run.json``) and finding finished runs on disk.

A run writes its result tables first (``results.csv``, ``results.json``, ``config.json``
through :func:`benchmarks.evaluation.write_results`) and ``run.json`` last, each atomically
(temporary file, fsync, ``os.replace``). ``run.json`` is therefore the completion marker: a
run killed at any point leaves either no ``run.json`` or a complete one, and the report
reads only runs that have it. It holds everything the report needs (summary, per-domain
errors, the error curve), so the report never parses a table a crash could have left stale.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.files import atomic_write_text, json_ready

logger = logging.getLogger(__name__)

RECORD_NAME = "run.json"
RECORD_FORMAT = "tta-bench-run"
RECORD_VERSION = 1


def write_record(out_dir: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """Write ``run.json`` atomically; call it after every other result file is written."""
    payload = {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **record,
    }
    return atomic_write_text(Path(out_dir) / RECORD_NAME, json.dumps(json_ready(payload), indent=2, sort_keys=False) + "\n")


class ForeignRecord(ValueError):
    """A ``run.json`` that was not written by this app."""


def read_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a ``run.json``; raises :class:`ForeignRecord` if it is not one of ours."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ForeignRecord(f"{path}: unreadable ({error})") from None
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
        raise ForeignRecord(f"{path}: not a tta-bench run record (no \"format\": \"{RECORD_FORMAT}\")")
    if int(data.get("version", 0)) > RECORD_VERSION:
        raise ForeignRecord(f"{path}: record version {data.get('version')} is newer than this code ({RECORD_VERSION})")
    for key in ("run_key", "method", "setting", "summary"):
        if key not in data:
            raise ForeignRecord(f"{path}: incomplete record (no {key!r})")
    data["_dir"] = str(path.parent)
    return data


def load_finished(out_dir: str | os.PathLike[str], identity: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a finished run of exactly this identity in ``out_dir``, else None."""
    path = Path(out_dir) / RECORD_NAME
    if not path.is_file():
        return None
    try:
        record = read_record(path)
    except ForeignRecord as error:
        logger.warning("ignoring %s", error)
        return None
    if json_ready(record.get("identity")) != json_ready(identity):
        logger.warning("%s belongs to a different config; running again", path)
        return None
    return record


@dataclass
class Scan:
    """Run folders found under some directories."""

    finished: list[dict[str, Any]] = field(default_factory=list)
    #: folders of runs that started (Hydra wrote ``.hydra/``) but never wrote ``run.json``
    unfinished: list[Path] = field(default_factory=list)
    #: ``run.json`` files that are not ours
    foreign: list[str] = field(default_factory=list)


def scan_runs(dirs: list[str | os.PathLike[str]], *, exclude: list[Path] | None = None) -> Scan:
    """Every run folder under ``dirs`` (recursively; hidden folders are skipped).

    Runs found twice (the same run key, e.g. a copied folder) are kept once.
    """
    scan = Scan()
    seen: set[str] = set()
    excluded = {p.resolve() for p in (exclude or [])}
    for root in dirs:
        for current, subdirs, files in os.walk(root):
            here = Path(current)
            subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and (here / d).resolve() not in excluded)
            if RECORD_NAME in files:
                try:
                    record = read_record(here / RECORD_NAME)
                except ForeignRecord as error:
                    scan.foreign.append(str(error))
                    continue
                if record["run_key"] in seen:
                    continue
                seen.add(record["run_key"])
                scan.finished.append(record)
            elif (here / ".hydra").is_dir():
                if _is_our_hydra_run(here / ".hydra"):
                    scan.unfinished.append(here)
                else:
                    scan.foreign.append(f"{here}: output of another Hydra app (no model/method/stream config)")
    return scan


def _is_our_hydra_run(hydra_dir: Path) -> bool:
    """Whether Hydra's saved job config is one of this app's (a started run of ours)."""
    try:
        import yaml

        config = yaml.safe_load((hydra_dir / "config.yaml").read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - unreadable or missing: Hydra had not written it yet
        return True
    return isinstance(config, dict) and {"model", "method", "stream"} <= set(config)
