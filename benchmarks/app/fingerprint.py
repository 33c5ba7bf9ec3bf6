"""The protocol block of a benchmark run (:mod:`benchmarks.protocol`), built from its
:class:`~benchmarks.app.spec.RunSpec`, the source model, the built method and the stream(s)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.app.models import Normalized, checkpoint_path, model_label
from benchmarks.app.preprocessing import input_protocol_fields
from benchmarks.app.source_data import SPLIT as SOURCE_SPLIT
from benchmarks.app.spec import RunSpec
from benchmarks.protocol import (
    COMPUTE_AWARE_ERROR,
    COMPUTE_AWARE_ERROR_DEFINITION,
    RESET_POLICIES,
    DataProtocol,
    InputProtocol,
    MethodProtocol,
    MetricProtocol,
    ModelProtocol,
    Protocol,
    SettingProtocol,
    code_sha256,
    normalization_layers,
    resolved_hparams,
    sha256_file,
    software_protocol,
    state_dict_sha256,
    stream_data_sha256,
    stream_order_sha256,
)

CORRUPTION_PACKAGE = "benchmarks.corruptions"


def _checkpoint_facts(path: Path | None) -> tuple[str | None, float | None]:
    """(sha256 of the weights file, the clean accuracy stored in it) when there is a file."""
    if path is None or not path.is_file():
        return None, None
    accuracy = None
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(content, dict) and isinstance(content.get("clean_accuracy"), (int, float)):
            accuracy = float(content["clean_accuracy"])
    except Exception:  # noqa: BLE001 - a file torch cannot read safely has no metadata for us
        pass
    return sha256_file(path), accuracy


def _digits_cache_file(spec: RunSpec) -> Path | None:
    """The cached digits model of a config without a checkpoint (where
    :func:`benchmarks.models.digits.digits_source_model` stores it)."""
    from benchmarks.models.digits import DigitsTrainConfig, digits_cache_file

    return digits_cache_file(DigitsTrainConfig(**dict(spec.model.kwargs)))


def model_protocol(spec: RunSpec, model: nn.Module, num_classes: int) -> ModelProtocol:
    inner = model.model if isinstance(model, Normalized) else model
    kind = getattr(spec.model.kind, "value", spec.model.kind)
    path = checkpoint_path(spec.model)
    if path is None and kind == "digits":
        path = _digits_cache_file(spec)
    file_sha, accuracy = _checkpoint_facts(path)
    return ModelProtocol(
        kind=str(kind),
        arch=spec.model.arch,
        label=model_label(spec.model),
        weights_sha256=state_dict_sha256(inner.state_dict()),
        checkpoint_sha256=file_sha,
        clean_accuracy=accuracy,
        normalization_layers=normalization_layers(inner),
        num_classes=num_classes,
    )


def _combined(hashes: Sequence[str]) -> str:
    return hashes[0] if len(hashes) == 1 else hashlib.sha256("".join(hashes).encode()).hexdigest()


def _generator(config: Any) -> tuple[str, str]:
    """(name, version) of what produced the corrupted images."""
    if config.source == "generate":
        return CORRUPTION_PACKAGE, "code-sha256:" + code_sha256(CORRUPTION_PACKAGE)
    from benchmarks.data.corrupted import CIFAR_C_DIRS, GENERATION_SIDECAR

    name = config.dataset.lower().removesuffix("_c").removesuffix("-c")
    root = Path(config.data_root or ".")
    folder = root if root.name == CIFAR_C_DIRS.get(name, "") else root / CIFAR_C_DIRS.get(name, "")
    sidecar = folder / GENERATION_SIDECAR
    if sidecar.is_file():
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        return str(meta.get("generator", "scripts/make_cifar_c.py")), str(meta.get("generator_version", "unversioned"))
    return f"{CIFAR_C_DIRS.get(name, name)} files (Hendrycks & Dietterich, 2019)", "official"


def data_protocol(spec: RunSpec, streams: Sequence[Any]) -> DataProtocol:
    config = spec.stream
    generator, version = _generator(config)
    sequence = tuple(config.severity_sequence())
    num_samples = sum(s.num_samples for s in streams)
    per_domain = num_samples // max(1, len(config.domains) * len(sequence) * config.replays)
    return DataProtocol(
        dataset=config.dataset,
        source=config.source,
        split=config.split,
        sha256=_combined([stream_data_sha256(s) for s in streams]),
        corruption_generator=generator,
        corruption_generator_version=version,
        corruption_seed=config.corruption_seed if config.source == "generate" else None,
        quantize=bool(config.quantize),
        domains=tuple(config.domains),
        severities=tuple(config.severities),
        severity_sequence=sequence,
        images_per_domain=int(per_domain),
        num_samples=int(num_samples),
    )


def setting_protocol(spec: RunSpec, streams: Sequence[Any]) -> SettingProtocol:
    config = spec.stream
    order = config.effective_label_order
    params: dict[str, Any] = {}
    if order == "dirichlet":
        params = {"delta": float(config.delta), "min_chunk": int(config.dirichlet_min_chunk)}
    params["seeding"] = config.seeding
    if config.imbalance_factor is not None:
        params["imbalance_factor"] = float(config.imbalance_factor)
        params["imbalance_order"] = config.imbalance_order
    schedule_params: dict[str, Any] = {}
    if config.recurrences > 1:
        schedule_params["recurrences"] = int(config.recurrences)
    if config.schedule == "ccc":
        schedule_params["walk"] = {
            "table_sha256": hashlib.sha256(Path(streams[0].config.walk_table).read_bytes()).hexdigest(),  # the table built
            "target": float(config.walk_target), "band": float(config.walk_band), "speed": int(config.walk_speed),
            "steps": int(config.walk_steps), "transition": int(config.walk_transition), "dwell": int(config.walk_dwell),
        }
    policy = RESET_POLICIES[config.schedule]
    if spec.num_streams > 1:
        policy += f" (the domains run as {spec.num_streams} parallel streams, each reset at its start)"
    return SettingProtocol(
        schedule=config.schedule,
        reset_policy=policy,
        label_order=order,
        label_order_params=params,
        batch_size=int(config.batch_size),
        num_streams=spec.num_streams,
        replays=int(config.replays),
        seeds={"run": spec.seed, "stream": int(config.seed), "corruption": int(config.corruption_seed)},
        order_sha256=_combined([stream_order_sha256(s) for s in streams]),
        schedule_params=schedule_params,
    )


def metric_protocol(spec: RunSpec) -> MetricProtocol:
    averaging = (
        "mean over (domain, severity) pairs of the online error"
        if spec.stream.schedule == "gradual"
        else "mean over domains of the per-domain online error (all samples of a domain pooled)"
    )
    common = {"averaging": averaging, "ece_bins": int(spec.eval.n_bins), "window": int(spec.eval.window)}
    if spec.eval.online_eta is None:
        return MetricProtocol(**common)
    cost = "measured on every adapting batch" if spec.eval.step_cost is None else f"declared {float(spec.eval.step_cost):g}"
    return MetricProtocol(
        name=COMPUTE_AWARE_ERROR,
        definition=f"{COMPUTE_AWARE_ERROR_DEFINITION} (eta {float(spec.eval.online_eta):g}; step cost {cost})",
        **common,
    )


def build_protocol(spec: RunSpec, model: nn.Module, method: Any, streams: Sequence[Any]) -> Protocol:
    """The protocol of a run whose source ``model``, built ``method`` and ``streams`` exist."""
    return Protocol(
        model=model_protocol(spec, model, int(spec.model.num_classes or spec.num_classes)),
        input=InputProtocol(**input_protocol_fields(spec.model, spec.image_size)),
        data=data_protocol(spec, streams),
        setting=setting_protocol(spec, streams),
        metric=metric_protocol(spec),
        method=MethodProtocol(name=spec.method, hparams=_with_wrapper(resolved_hparams(method), spec)),
        software=software_protocol(spec.device),
    )


def _with_wrapper(hparams: dict[str, Any], spec: RunSpec) -> dict[str, Any]:
    """The method's hyperparameters, plus the wrapper's periodic reset and the source data the
    app gave the method, each as a part of its own when it is on (absent otherwise, so results
    without them keep their fingerprints)."""
    out = dict(hparams)
    if spec.reset_every is not None:
        out["wrapper"] = {"reset_every": spec.reset_every}
    if spec.source_images is not None:
        out["source_data"] = {"split": SOURCE_SPLIT, "images": int(spec.source_images), "order_seed": spec.seed}
    return out
