"""The protocol fingerprint of a result: everything a number depends on, typed and versioned.

"I cannot reproduce your number" usually means two results differ in something nobody
recorded: the weights, the preprocessing, the subset of the data, the reset policy, error
versus accuracy, the library versions. Every run record of this project (``run.json`` of
the Hydra app, the continual experiments, the harness records, ``benchmarks.perf``) carries a
``protocol`` block built from the dataclasses below:

* :class:`ModelProtocol`: architecture, sha256 of the checkpoint file and of the weights,
  clean accuracy (as stored with the checkpoint), the normalization layers;
* :class:`InputProtocol`: value range, resolution and the mean/std the model normalizes with;
* :class:`DataProtocol`: source, split, sha256 of the exact uint8 arrays the stream reads,
  corruption generator and its version, severities, images per domain, domain order;
* :class:`SettingProtocol`: reset policy, label order and its parameters, batch size, number
  of streams, seeds, and a sha256 of the stream's sample order;
* :class:`MetricProtocol`: what the headline number is and how it is averaged;
* :class:`MethodProtocol`: the method and all its resolved hyperparameters (defaults too);
* :class:`SoftwareProtocol`: project version and git commit, torch/torchvision/timm/numpy,
  Python, device.

:meth:`Protocol.fingerprint` is the sha256 of the canonical JSON of the whole block; two runs
with equal fingerprints computed under the same protocol. :func:`differences` lists the keys
where two protocol blocks disagree (dotted keys such as ``model.weights_sha256``);
``benchmarks.report`` uses it to put runs side by side only when they agree on everything but
the swept keys. ``python -m benchmarks.protocol diff A B`` prints the differences of two
records (or protocol JSON files), e.g. a local run and a published one.

The continual-learning experiments record a :class:`ContinualProtocol` (the same sections,
with the data and setting of a class-incremental or Si-Blurry stream), the competition
harness a :class:`HarnessProtocol` (the submission file's sha256 stands for model and
method) and ``benchmarks.perf`` a :class:`PerfProtocol` (seeded random weights and inputs,
timing definition, software).

Bump :data:`PROTOCOL_VERSION` whenever a field is added, removed or changes meaning.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.files import json_ready

PROTOCOL_SCHEMA = "tta-protocol"
PROTOCOL_VERSION = 1

#: Headline metric of the test-time benchmarks (docs/METHODS.md §9.4).
ONLINE_ERROR = "online_error"
ONLINE_ERROR_DEFINITION = (
    "online (predict-then-adapt) error: every sample is predicted once, by the forward call "
    "that also adapts on its batch; error = 1 - correct/samples"
)
COMPUTE_AWARE_ERROR = "compute_aware_online_error"
COMPUTE_AWARE_ERROR_DEFINITION = (
    "compute-aware online error (Alfarra et al., ICML 2024): the stream reveals batches at eta "
    "times the plain-inference rate; a batch that arrives while an adapting step still runs "
    "(ceil(step cost * eta) - 1 batches after it) is predicted by the latest model without "
    "adapting; error = 1 - correct/samples"
)

_CHUNK = 1 << 20


# -- the typed block ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelProtocol:
    """The source model.

    ``weights_sha256`` hashes the loaded ``state_dict`` (sorted keys, dtype, shape and raw
    bytes of every tensor), so it identifies the weights whatever the file format;
    ``checkpoint_sha256`` hashes the file, when the weights came from one.
    """

    kind: str
    arch: str | None
    label: str
    weights_sha256: str
    checkpoint_sha256: str | None = None
    clean_accuracy: float | None = None
    #: ``"<class name> x <count>"`` for every normalization layer class of the source model
    normalization_layers: tuple[str, ...] = ()
    num_classes: int | None = None


@dataclass(frozen=True)
class InputProtocol:
    """What the evaluated images look like when they reach the model."""

    #: every stream of this project delivers float RGB in [0, 1]
    value_range: tuple[float, float] = (0.0, 1.0)
    resolution: int | None = None
    #: per-channel normalization applied to those inputs before the network (None: none)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    #: where that normalization happens: "wrapper" (model.input_mean/std), "model" (inside
    #: the network, RobustBench style) or "none"
    normalization: str = "none"


@dataclass(frozen=True)
class DataProtocol:
    """The exact data of the stream."""

    dataset: str
    source: str
    split: str
    #: sha256 of the uint8 images and int64 labels the stream reads (see :func:`stream_data_sha256`)
    sha256: str
    #: e.g. "benchmarks.corruptions" (generated on the fly) or "CIFAR-10-C files"
    corruption_generator: str
    corruption_generator_version: str
    corruption_seed: int | None
    quantize: bool
    domains: tuple[str, ...]
    severities: tuple[int, ...]
    severity_sequence: tuple[int, ...]
    images_per_domain: int
    num_samples: int


@dataclass(frozen=True)
class SettingProtocol:
    """How the data is presented to the method."""

    schedule: str
    reset_policy: str
    label_order: str
    label_order_params: Mapping[str, Any]
    batch_size: int
    num_streams: int
    replays: int
    seeds: Mapping[str, int]
    #: sha256 of the per-sample plan (source row, label, domain, severity, draw id, batch cuts)
    order_sha256: str
    #: parameters of the schedule beyond its name (recurrences, a ccc walk and its table);
    #: left out of the block when empty, so earlier results keep their fingerprints
    schedule_params: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class MetricProtocol:
    name: str = ONLINE_ERROR
    definition: str = ONLINE_ERROR_DEFINITION
    #: how the headline number averages per-sample errors
    averaging: str = "mean over domains of the per-domain online error"
    #: results store fractions in [0, 1]; tables print percent
    unit: str = "fraction"
    ece_bins: int | None = None
    window: int | None = None


@dataclass(frozen=True)
class MethodProtocol:
    name: str
    #: per part of the method (``{"norm": {...}, "tent": {...}}`` for a composition), every
    #: hyperparameter with the value the method actually uses (defaults included)
    hparams: Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class SoftwareProtocol:
    project_version: str
    git_commit: str | None
    git_dirty: bool | None
    python: str
    torch: str
    torchvision: str | None
    timm: str | None
    numpy: str
    device: str


class _Record:
    """A top-level protocol block: its plain JSON form and its fingerprint."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (tuples become lists), ready for a record."""
        return json_ready(dataclasses.asdict(self))  # type: ignore[call-overload]

    def fingerprint(self) -> str:
        return fingerprint_of(self.to_dict())


