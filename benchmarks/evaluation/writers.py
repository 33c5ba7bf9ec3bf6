"""Result files of an evaluation: a tidy CSV, a JSON with summaries and rows, and the resolved
config, each written atomically (:func:`benchmarks.files.atomic_write`), so a reader or an
interrupted run never sees a half-written result.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.evaluation.results import ROW_FIELDS, EvalResult
from benchmarks.files import atomic_write_text, json_ready


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
        "json": atomic_write_text(out / f"{stem}.json", json.dumps(json_ready(payload), indent=2) + "\n"),
        "config": atomic_write_text(out / "config.json", json.dumps(json_ready(config), indent=2) + "\n"),
    }
