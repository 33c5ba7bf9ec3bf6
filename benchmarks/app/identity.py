"""Run identity: a stable key for "the same run", independent of Hydra's timestamps.

A run is identified by its fully resolved task config minus the keys that do not change
what it computes (:data:`benchmarks.app.schema.NON_IDENTITY_KEYS`). Its output folder is
``<output_root>/<name>/<method>-<key>``, so re-running a sweep maps every job back to the
folder of its earlier attempt, where a finished result is found and skipped.

The OmegaConf resolvers registered here are used by ``conf/config.yaml``:

* ``${tta.run_id:}``: ``<method name>-<10 hex digits of the identity hash>``;
* ``${tta.abspath:PATH}``: PATH made absolute against the directory Hydra was started from
  (so workers of remote launchers write where the driver meant);
* ``${tta.cache_dir:}``: ``$TTA_CACHE_DIR`` or ``~/.cache/tta`` (trained models);
* ``${tta.shared_data:}``: ``$TTA_SHARED_DATA`` or ``<repo>/../shared/data`` (local datasets,
  :func:`benchmarks.data.folder.shared_data_dir`);
* ``${tta.weights:NAME}``: the committed ``weights/NAME.pt``, else ``<cache>/models/NAME.pt``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from benchmarks.app.schema import IDENTITY_NEUTRAL_DEFAULTS, NON_IDENTITY_KEYS

KEY_LENGTH = 10


def plain_values(value: Any) -> Any:
    """Config values as plain Python: enums by their value, dicts with str keys, lists."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): plain_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_values(v) for v in value]
    return value


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config that defines what a run computes (a plain, JSON-ready dict)."""
    out: dict[str, Any] = {}
    top_excluded = {k for k in NON_IDENTITY_KEYS if "." not in k}
    for key in cfg.keys():
        if key == "hydra" or key in top_excluded:
            continue
        node = cfg[key]  # keeps the parent link, so interpolations to other nodes resolve
        out[str(key)] = plain_values(OmegaConf.to_container(node, resolve=True, enum_to_str=True)) if OmegaConf.is_config(node) else plain_values(node)
    for dotted in NON_IDENTITY_KEYS:
        parent, _, leaf = dotted.rpartition(".")
        if parent and isinstance(out.get(parent), dict):
            out[parent].pop(leaf, None)
    for dotted, neutral in IDENTITY_NEUTRAL_DEFAULTS.items():
        parent, _, leaf = dotted.rpartition(".")
        if isinstance(out.get(parent), dict) and leaf in out[parent] and out[parent][leaf] == neutral:
            del out[parent][leaf]
    return out


def run_key(ident: dict[str, Any]) -> str:
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:KEY_LENGTH]


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text`` ("unmix_tns+tent" stays readable)."""
    return re.sub(r"[^A-Za-z0-9._+=-]+", "_", text).strip("._") or "run"


def run_id(cfg: DictConfig) -> str:
    ident = identity(cfg)
    method = ident.get("method", {}).get("name", "run") if isinstance(ident.get("method"), dict) else "run"
    return f"{safe_name(str(method))}-{run_key(ident)}"


def _resolve_run_id(*, _root_: DictConfig) -> str:
    return run_id(_root_)


def launch_dir() -> Path:
    """The directory the app was started from (Hydra's ``runtime.cwd``), else the cwd."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return Path(HydraConfig.get().runtime.cwd)
    except Exception:  # noqa: BLE001 - outside a Hydra app
        pass
    return Path.cwd()


def abspath(path: str | os.PathLike[str]) -> str:
    p = Path(os.path.expanduser(str(path)))
    return str(p if p.is_absolute() else (launch_dir() / p))


def default_cache_dir() -> str:
    """``$TTA_CACHE_DIR`` or ``~/.cache/tta``, without creating it."""
    from benchmarks.data.folder import cache_dir

    return str(cache_dir())


def default_shared_data() -> str:
    from benchmarks.data.folder import shared_data_dir

    return str(shared_data_dir())


def committed_or_cached(name: str) -> str:
    """``weights/<name>.pt`` when the repository holds it, else ``<cache>/models/<name>.pt``
    (:mod:`benchmarks.models.weights`)."""
    from benchmarks.models.weights import resolve

    return resolve(name, default_cache_dir())


def register_resolvers() -> None:
    """Register the ``tta.*`` resolvers (idempotent; needed in every process that composes
    or resolves a config, which importing :mod:`benchmarks.app` guarantees)."""
    for name, fn in (
        ("tta.run_id", _resolve_run_id),
        ("tta.abspath", abspath),
        ("tta.cache_dir", default_cache_dir),
        ("tta.shared_data", default_shared_data),
        ("tta.weights", committed_or_cached),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