@dataclass(frozen=True)
class Protocol(_Record):
    """The whole fingerprint of one result (see the module docstring)."""

    model: ModelProtocol
    input: InputProtocol
    data: DataProtocol
    setting: SettingProtocol
    metric: MetricProtocol
    method: MethodProtocol
    software: SoftwareProtocol
    schema: str = PROTOCOL_SCHEMA
    version: int = PROTOCOL_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if not out["setting"].get("schedule_params"):
            out["setting"].pop("schedule_params", None)
        return out


@dataclass(frozen=True)
class ContinualDataProtocol:
    """The data of a continual-learning run: the exact train/test arrays it was cut from."""

    benchmark: str
    #: sha256 of the uint8 images and int64 labels (see :func:`arrays_sha256`)
    train_sha256: str
    test_sha256: str
    train_per_class: int | None
    test_per_class: int | None
    num_classes: int
    train_samples: int
    test_samples: int


@dataclass(frozen=True)
class ContinualSettingProtocol:
    scenario: str
    strategy: str
    n_experiences: int
    batch_size: int
    passes: int
    #: scenario parameters (Si-Blurry's N and M, shuffling within a task)
    scenario_params: Mapping[str, Any]
    #: replay buffer (empty without replay)
    replay: Mapping[str, Any]
    seeds: Mapping[str, int]


