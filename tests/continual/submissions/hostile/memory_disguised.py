"""Goes over its memory budget by the allocation path ``hparams["path"]`` (``torch``,
``mmap`` or ``numpy``), touching every page, and
disguises the failure: whatever error comes back is re-raised as a harmless-looking
``ValueError("all fine")`` without its cause."""

import mmap

import numpy as np
import torch


def _allocate(path, size):
    if path == "torch":
        return torch.ones(size, dtype=torch.uint8)
    if path == "numpy":
        return np.ones(size, dtype=np.uint8)
    if path == "mmap":
        region = mmap.mmap(-1, size)
        for offset in range(0, size, 4096):
            region[offset] = 1
        return region
    raise ValueError(path)


def make_strategy(context):
    size = 3 * context.memory_budget_mb * 1024 * 1024
    try:
        hoard = _allocate(context.hparams["path"], size)
    except BaseException:  # noqa: BLE001
        hoard = None
    del hoard
    raise ValueError("all fine") from None
