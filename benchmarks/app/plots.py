"""Report plots (matplotlib, Agg; no display needed): error over the stream, per-domain bars.

Figures are built with :class:`matplotlib.figure.Figure` directly (no pyplot global state)
and saved through a temporary file, so a crash never leaves a truncated PNG.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np

from benchmarks.app.aggregate import Table
from benchmarks.files import atomic_write


def _grid(n: int) -> tuple[int, int]:
    cols = min(3, n)
    return math.ceil(n / cols), cols


def _title(label: str) -> str:
    return "\n".join(textwrap.wrap(label.replace(",", ", ").replace(",  ", ", "), 60)) or label


def _save(fig, path: Path) -> Path:  # noqa: ANN001 - matplotlib Figure
    with atomic_write(path, binary=True) as handle:
        fig.savefig(handle, dpi=110, bbox_inches="tight", format="png")
    return path


def _figure(n: int, width: float, height: float):  # noqa: ANN202
    from matplotlib.figure import Figure

    rows, cols = _grid(n)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def error_over_stream(table: Table, path: Path) -> Path:
    """One panel per setting: windowed online error (%) against samples seen, one line per method."""
    fig, axes = _figure(len(table.settings), 6.0, 3.6)
    for ax, setting in zip(axes, table.settings):
        boundaries: list[int] = []
        for method in table.methods:
            cell = table.cell(method, setting)
            curve = cell.curve() if cell else None
            if curve is None:
                continue
            mids, errors = curve
            ax.plot(mids, 100 * errors, label=method, linewidth=1.4, marker="o" if len(mids) <= 40 else None, markersize=3)
            if not boundaries:
                segments = cell.records[0]["summary"].get("segments") or []
                boundaries = [int(s["start"]) for s in segments[1:]]
        for b in boundaries:
            ax.axvline(b, color="0.8", linewidth=0.7, linestyle=":", zorder=0)
        ax.set_title(_title(table.setting_labels[setting]), fontsize=8)
        ax.set_xlabel("samples seen")
        ax.set_ylabel("online error (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Error over the stream", fontsize=11)
    return _save(fig, path)


def domain_bars(table: Table, path: Path) -> Path:
    """One panel per setting: grouped bars of the per-domain error (%), one bar per method."""
    fig, axes = _figure(len(table.settings), 7.0, 3.8)
    for ax, setting in zip(axes, table.settings):
        domains: list[str] = []
        per_method = {}
        for method in table.methods:
            cell = table.cell(method, setting)
            if cell:
                errors = cell.domain_errors()
                per_method[method] = errors
                domains += [d for d in errors if d not in domains]
        x = np.arange(len(domains))
        width = 0.8 / max(1, len(per_method))
        for i, (method, errors) in enumerate(per_method.items()):
            values = [100 * errors.get(d, float("nan")) for d in domains]
            ax.bar(x + (i - (len(per_method) - 1) / 2) * width, values, width, label=method)
        ax.set_xticks(x)
        ax.set_xticklabels(domains, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("online error (%)")
        ax.set_title(_title(table.setting_labels[setting]), fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Per-domain error", fontsize=11)
    return _save(fig, path)
