"""Targets of the performance issue and Markdown tables of a run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

from benchmarks.perf.corruption_speed import GPU_TARGET_IMAGES_PER_SECOND, CorruptionRow
from benchmarks.perf.methods import MethodRow
from benchmarks.perf.models import MODELS
from benchmarks.perf.multistream import GPU_TARGET_SPEEDUP, MultiStreamRow

#: method -> (CPU limit, CUDA limit) on the time ratio method / plain inference at the target
#: batch size; ``sar`` is limited relative to ``tent`` instead.
RATIO_TARGETS: dict[str, tuple[float, float]] = {
    "norm": (1.25, 1.10),
    "alpha_bn": (1.25, 1.10),
    "unmix_tns": (1.5, 1.35),
    "tent": (3.2, 3.2),
}
SAR_VS_TENT = 2.1
STATISTICS = ("norm", "alpha_bn", "unmix_tns")


@dataclass
class TargetCheck:
    target: str
    scope: str
    measured: str
    met: str  # "yes", "no", "not measured", "n/a"

    def to_dict(self) -> dict[str, str]:
        return dict(target=self.target, scope=self.scope, measured=self.measured, met=self.met)


def _fmt(value: float, digits: int = 2, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}{suffix}"
    return f"{value:.{digits}f}{suffix}"


def _device_type(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def check_targets(
    method_rows: list[MethodRow],
    corruption_rows: list[CorruptionRow],
    stream_rows: list[MultiStreamRow],
    *,
    measured_devices: Iterable[str],
    target_batch: int = 64,
) -> list[TargetCheck]:
    measured = {_device_type(d) for d in measured_devices}
    checks: list[TargetCheck] = []
    models = sorted({r.model for r in method_rows}, key=list(MODELS).index)
    for kind in ("cpu", "cuda"):
        rows = [r for r in method_rows if _device_type(r.device) == kind and r.batch_size == target_batch]
        for method, limits in RATIO_TARGETS.items():
            limit = limits[0] if kind == "cpu" else limits[1]
            label = f"{method} <= {limit:g}x plain ({kind.upper()}, batch {target_batch})"
            if kind not in measured:
                checks.append(TargetCheck(label, "all models", "not measured (no GPU in this run)" if kind == "cuda" else "not measured", "not measured"))
                continue
            for model in models:
                row = next((r for r in rows if r.model == model and r.method == method), None)
                if row is None:
                    checks.append(TargetCheck(label, model, f"not measured (batch {target_batch} not run)", "not measured"))
                elif row.status != "ok":
                    checks.append(TargetCheck(label, model, row.status, "n/a"))
                else:
                    checks.append(TargetCheck(label, model, f"{row.ratio:.2f}x", "yes" if row.ratio <= limit else "no"))
        label = f"sar <= {SAR_VS_TENT:g}x tent ({kind.upper()}, batch {target_batch})"
        if kind not in measured:
            checks.append(TargetCheck(label, "all models", "not measured (no GPU in this run)" if kind == "cuda" else "not measured", "not measured"))
        else:
            for model in models:
                row = next((r for r in rows if r.model == model and r.method == "sar"), None)
                if row is None or row.status != "ok" or math.isnan(row.vs_tent):
                    checks.append(TargetCheck(label, model, row.status if row else "not measured", "n/a" if row else "not measured"))
                else:
                    checks.append(TargetCheck(label, model, f"{row.vs_tent:.2f}x", "yes" if row.vs_tent <= SAR_VS_TENT else "no"))
    # corruptions
    cpu_rows = [r for r in corruption_rows if _device_type(r.device) == "cpu" and r.status == "ok"]
    label = "corruptions (CPU): faster than the per-image NumPy reference, every corruption"
    if not cpu_rows:
        checks.append(TargetCheck(label, "15 corruptions", "not measured", "not measured"))
    else:
        compared = [r for r in cpu_rows if not math.isnan(r.speedup)]
        slow = [r.name for r in compared if r.speedup <= 1.0]
        missing = 15 - len(compared)
        worst = min(compared, key=lambda r: r.speedup) if compared else None
        text = f"{len(compared)} compared, slowest x{worst.speedup:.1f} ({worst.name})" if worst else "none compared"
        if slow:
            text += f"; slower: {', '.join(slow)}"
        if missing:
            text += f"; {missing} not compared"
        checks.append(TargetCheck(label, f"batch {cpu_rows[0].batch_size}", text, "yes" if compared and not slow and not missing else "no"))
    gpu_rows = [r for r in corruption_rows if _device_type(r.device) == "cuda" and r.status == "ok"]
    label = f"corruptions (GPU): >= {GPU_TARGET_IMAGES_PER_SECOND:,.0f} img/s at batch 1024, every 32x32 corruption"
    if not gpu_rows:
        checks.append(TargetCheck(label, "15 corruptions", "not measured (no GPU in this run)", "not measured"))
    else:
        worst = min(gpu_rows, key=lambda r: r.images_per_second)
        ok = len(gpu_rows) == 15 and worst.images_per_second >= GPU_TARGET_IMAGES_PER_SECOND and gpu_rows[0].batch_size == 1024
        checks.append(TargetCheck(label, f"batch {gpu_rows[0].batch_size}", f"slowest {worst.images_per_second:,.0f} img/s ({worst.name})", "yes" if ok else "no"))
    label = f"multi-stream evaluation of the 15 corruptions (GPU): >= {GPU_TARGET_SPEEDUP:g}x sequential"
    gpu_streams = [r for r in stream_rows if _device_type(r.device) == "cuda" and r.status == "ok"]
    if not gpu_streams:
        checks.append(TargetCheck(label, "norm, unmix_tns", "not measured (no GPU in this run)", "not measured"))
    for row in gpu_streams:
        checks.append(TargetCheck(label, row.method, f"x{row.speedup:.2f}", "yes" if row.speedup >= GPU_TARGET_SPEEDUP else "no"))
    for row in stream_rows:
        if _device_type(row.device) == "cpu" and row.status == "ok":
            checks.append(TargetCheck("multi-stream evaluation (CPU, reported; no target)", row.method, f"x{row.speedup:.2f}", "n/a"))
    return checks


def methods_table(rows: list[MethodRow]) -> str:
    lines = []
    groups: dict[tuple[str, str, int], list[MethodRow]] = {}
    for row in rows:
        groups.setdefault((row.device, row.model, row.input_size), []).append(row)
    for (device, model, size), group in groups.items():
        label = MODELS[model].label if model in MODELS else model
        lines.append(f"\n**{label}, {size}x{size} input, {device.upper()}**\n")
        lines.append("| batch | method | img/s | plain img/s | time ratio | peak MiB | plain peak MiB | memory ratio |")
        lines.append("|---:|---|---:|---:|---:|---:|---:|---:|")
        for row in group:
            if row.status != "ok":
                lines.append(f"| {row.batch_size} | {row.method} | {row.status} | | | | | |")
                continue
            ratio = f"**{row.ratio:.2f}x**"
            if row.method == "sar" and not math.isnan(row.vs_tent):
                ratio += f" ({row.vs_tent:.2f}x tent)"
            lines.append(
                f"| {row.batch_size} | {row.method} | {_fmt(row.images_per_second, 1)} | {_fmt(row.plain_images_per_second, 1)} | "
                f"{ratio} | {_fmt(row.peak_bytes / 2**20, 1)} | {_fmt(row.plain_peak_bytes / 2**20, 1)} | {_fmt(row.memory_ratio)}x |"
            )
    return "\n".join(lines)


def targets_table(checks: list[TargetCheck]) -> str:
    lines = ["| target | scope | measured | met |", "|---|---|---|---|"]
    for check in checks:
        lines.append(f"| {check.target} | {check.scope} | {check.measured} | {check.met} |")
    return "\n".join(lines)


def corruptions_table(rows: list[CorruptionRow]) -> str:
    if not rows:
        return "(not measured)"
    lines = [
        f"Ours: batch {rows[0].batch_size}, {rows[0].size}x{rows[0].size}, severity {rows[0].severity}, {rows[0].device.upper()}. "
        f"Reference: `imagecorruptions` (ImageNet-C parameters), one image at a time ({rows[0].reference_images} images per block), CPU.\n",
        "| corruption | ours img/s | reference img/s | speed-up | faster |",
        "|---|---:|---:|---:|---|",
    ]
    for row in rows:
        if row.status != "ok":
            lines.append(f"| {row.name} | {row.status} | | | |")
            continue
        ref = _fmt(row.reference_images_per_second, 1) if row.reference_status == "ok" else row.reference_status
        faster = "–" if math.isnan(row.speedup) else ("yes" if row.speedup > 1 else "no")
        lines.append(f"| {row.name} | {_fmt(row.images_per_second, 0)} | {ref} | {_fmt(row.speedup, 1, 'x')} | {faster} |")
    return "\n".join(lines)


def streams_table(rows: list[MultiStreamRow]) -> str:
    if not rows:
        return "(not measured)"
    lines = [
        "| device | model | method | streams x batches x batch | sequential s | batched s | sequential img/s | batched img/s | speed-up |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row.status != "ok":
            lines.append(f"| {row.device} | {row.model} | {row.method} | {row.status} | | | | | |")
            continue
        d = row.to_dict()
        lines.append(
            f"| {row.device} | {row.model} | {row.method} | {row.num_streams} x {row.batches_per_stream} x {row.batch_size} | "
            f"{row.sequential_seconds:.2f} | {row.batched_seconds:.2f} | {_fmt(d['sequential_images_per_second'], 0)} | "
            f"{_fmt(d['batched_images_per_second'], 0)} | **{row.speedup:.2f}x** |"
        )
    return "\n".join(lines)


def profile_tables(profile: dict[str, Any]) -> str:
    lines: list[str] = []
    for device, section in profile.items():
        lines.append(f"\n**{device.upper()}: {section.get('model')} batch {section.get('batch_size')}**\n")
        lines.append("| method | host-sync operators per step | ATen ops per step (plain: %s) | RSS growth over %s steps (batch %s) | live tensors (start -> end) |"
                     % (_fmt(section.get("plain_ops"), 0), section.get("long_stream_steps", "–"), section.get("long_stream_batch", "–")))
        lines.append("|---|---|---:|---:|---|")
        for method, info in section.get("methods", {}).items():
            syncs = info.get("syncs")
            sync_text = "none" if syncs == {} else (", ".join(f"{k} x{v:g}" for k, v in syncs.items()) if syncs else "–")
            growth = info.get("memory", {})
            rss = _fmt(growth.get("rss_growth_mib"), 1, " MiB") if growth else "–"
            tensors = " -> ".join(str(t) for t in growth.get("live_tensors", [])) or "–"
            lines.append(f"| {method} | {sync_text} | {_fmt(info.get('ops'), 0)} | {rss} | {tensors} |")
        compiled = section.get("compile")
        if compiled:
            lines.append("\n| method | eager ms | compiled ms | speed-up | compiled plain ms | compiled ratio | compile s | graph breaks | max output diff |")
            lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for method, info in compiled.items():
                if "error" in info:
                    lines.append(f"| {method} | error: {info['error'][:80]} | | | | | | | |")
                    continue
                plain_ms = info.get("plain_compiled_seconds", float("nan")) * 1e3
                lines.append(
                    f"| {method} | {info['eager_seconds'] * 1e3:.1f} | {info['compiled_seconds'] * 1e3:.1f} | "
                    f"{info['speedup']:.2f}x | {_fmt(plain_ms, 1)} | {_fmt(info.get('compiled_ratio_vs_compiled_plain', float('nan')))}x | "
                    f"{info['compile_seconds']:.0f} | {info['graph_breaks']} | {info['max_output_diff']:.1e} |"
                )
    return "\n".join(lines)
