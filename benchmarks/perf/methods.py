"""Method throughput next to plain inference of the same model, measured in the same run.

For every (device, model, batch size): plain inference (the model in eval mode under
``torch.inference_mode``) and every method (``tta.adapt(model, method)``, called as
``adapted(x)``: one online step that predicts and adapts) are timed interleaved
(:func:`benchmarks.perf.timing.time_interleaved`); the figure is the paired time ratio
method / plain. SAR is also compared with TENT from the same run.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

import tta
from benchmarks.perf.models import MODELS, build_model
from benchmarks.perf.timing import paired_ratio, peak_memory_bytes, time_interleaved
from tta.registry import UnknownMethod, method_class
from tta.spec import split_name

PLAIN = "plain"


@dataclass
class MethodRow:
    device: str
    model: str
    input_size: int
    batch_size: int
    method: str
    status: str = "ok"  # "ok", "n/a: <reason>" or "error: <message>"
    seconds: float = float("nan")
    plain_seconds: float = float("nan")
    ratio: float = float("nan")  # paired time ratio method / plain
    spread: float = float("nan")
    peak_bytes: float = float("nan")
    plain_peak_bytes: float = float("nan")
    vs_tent: float = float("nan")  # paired time ratio method / tent (SAR's target)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.batch_size / self.seconds if self.seconds > 0 else float("nan")

    @property
    def plain_images_per_second(self) -> float:
        return self.batch_size / self.plain_seconds if self.plain_seconds > 0 else float("nan")

    @property
    def memory_ratio(self) -> float:
        if self.plain_peak_bytes and self.plain_peak_bytes > 0:
            return self.peak_bytes / self.plain_peak_bytes
        return float("nan")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            images_per_second=self.images_per_second,
            plain_images_per_second=self.plain_images_per_second,
            memory_ratio=self.memory_ratio,
        )
        return out


def _na_reason(error: Exception) -> str:
    text = str(error).split(";")[0].split("\n")[0]
    return text[:90]


#: batches of synthetic labelled source data given to methods that read some at wrap time
SOURCE_BATCHES = 4


def source_data_for(name: str, model: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Synthetic labelled source data (random images of ``x``'s shape, random labels) for a
    method that reads source data when it is wrapped (its ``source_data_argument``): the perf
    models have random weights, so real data would measure nothing more; what is timed is the
    step, not the wrap."""
    try:
        parts = [method_class(part) for part in split_name(name)]
    except UnknownMethod:
        return {}
    arguments = [part.source_data_argument for part in parts if part.source_data_argument]
    if not arguments:
        return {}
    with torch.inference_mode():
        num_classes = int(model(x[:1]).shape[1])
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.rand(x.shape, generator=generator).to(x.device),
         torch.randint(0, num_classes, (x.shape[0],), generator=generator).to(x.device))
        for _ in range(SOURCE_BATCHES)
    ]
    return {arguments[0]: batches}


def build_variants(
    model: torch.nn.Module, x: torch.Tensor, methods: Sequence[str]
) -> tuple[dict[str, Callable[[], object]], dict[str, str]]:
    """Callables for plain inference and each applicable method (default hyperparameters),
    and n/a reasons."""

    def plain() -> object:
        with torch.inference_mode():
            return model(x)

    calls: dict[str, Callable[[], object]] = {PLAIN: plain}
    skipped: dict[str, str] = {}
    for name in methods:
        try:
            adapted = tta.adapt(model, name, **source_data_for(name, model, x))
        except UnknownMethod:
            skipped[name] = "n/a: method not registered in this checkout"
            continue
        except ValueError as error:
            skipped[name] = f"n/a: {_na_reason(error)}"
            continue
        calls[name] = (lambda a: (lambda: a(x)))(adapted)
    return calls, skipped


def measure_methods(
    device: torch.device,
    model_names: list[str],
    batch_sizes: list[int],
    methods: Sequence[str],
    *,
    sizes: dict[str, int] | None = None,
    repeats: int = 5,
    warmup: int = 2,
    min_time: float = 0.2,
    memory: bool = True,
    log: Callable[[str], None] = print,
) -> list[MethodRow]:
    rows: list[MethodRow] = []
    for model_name in model_names:
        spec = MODELS[model_name]
        size = spec.size(device, (sizes or {}).get(model_name))
        base_model = build_model(model_name, device, size)
        for batch_size in batch_sizes:
            torch.manual_seed(0)
            x = torch.rand(batch_size, 3, size, size, device=device)
            model = copy.deepcopy(base_model)
            calls, skipped = build_variants(model, x, methods)
            try:
                timings = time_interleaved(calls, device, repeats=repeats, warmup=warmup, min_time=min_time)
            except Exception as error:  # noqa: BLE001 - one failing method must not end the sweep
                timings = {}
                log(f"  timing failed for {model_name} batch {batch_size}: {error!r}")
            plain = timings.get(PLAIN)
            plain_peak = peak_memory_bytes(calls[PLAIN], device) if memory and plain else float("nan")
            for name in methods:
                row = MethodRow(str(device), model_name, size, batch_size, name)
                if name in skipped:
                    row.status = skipped[name]
                elif name not in timings or plain is None:
                    row.status = "error: timing failed"
                else:
                    timing = timings[name]
                    row.seconds = timing.median
                    row.plain_seconds = plain.median
                    row.ratio = paired_ratio(timing, plain)
                    row.spread = timing.spread
                    row.plain_peak_bytes = plain_peak
                    if memory:
                        try:
                            row.peak_bytes = peak_memory_bytes(calls[name], device)
                        except Exception as error:  # noqa: BLE001
                            row.extra["memory_error"] = repr(error)
                    if "tent" in timings and name != "tent":
                        row.vs_tent = paired_ratio(timing, timings["tent"])
                rows.append(row)
                log(_progress_line(row))
            del calls, model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _progress_line(row: MethodRow) -> str:
    head = f"  {row.device} {row.model}@{row.input_size} b={row.batch_size:<4} {row.method:<10}"
    if row.status != "ok":
        return f"{head} {row.status}"
    return (
        f"{head} {row.images_per_second:9.1f} img/s  plain {row.plain_images_per_second:9.1f} img/s"
        f"  ratio {row.ratio:5.2f}x  peak {row.peak_bytes / 2**20:8.1f} MiB"
        f" (plain {row.plain_peak_bytes / 2**20:.1f})"
    )
