"""The error type of the benchmark app.

It derives from Hydra's ``CompactHydraException``, so Hydra prints just its message (no
stack trace) when a run stops on it, and from ``ValueError`` for callers outside Hydra.
"""

from __future__ import annotations

from hydra.errors import CompactHydraException


class BenchConfigError(CompactHydraException, ValueError):
    """A configuration that cannot run: unknown method, bad hyperparameter, missing weights."""
