"""The calibration table of a ``ccc`` stream, made by the app when the config names none.

A continuously changing stream walks over the (corruption, severity) states whose accuracy for
the *source model* lies near a target (:mod:`benchmarks.streams.ccc`), so its table belongs to
one model and one dataset. With ``stream.schedule=ccc`` and ``stream.walk_table=null`` the app
measures the table on the first :data:`CALIBRATION_IMAGES` clean images of the stream's pool
(every corruption of ``stream.domains`` at severities 1-5, the stream's corruption seed) and
caches it under ``<cache_dir>/ccc_tables/``, keyed by the model's weights and everything else
the table depends on, so a sweep measures it once per model. Without a cache hit this costs
``5 x len(domains)`` passes over those images (about a minute for 15 corruptions of a
ResNet-26 on one CPU core).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from benchmarks.filelock import exclusive_lock

logger = logging.getLogger(__name__)

#: clean images the table is measured on (CCC calibrates on a few hundred per state)
CALIBRATION_IMAGES = 512
SEVERITIES = (1, 2, 3, 4, 5)
#: the ``walk_table`` value the app replaces with the measured table (it is never a file)
AUTO = "auto"


def weights_sha256(model: torch.nn.Module) -> str:
    """A digest of every parameter and buffer of ``model`` (names, dtypes, shapes, values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def table_key(model: torch.nn.Module, stream: Any) -> dict[str, Any]:
    """Everything the table depends on."""
    return {
        "weights_sha256": weights_sha256(model),
        "dataset": stream.dataset,
        "split": stream.split,
        "image_size": stream.image_size,
        "corruptions": sorted(stream.domains),
        "severities": list(SEVERITIES),
        "corruption_seed": int(stream.corruption_seed),
        "images": CALIBRATION_IMAGES,
    }


def ensure_table(model: torch.nn.Module, stream: Any, cache_dir: str | Path) -> Path:
    """The path of the calibration table of ``model`` for ``stream`` (a ``StreamConfig``),
    measured and cached first if no run has done so yet."""
    from benchmarks.corruptions import corrupt
    from benchmarks.streams.ccc import calibrate, save_table
    from benchmarks.streams.sources import resolve_source

    key = table_key(model, stream)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / "ccc_tables" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(path.with_suffix(".lock")):
        if path.is_file():
            return path
        clean = resolve_source(stream).load(stream.domains[0], SEVERITIES[0])
        count = min(CALIBRATION_IMAGES, len(clean.labels))
        images = clean.to_tensor()[:count].to(stream.device)
        labels = torch.as_tensor(clean.labels[:count]).to(stream.device)
        logger.info("calibrating the ccc walk: %d states on %d clean images (cached in %s)",
                    len(stream.domains) * len(SEVERITIES), count, path)
        table = calibrate(model, images, labels, corrupt, list(stream.domains), SEVERITIES, seed=int(stream.corruption_seed))
        save_table(table, path, **key)
    return path