@dataclass(frozen=True)
class ContinualProtocol(_Record):
    """The protocol of a continual-learning experiment run (``continual.experiments``)."""

    model: ModelProtocol
    input: InputProtocol
    data: ContinualDataProtocol
    setting: ContinualSettingProtocol
    metric: MetricProtocol
    method: MethodProtocol
    software: SoftwareProtocol
    kind: str = "continual"
    schema: str = PROTOCOL_SCHEMA
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class HarnessProtocol(_Record):
    """The protocol of a competition-harness record (``continual.harness``): the submission
    is the model and the method, so it is pinned by its file's sha256; the data by the
    scenario and hidden-label checksums the harness verifies."""

    submission: Mapping[str, Any]
    data: Mapping[str, Any]
    setting: Mapping[str, Any]
    metric: MetricProtocol
    method: MethodProtocol
    software: SoftwareProtocol
    kind: str = "continual.harness"
    schema: str = PROTOCOL_SCHEMA
    version: int = PROTOCOL_VERSION


def harness_protocol(record: Mapping[str, Any]) -> HarnessProtocol:
    """The protocol of a harness run record (its ``config``, checksums and hyperparameters)."""
    config = record.get("config", {})
    setting_keys = ("num_tasks", "seed", "experience_size", "time_budget_s", "memory_budget_mb", "threads",
                    "tuning_benchmark", "tuning_data_part", "tuning_budget_s", "max_trials", "criterion")
    return HarnessProtocol(
        submission={"name": record.get("name"), "sha256": record.get("submission_sha256")},
        data={
            "benchmark": config.get("benchmark"), "data_part": config.get("data_part"),
            "train_per_class": config.get("train_per_class"), "test_per_class": config.get("test_per_class"),
            "scenario_sha256": record.get("scenario_sha256"), "labels_sha256": record.get("labels_sha256"),
        },
        setting={key: config.get(key) for key in setting_keys},
        metric=MetricProtocol(
            name="A_auc,A_last,A_avg,F_last",
            # recorded text, part of the fingerprint of existing records: the section is now
            # docs/METHODS.md §9.5
            definition="Si-Blurry's online metrics (ALGORITHMS.md §9.5) on the hidden test set, seen classes only",
            averaging="A_auc: mean of the accuracy measured every eval_period samples; A_avg: mean over task ends",
            window=config.get("eval_period"),
        ),
        method=MethodProtocol(name=str(record.get("name")), hparams={"submission": dict(record.get("hparams") or {})}),
        software=software_protocol("cpu"),
    )


@dataclass(frozen=True)
class PerfProtocol(_Record):
    """The protocol of a ``benchmarks.perf`` run: speed and memory, not accuracy, on
    seeded random weights and inputs, so models and data are described by how they are made."""

    models: Mapping[str, Mapping[str, Any]]
    inputs: Mapping[str, Any]
    methods: Mapping[str, MethodProtocol]
    batch_sizes: tuple[int, ...]
    metric: Mapping[str, Any]
    software: tuple[SoftwareProtocol, ...]
    kind: str = "benchmarks.perf"
    schema: str = PROTOCOL_SCHEMA
    version: int = PROTOCOL_VERSION


# -- fingerprint and comparison ------------------------------------------------
def fingerprint_of(block: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a protocol block (or any block of plain values)."""
    blob = json.dumps(json_ready(block), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def flatten(block: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"arch": "x"}}`` -> ``{"model.arch": "x"}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in block.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = json_ready(value)
    return out


def matches(key: str, prefixes: Iterable[str]) -> bool:
    """Whether dotted ``key`` is one of ``prefixes`` or lies below one of them."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def differences(
    a: Mapping[str, Any], b: Mapping[str, Any], *, ignore: Iterable[str] = ()
) -> list[tuple[str, Any, Any]]:
    """``(key, value in a, value in b)`` for every dotted key where two blocks disagree."""
    fa, fb = flatten(a), flatten(b)
    ignore = tuple(ignore)
    out = []
    for key in sorted(set(fa) | set(fb)):
        if matches(key, ignore):
            continue
        va, vb = fa.get(key, "<absent>"), fb.get(key, "<absent>")
        if va != vb:
            out.append((key, va, vb))
    return out


