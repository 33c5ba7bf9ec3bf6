"""Where trained artefacts live: ``$TTA_CACHE_DIR`` or ``~/.cache/tta``, never the repo."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.data.folder import cache_dir as data_cache_dir


def cache_dir() -> Path:
    """The cache root (:func:`benchmarks.data.folder.cache_dir`), created if missing."""
    path = data_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Save through a temporary file in the same folder, so a crash leaves no partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
