"""Result files: written atomically, holding plain JSON values.

:func:`atomic_write` is the one way this project writes a file that a reader, a resumed run
or a crash must never see half-written (result tables, run records, checkpoints, trained
models, decoded data, plots): the bytes go to a temporary file in the target folder, are
flushed to disk, and the file is moved over the final name with ``os.replace`` (atomic on
POSIX and Windows). A failure at any point leaves the previous file, or none, and no
temporary file. (The competition harness keeps its own write-once variant,
``continual/harness/records.py``.)

:func:`json_ready` is the one conversion of Python values into what ``json`` writes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_write(path: str | os.PathLike[str], *, binary: bool = False) -> Iterator[IO[Any]]:
    """A file handle whose content replaces ``path`` atomically when the block ends normally
    (the parent folder is created if missing)::

        with atomic_write(path, binary=True) as handle:
            torch.save(obj, handle)
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A unique name created with mode "x" (not mkstemp, which forces 0600) keeps the usual
    # umask-derived permissions of the final file.
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        if binary:
            handle: IO[Any] = open(temporary, "xb")
        else:
            handle = open(temporary, "x", encoding="utf-8", newline="")
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_write(path) as handle:
        handle.write(text)
    return Path(path)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch  # here: the other helpers serve processes that never load torch

    with atomic_write(path, binary=True) as handle:
        torch.save(obj, handle)


def json_ready(value: Any) -> Any:
    """``value`` as plain JSON values: mappings become dicts with str keys, lists and tuples
    lists, dataclasses dicts, enums their values, NumPy/torch scalars Python numbers, str
    subclasses (torch's version string) plain str, and NaN/inf ``None`` (JSON has no NaN)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_ready(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, Enum):
        return json_ready(value.value)
    if isinstance(value, str):
        return str(value)  # plain str: subclasses such as torch's TorchVersion do not unpickle safely
    if hasattr(value, "item") and callable(value.item):  # NumPy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
