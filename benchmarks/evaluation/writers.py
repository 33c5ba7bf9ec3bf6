"""Atomic result files: a tidy CSV, a JSON with summaries and rows, and the resolved config.

Each file is written to a temporary file in the target directory, flushed to disk and then
moved over the final name with ``os.replace`` (atomic on POSIX and Windows), so a reader or
an interrupted run never sees a half-written result.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.evaluation.results import ROW_FIELDS, EvalResult


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temp file in the same folder, then replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name created with mode "x" (not mkstemp, which forces 0600) keeps the usual
    # umask-derived permissions of the final file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _jsonable(value: Any) -> Any:
    """Plain JSON values; NaN/inf become null (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # NumPy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def rows_to_csv(rows: Sequence[dict[str, Any]], fields: Sequence[str] = ROW_FIELDS) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    return buffer.getvalue()


def write_results(
    results: EvalResult | Sequence[EvalResult],
    out_dir: str | os.PathLike[str],
    *,
    config: dict[str, Any] | None = None,
    stem: str = "results",
    timing: bool = True,
) -> dict[str, Path]:
    """Write ``<stem>.csv``, ``<stem>.json`` and ``config.json`` into ``out_dir`` atomically.

    Args:
        results: one result, or one per stream of a multi-stream run.
        out_dir: target folder (created if missing).
        config: the full resolved configuration of the run; defaults to the results' own
            ``config`` (one entry per stream when there are several).
        stem: base name of the table files.
        timing: include wall-clock time, throughput and memory in the summaries. Without
            them the files depend only on the predictions and the config, so a resumed run
            writes the same bytes as an uninterrupted one.

    Returns:
        Paths of the written files, keyed ``"csv"``, ``"json"``, ``"config"``.
    """
    results = [results] if isinstance(results, EvalResult) else list(results)
    out = Path(out_dir)
    rows = [row for r in results for row in r.rows()]
    if config is None:
        config = results[0].config if len(results) == 1 else {"streams": {r.name: r.config for r in results}}
    payload = {"summaries": [r.summary(timing=timing) for r in results], "rows": rows}
    return {
        "csv": atomic_write_text(out / f"{stem}.csv", rows_to_csv(rows)),
        "json": atomic_write_text(out / f"{stem}.json", json.dumps(_jsonable(payload), indent=2) + "\n"),
        "config": atomic_write_text(out / "config.json", json.dumps(_jsonable(config), indent=2) + "\n"),
    }