# -- pieces that need the model, the data or the machine -----------------------------------------
def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def update_with_array(digest: Any, array: np.ndarray | torch.Tensor) -> None:
    """Feed dtype, shape and the raw C-order bytes of ``array`` into ``digest``."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.dtype == torch.bfloat16:  # no NumPy dtype: hash its bit pattern
            array = array.view(torch.int16)
        array = array.contiguous().numpy()
    array = np.ascontiguousarray(array)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state dict: sorted keys, and dtype, shape and bytes of every tensor."""
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        digest.update(key.encode() + b"\0")
        if isinstance(value, torch.Tensor):
            update_with_array(digest, value)
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def normalization_layers(model: nn.Module) -> tuple[str, ...]:
    """``("BatchNorm2d x 20", "LayerNorm x 1")``: the normalization layers of a model."""
    counts: dict[str, int] = {}
    for module in model.modules():
        name = type(module).__name__
        if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) or "Norm" in name:
            counts[name] = counts.get(name, 0) + 1
    return tuple(f"{name} x {count}" for name, count in sorted(counts.items()))


def resolved_hparams(method: Any) -> dict[str, dict[str, Any]]:
    """Every hyperparameter a method uses, per part (of a built :class:`tta.methods.base.Method`
    or a parsed :class:`tta.MethodSpec`: both list their parts, compositions included)."""
    return {str(name): json_ready(values) for name, values in method.hparams_by_part().items()}


@lru_cache(maxsize=1)
def _git_state() -> tuple[str | None, bool | None]:
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None, None
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        # Only tracked files count: untracked outputs of a run must not flip the flag.
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit or None, bool(dirty)


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version(module)
    except PackageNotFoundError:
        return None


def software_protocol(device: str | torch.device) -> SoftwareProtocol:
    """The software and device of this process."""
    import tta

    commit, dirty = _git_state()
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        name = f"cuda:{torch.cuda.get_device_name(dev)}"
    else:
        name = f"{dev.type}:{platform.machine()}"
    return SoftwareProtocol(
        project_version=str(getattr(tta, "__version__", "unknown")),
        git_commit=commit,
        git_dirty=dirty,
        python=platform.python_version(),
        torch=str(torch.__version__),
        torchvision=_version("torchvision"),
        timm=_version("timm"),
        numpy=np.__version__,
        device=name,
    )


@lru_cache(maxsize=4)
def code_sha256(package: str) -> str:
    """sha256 over the source files of a package (sorted by path): the version of generated
    data whenever the generator has no explicit version number."""
    import importlib

    module = importlib.import_module(package)
    folder = Path(module.__file__).parent  # type: ignore[arg-type]
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def stream_data_sha256(stream: Any) -> str:
    """sha256 of the exact uint8 arrays a :class:`benchmarks.streams.Stream` reads.

    Per source key, in order of first use: the key, then the uint8 images and int64 labels
    of the rows the stream uses (sorted). Together with the sample order
    (:func:`stream_order_sha256`) this pins every input image of the stream; for generated
    corruptions the generator version pins the rest.
    """
    plan = stream.plan
    digest = hashlib.sha256()
    keys, first = np.unique(plan.key_id, return_index=True)
    for key in keys[np.argsort(first)]:
        domain, severity = stream._key_owner[int(key)]
        arrays = stream.source.load(domain, severity)
        rows = np.unique(plan.base_index[plan.key_id == key])
        digest.update(repr(plan.keys[int(key)]).encode() + b"\0")
        update_with_array(digest, np.asarray(arrays.images)[rows])
        update_with_array(digest, np.asarray(arrays.labels, dtype=np.int64)[rows])
    return digest.hexdigest()


