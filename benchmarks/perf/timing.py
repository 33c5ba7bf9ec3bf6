"""Interleaved wall-clock timing and per-call peak memory.

Load on a shared machine drifts over seconds, so variants that are compared (a method and
plain inference) are timed in the same run, interleaved: every repeat times each variant
once, starting from a rotating position, and the ratio is taken per repeat (paired) before
the median over repeats. Each timed block runs enough calls to last at least ``min_time``
seconds; CUDA work is synchronised before the clock is read.

Peak memory of one call:

* CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the call;
* CPU: the peak of the CPU allocator's running total during the call, read from
  ``torch.profiler``'s memory events (tensors allocated by the call, not the process RSS,
  which the kernel cannot reset between variants).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

Call = Callable[[], object]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per call of one variant: one value per repeat."""

    name: str
    seconds: list[float] = field(default_factory=list)
    calls_per_repeat: int = 1

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def spread(self) -> float:
        """(max - min) / median over repeats: how noisy the measurement was."""
        if len(self.seconds) < 2:
            return 0.0
        return (max(self.seconds) - min(self.seconds)) / self.median


def _time_block(call: Call, calls: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        call()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def time_interleaved(
    calls: dict[str, Call],
    device: torch.device,
    *,
    repeats: int = 5,
    warmup: int = 2,
    min_time: float = 0.2,
    max_calls: int = 200,
) -> dict[str, Timing]:
    """Seconds per call of each variant, measured interleaved (see the module docstring)."""
    names = list(calls)
    per_block: dict[str, int] = {}
    for name in names:
        for _ in range(warmup):
            calls[name]()
        once = _time_block(calls[name], 1, device)
        per_block[name] = max(1, min(max_calls, math.ceil(min_time / max(once, 1e-9))))
    timings = {name: Timing(name, calls_per_repeat=per_block[name]) for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            timings[name].seconds.append(_time_block(calls[name], per_block[name], device))
    return timings


def paired_ratio(numerator: Timing, denominator: Timing) -> float:
    """Median over repeats of ``numerator / denominator`` measured in the same repeat."""
    pairs = [a / b for a, b in zip(numerator.seconds, denominator.seconds) if b > 0]
    return statistics.median(pairs) if pairs else float("nan")


def _cpu_allocation_peak(call: Call) -> float:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events: list[tuple[int, int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())  # type: ignore[union-attr]
    while stack:
        event = stack.pop()
        extra = event.extra_fields
        if type(extra).__name__ == "_ExtraFields_Allocation":
            events.append((event.start_time_ns, int(extra.total_allocated), int(extra.alloc_size)))
        stack.extend(event.children)
    if not events:
        return 0.0
    events.sort()
    start = events[0][1] - events[0][2]
    return max(total for _, total, _ in events) - start


def peak_memory_bytes(call: Call, device: torch.device) -> float:
    """Peak bytes allocated by one ``call()`` beyond what was allocated before it."""
    call()  # lazily created state (optimizer moments, caches) is not part of a step's peak
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    return float(_cpu_allocation_peak(call))
