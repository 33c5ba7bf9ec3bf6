"""Performance benchmarks: ``python -m benchmarks.perf`` (see ``docs/PERFORMANCE.md``).

Sections: method throughput and peak memory next to plain inference of the same model
(:mod:`benchmarks.perf.methods`), corruption generation vs the per-image NumPy reference
(:mod:`benchmarks.perf.corruption_speed`), batched multi-stream vs sequential evaluation
(:mod:`benchmarks.perf.multistream`) and torch.profiler checks of the hot path
(:mod:`benchmarks.perf.profiling`).
"""

from benchmarks.perf.cli import main

__all__ = ["main"]