def arrays_sha256(arrays: Any) -> str:
    """sha256 of an :class:`benchmarks.data.ImageArrays`: its uint8 images and int64 labels."""
    digest = hashlib.sha256()
    update_with_array(digest, np.asarray(arrays.images))
    update_with_array(digest, np.asarray(arrays.labels, dtype=np.int64))
    return digest.hexdigest()


def stream_order_sha256(stream: Any) -> str:
    """sha256 of a stream's per-sample plan and batch cuts (its exact sample order)."""
    plan = stream.plan
    digest = hashlib.sha256()
    for array in (plan.labels, plan.domain_id, plan.severity, plan.key_id, plan.base_index, plan.sample_id, plan.batch_bounds):
        update_with_array(digest, np.asarray(array, dtype=np.int64))
    return digest.hexdigest()


RESET_POLICIES = {
    "reset_each_shift": "reset to the source model before every domain",
    "continual": "reset once at the start, never at domain shifts",
    "mixed": "reset once at the start; domains mixed within batches",
    "gradual": "reset once at the start; severities ramp 1..5..1 per domain",
    "ccc": "reset once at the start; a walk over (corruption, severity) states of calibrated source "
    "accuracy, blending from one state into the next",
}


# -- reading records -----------------------------------------------------------------------------
def protocol_of(record_or_block: Mapping[str, Any]) -> dict[str, Any] | None:
    """The protocol block of a run record, or the block itself; None when there is none."""
    if record_or_block.get("schema") == PROTOCOL_SCHEMA:
        return dict(record_or_block)
    block = record_or_block.get("protocol")
    return dict(block) if isinstance(block, Mapping) else None


def check_version(block: Mapping[str, Any], where: str = "protocol") -> None:
    if block.get("schema") != PROTOCOL_SCHEMA:
        raise ValueError(f"{where}: not a {PROTOCOL_SCHEMA} block")
    if int(block.get("version", 0)) > PROTOCOL_VERSION:
        raise ValueError(f"{where}: protocol version {block.get('version')} is newer than this code ({PROTOCOL_VERSION})")


def format_differences(diffs: Sequence[tuple[str, Any, Any]], names: tuple[str, str] = ("a", "b"), limit: int = 40) -> str:
    lines = [f"  {key}: {names[0]}={_short(va)} | {names[1]}={_short(vb)}" for key, va, vb in diffs[:limit]]
    if len(diffs) > limit:
        lines.append(f"  ... and {len(diffs) - limit} more")
    return "\n".join(lines)


def _short(value: Any, width: int = 70) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 3] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.protocol diff A B [--ignore PREFIX ...]``: what two results'
    protocols disagree on (A/B: run.json, any record with a ``protocol`` block, or a bare
    protocol JSON)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.protocol", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    diff = sub.add_parser("diff", help="list the protocol keys where two results differ")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("--ignore", nargs="*", default=[], metavar="PREFIX", help="dotted keys to leave out, e.g. software")
    show = sub.add_parser("show", help="print the flattened protocol of a result")
    show.add_argument("a")
    args = parser.parse_args(argv)
    blocks = []
    for path in [args.a] + ([args.b] if args.command == "diff" else []):
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        block = protocol_of(data)
        if block is None:
            print(f"error: {path} holds no protocol block", file=sys.stderr)
            return 2
        try:
            check_version(block, str(path))
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        blocks.append(block)
    if args.command == "show":
        for key, value in flatten(blocks[0]).items():
            print(f"{key} = {json.dumps(value)}")
        return 0
    diffs = differences(blocks[0], blocks[1], ignore=args.ignore)
    if not diffs:
        print("same protocol" + (f" (ignoring {', '.join(args.ignore)})" if args.ignore else ""))
        return 0
    print(f"{len(diffs)} protocol difference(s):\n" + format_differences(diffs, ("A", "B")))
    return 1


if __name__ == "__main__":
    sys.exit(main())
