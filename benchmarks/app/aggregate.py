"""Aggregate finished runs into tables: methods x settings, and per-domain errors.

A run's *method* is its method label (name plus explicit hyperparameters); its *setting* is
what it was evaluated on apart from the seed (model, dataset, schedule, label order, ...;
see :func:`benchmarks.app.runner.setting_of`). Runs that differ only in the seed are
replicates: a cell shows their mean (± standard deviation when there are several).
Settings are named by the fields that differ between them; the fields they share are
printed once above the tables.
"""

from __future__ import annotations

import csv
import io
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tta.registry import registered_methods
from tta.spec import split_name


def _key(setting: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple((k, "" if v is None else str(v)) for k, v in sorted(setting.items()))


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclass
class Cell:
    """The replicates (seeds) of one method on one setting."""

    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def values(self) -> list[float]:
        return [_num(r["summary"].get("mean_error")) for r in self.records]

    @property
    def mean(self) -> float:
        finite = [v for v in self.values if math.isfinite(v)]
        return float(np.mean(finite)) if finite else float("nan")

    @property
    def std(self) -> float:
        finite = [v for v in self.values if math.isfinite(v)]
        return float(np.std(finite, ddof=1)) if len(finite) > 1 else float("nan")

    def domain_errors(self) -> OrderedDict[str, float]:
        """Per-domain error averaged over the replicates, in stream order."""
        out: OrderedDict[str, list[float]] = OrderedDict()
        for record in self.records:
            for domain, error in (record["summary"].get("domain_errors") or {}).items():
                out.setdefault(domain, []).append(_num(error))
        return OrderedDict((d, float(np.mean(v))) for d, v in out.items())

    def curve(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(window mid-points, mean window error over replicates of equal length)."""
        curves = []
        for record in self.records:
            c = record["summary"].get("curve") or {}
            if c.get("error"):
                curves.append(c)
        if not curves:
            return None
        first = curves[0]
        same = [c for c in curves if len(c["error"]) == len(first["error"])]
        mids = (np.asarray(first["start"], dtype=float) + np.asarray(first["stop"], dtype=float)) / 2
        errors = np.nanmean(np.asarray([[_num(e) for e in c["error"]] for c in same], dtype=float), axis=0)
        return mids, errors


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


@dataclass
class Table:
    """All finished runs arranged as methods x settings."""

    methods: list[str]
    settings: list[tuple[tuple[str, str], ...]]
    setting_labels: dict[tuple[tuple[str, str], ...], str]
    setting_values: dict[tuple[tuple[str, str], ...], dict[str, Any]]
    common: dict[str, Any]
    cells: dict[tuple[str, tuple[tuple[str, str], ...]], Cell]

    def cell(self, method: str, setting: tuple[tuple[str, str], ...]) -> Cell | None:
        return self.cells.get((method, setting))

    @property
    def num_runs(self) -> int:
        return sum(len(c.records) for c in self.cells.values())


def _method_sort_key(label: str) -> tuple[int, str]:
    """Registry order (:func:`tta.registered_methods`): methods alone first, then compositions
    by their second part; names the registry does not know (older runs) last, by label."""
    order = registered_methods()
    name = label.split("(")[0]
    try:
        base = split_name(name)[-1]
    except ValueError:
        base = name
    if name in order:
        return order.index(name), label
    return len(order) + (order.index(base) if base in order else len(order)), label


def build_table(records: list[dict[str, Any]]) -> Table:
    if not records:
        raise ValueError("no runs to aggregate")
    settings: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
    cells: dict[tuple[str, tuple], Cell] = {}
    for record in records:
        setting = dict(record["setting"])
        key = _key(setting)
        settings.setdefault(key, setting)
        method = str(record["method"].get("label") or record["method"]["name"])
        cells.setdefault((method, key), Cell()).records.append(record)
    all_keys = sorted({k for s in settings.values() for k in s})
    varying = [k for k in all_keys if len({_fmt_value(s.get(k)) for s in settings.values()}) > 1]
    common = {k: settings[next(iter(settings))].get(k) for k in all_keys if k not in varying}
    common = {k: v for k, v in common.items() if v is not None}
    labels = {}
    for key, setting in settings.items():
        parts = [f"{k}={_fmt_value(setting.get(k))}" for k in varying if setting.get(k) is not None]
        labels[key] = ", ".join(parts) or _describe(setting)
    order = sorted(settings, key=lambda k: labels[k])
    methods = sorted({m for m, _ in cells}, key=_method_sort_key)
    return Table(methods, order, labels, dict(settings), common, cells)


def _describe(setting: dict[str, Any]) -> str:
    order = str(setting.get("label_order"))
    if setting.get("delta") is not None:
        order += f"(delta={_fmt_value(setting['delta'])})"
    return f"{setting.get('dataset')} {setting.get('schedule')} {order}"


def _pct(value: float, std: float = float("nan")) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{100 * value:.2f}" + (f" ± {100 * std:.2f}" if math.isfinite(std) else "")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def markdown(
    table: Table,
    *,
    sources: list[str],
    notes: list[str] | None = None,
    plots: dict[str, str] | None = None,
    title: str = "# tta-bench report",
) -> str:
    """The report as markdown: the methods x settings table, then per-domain tables."""
    lines = [title, ""]
    n_seeds = sorted({len(c.records) for c in table.cells.values()})
    lines.append(
        f"{_count(table.num_runs, 'finished run')}: {_count(len(table.methods), 'method')} x "
        f"{_count(len(table.settings), 'setting')}"
        + (f", {'/'.join(map(str, n_seeds))} seed(s) per cell" if n_seeds != [1] else "")
        + f". Sources: {', '.join(sources)}."
    )
    if table.common:
        lines += ["", "Common to all runs: " + ", ".join(f"{k}={_fmt_value(v)}" for k, v in table.common.items()) + "."]
    for note in notes or []:
        lines += ["", f"Note: {note}"]
    lines += [
        "",
        "## Mean online error (%): methods x settings",
        "",
        "Mean over domains of the online (predict-then-adapt) error; gradual streams: over "
        "(domain, severity) pairs. With several seeds: mean ± standard deviation.",
        "",
        _md_row(["method"] + [table.setting_labels[s] for s in table.settings]),
        _md_row(["---"] * (len(table.settings) + 1)),
    ]
    for method in table.methods:
        row = [method]
        for setting in table.settings:
            cell = table.cell(method, setting)
            row.append(_pct(cell.mean, cell.std) if cell else "")
        lines.append(_md_row(row))
    for setting in table.settings:
        domains: list[str] = []
        for method in table.methods:
            cell = table.cell(method, setting)
            if cell:
                domains += [d for d in cell.domain_errors() if d not in domains]
        lines += ["", f"## Per-domain error (%): {table.setting_labels[setting]}", ""]
        lines.append(_md_row(["method"] + domains + ["mean"]))
        lines.append(_md_row(["---"] * (len(domains) + 2)))
        for method in table.methods:
            cell = table.cell(method, setting)
            if not cell:
                continue
            errors = cell.domain_errors()
            lines.append(_md_row([method] + [_pct(errors[d]) if d in errors else "" for d in domains] + [_pct(cell.mean)]))
    if plots:
        lines += ["", "## Plots", ""]
        for title, name in plots.items():
            lines.append(f"![{title}]({name})")
    return "\n".join(lines) + "\n"


def summary_csv(tables: Table | list[Table]) -> str:
    """One row per (method, setting): mean error, replicates, per-domain errors. With several
    tables (protocol groups), a ``protocol_group`` column numbers them from 1."""
    tables = [tables] if isinstance(tables, Table) else list(tables)
    domains: list[str] = []
    for table in tables:
        for cell in table.cells.values():
            domains += [d for d in cell.domain_errors() if d not in domains]
    setting_keys = sorted({k for t in tables for s in t.setting_values.values() for k in s})
    group_column = ["protocol_group"] if len(tables) > 1 else []
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*group_column, "method", "setting", *setting_keys, "n_runs", "mean_error", "std_error", *[f"error_{d}" for d in domains]])
    for number, table in enumerate(tables, start=1):
        for method in table.methods:
            for setting in table.settings:
                cell = table.cell(method, setting)
                if not cell:
                    continue
                values = table.setting_values[setting]
                errors = cell.domain_errors()
                writer.writerow(
                    [*([number] if group_column else []), method, table.setting_labels[setting],
                     *["" if values.get(k) is None else values.get(k) for k in setting_keys],
                     len(cell.records), cell.mean, "" if not math.isfinite(cell.std) else cell.std,
                     *[errors.get(d, "") for d in domains]]
                )
    return buffer.getvalue()
