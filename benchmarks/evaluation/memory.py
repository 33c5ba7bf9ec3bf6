"""Peak memory of an evaluation run.

On CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak at the start, i.e. the
peak of tensors allocated during the run (the allocator's cache is not counted).
On the CPU: the process's peak resident set size from ``resource.getrusage``. The kernel
keeps one peak for the whole process lifetime and it cannot be reset, so it is an upper
bound that includes everything the process did before the run (imports, data loading).
"""

from __future__ import annotations

import sys

import torch

CUDA_KIND = "cuda_max_allocated"
CPU_KIND = "process_max_rss"


class PeakMemory:
    """Context manager that measures peak memory on ``device``; read :attr:`peak_mb` after."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.kind = CUDA_KIND if self.device.type == "cuda" else CPU_KIND
        self.peak_mb: float = float("nan")

    def __enter__(self) -> "PeakMemory":
        if self.kind == CUDA_KIND:
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_mb = self.read()

    def read(self) -> float:
        if self.kind == CUDA_KIND:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return process_peak_rss_mb()


def process_peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (NaN where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so wall-clock timings attribute work to the right step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
