"""Where trained artefacts live: ``$TTA_CACHE_DIR`` or ``~/.cache/tta``, never the repo."""

from __future__ import annotations

from pathlib import Path

from benchmarks.data.folder import cache_dir as data_cache_dir


def cache_dir() -> Path:
    """The cache root (:func:`benchmarks.data.folder.cache_dir`), created if missing."""
    path = data_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path
