"""Structured configs: the typed schema every composed benchmark config is checked against.

Each config group of ``conf/`` fills one node of :class:`AppConfig`; Hydra merges the YAML
files and the command-line overrides into these dataclasses, so a wrong type
(``stream.batch_size=abc``), an unknown key (``stream.batchsize=8``) or a value outside an
enumeration (``stream.schedule=contnual``) fails with Hydra's own error before any work
starts. Checks that need the code (is a method registered, are its hyperparameters valid,
is a corruption known) run right after composition, see :mod:`benchmarks.app.checks`.

The dataclasses mirror the code: ``dataset`` + ``stream`` are exactly the fields of
:class:`benchmarks.streams.StreamConfig` (plus the dataset's class count; the top-level
``device`` and ``seed`` fill the rest), ``method`` is what :func:`tta.adapt` takes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

from benchmarks.streams.config import STANDARD_DOMAINS


class Schedule(Enum):
    reset_each_shift = "reset_each_shift"
    continual = "continual"
    mixed = "mixed"
    mixed_domains = "mixed_domains"
    gradual = "gradual"
    ccc = "ccc"


class LabelOrder(Enum):
    iid = "iid"
    sorted = "sorted"
    dirichlet = "dirichlet"
    class_temporal = "class_temporal"


class Seeding(Enum):
    library = "library"
    official = "official"


class ImbalanceOrder(Enum):
    constant = "constant"
    random = "random"


class Source(Enum):
    generate = "generate"
    files = "files"


class ModelKind(Enum):
    #: the built-in digits CNN, trained once and cached (benchmarks.models.digits)
    digits = "digits"
    #: any project architecture ("module:callable") with a local checkpoint file
    project = "project"
    #: a timm architecture with a local checkpoint file (never pretrained=True)
    timm = "timm"
    #: a torchvision architecture with a local checkpoint file (never weights=...)
    torchvision = "torchvision"
    #: a RobustBench model zoo entry whose weights file is already on disk
    robustbench = "robustbench"


class Preprocessing(Enum):
    #: from the model kind (timm: pretrained_cfg; torchvision: ImageNet; others: [0, 1])
    auto = "auto"
    #: the checkpoint takes [0, 1] inputs (normalization, if any, inside the network)
    unit = "unit"
    #: the checkpoint takes inputs normalized with input_mean/input_std
    normalized = "normalized"


@dataclass
class ModelConfig:
    """Where the source model comes from (see :mod:`benchmarks.app.models`)."""

    kind: ModelKind = ModelKind.digits
    #: timm/torchvision architecture name, project factory ``"module:callable"``, or the
    #: RobustBench model name (``Standard``)
    arch: Optional[str] = None
    #: weights file (state dict, or a dict holding one under ``state_dict``/``model``)
    checkpoint: Optional[str] = None
    #: output classes; default: the dataset's ``num_classes``
    num_classes: Optional[int] = None
    #: extra keyword arguments of the architecture factory (digits: training config fields)
    kwargs: Dict[str, Any] = field(default_factory=dict)
    #: per-channel input normalization applied inside the model (inputs arrive in [0, 1])
    input_mean: Optional[List[float]] = None
    input_std: Optional[List[float]] = None
    #: what the checkpoint expects; checked against the dataset (benchmarks.app.preprocessing)
    preprocessing: Preprocessing = Preprocessing.auto
    #: resolution the checkpoint was trained at (None: any); must equal dataset.image_size
    input_size: Optional[int] = None
    #: load_state_dict strictness
    strict: bool = True
    #: allow a timm/torchvision/project model without a checkpoint (random weights; smoke tests)
    random_init: bool = False
    #: RobustBench: model folder (``<model_dir>/<dataset>/<threat_model>/<arch>.pt``)
    model_dir: Optional[str] = None
    robustbench_dataset: str = "cifar10"
    threat_model: str = "corruptions"
    #: shown when the weights file is missing: how to produce it
    hint: Optional[str] = None


@dataclass
class MethodConfig:
    """A registered method (or ``"<statistics>+<method>"``) and its hyperparameters.

    ``hparams`` is free-form here on purpose: methods register themselves in :mod:`tta`, so
    the names and types are checked against the method's own ``Hparams`` dataclass at start.
    """

    name: str = "norm"
    hparams: Dict[str, Any] = field(default_factory=dict)
    #: RDumb's periodic reset for any method: back to the source state before every N-th
    #: batch (RDumb: 1000); null never resets (tta.adapt(..., reset_every=N))
    reset_every: Optional[int] = None
    #: labelled clean images of the dataset's training split given to a method that reads
    #: source data at wrap time (eata's Fisher data, petta's source statistics, adanpc's
    #: memory; its ``source_data_argument``); null gives none
    source_images: Optional[int] = None


@dataclass
class DatasetConfig:
    """The data side of a stream (the ``dataset``/``source`` fields of StreamConfig)."""

    name: str = "digits"
    source: Source = Source.generate
    data_root: Optional[str] = None
    split: str = "test"
    image_size: int = 32
    num_classes: int = 10


@dataclass
class StreamSchema:
    """The schedule side of a stream (the remaining fields of StreamConfig)."""

    domains: List[str] = field(default_factory=lambda: list(STANDARD_DOMAINS))
    severities: List[int] = field(default_factory=lambda: [5])
    schedule: Schedule = Schedule.continual
    label_order: LabelOrder = LabelOrder.iid
    delta: float = 0.1
    #: seed -> order: the library's generator, or mariodoebler's loader's (StreamConfig.seeding)
    seeding: Seeding = Seeding.library
    #: global class imbalance (TRIBE's GLI-TTA long-tailed subsample); null: off
    imbalance_factor: Optional[float] = None
    imbalance_order: ImbalanceOrder = ImbalanceOrder.constant
    batch_size: int = 64
    n_examples: Optional[int] = None
    replays: int = 1
    #: visits of the whole schedule (PeTTA's recurring protocol: 20)
    recurrences: int = 1
    seed: int = 1
    corruption_seed: int = 0
    #: round generated corruptions to 8 bits like the official files (docs/METHODS.md §9.1)
    quantize: bool = False
    #: schedule=ccc: the calibration table and the walk (benchmarks/streams/ccc.py)
    walk_table: Optional[str] = None
    walk_target: float = 0.4
    walk_band: float = 0.1
    walk_speed: int = 1000
    walk_steps: int = 100
    walk_transition: int = 5
    walk_dwell: int = 5
    dirichlet_min_chunk: int = 10
    dirichlet_timeout_s: float = 120.0


@dataclass
class EvalConfig:
    #: samples per window of the error-over-the-stream curve
    window: int = 1000
    #: ECE bins
    n_bins: int = 15
    #: run the domains of a reset_each_shift stream as parallel streams through one batched
    #: forward (statistics methods only; same per-domain results, faster)
    multi_stream: bool = False
    #: compute-aware evaluation (Alfarra et al., ICML 2024): the stream reveals batches at this
    #: fraction of the plain-inference rate, in (0, 1]; a method adapts only on the batches its
    #: step time lets it reach (benchmarks/evaluation/compute_budget.py). None: every batch.
    online_eta: Optional[float] = None
    #: the step cost (step time over plain-inference time) of the compute-aware evaluation;
    #: None measures it on every adapting batch as the official code does, a number declares
    #: it (reproducible on any machine)
    step_cost: Optional[float] = None


@dataclass
class RuntimeConfig:
    """How a run executes; not part of its identity (changing these never re-runs a result)."""

    #: tqdm progress bars; None: only when stderr is a terminal
    progress: Optional[bool] = None
    #: torch intra-op threads; None keeps torch's default
    num_threads: Optional[int] = None
    #: return the stored result of a finished run instead of running it again
    skip_finished: bool = True
    #: write a resumable checkpoint every this many batches (0: never); a restarted run
    #: continues from it and ends with the same result files as an uninterrupted run
    checkpoint_every: int = 0
    #: continue from a checkpoint left by an interrupted run of the same protocol
    resume: bool = True


@dataclass
class PathsConfig:
    """Where things are; not part of a run's identity."""

    output_root: str = "outputs"
    cache_dir: str = "${tta.cache_dir:}"
    shared_data: str = "${tta.shared_data:}"


@dataclass
class AppConfig:
    """The whole configuration of one benchmark run."""

    #: experiment name: results go to ``<paths.output_root>/<name>/<run id>``
    name: str = "default"
    #: global seed: torch RNG before wrapping (UnMix-TNS draws its initial noise) and,
    #: through ``stream.seed: ${seed}``, the stream's sample order
    seed: int = 1
    device: str = "cpu"
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    stream: StreamSchema = field(default_factory=StreamSchema)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


#: Top-level keys and dotted paths that do not change what a run computes. They are left
#: out of the run identity, so moving data or outputs, or changing threads or progress bars,
#: never invalidates a finished result.
NON_IDENTITY_KEYS: tuple[str, ...] = (
    "name",
    "runtime",
    "paths",
    "dataset.data_root",
    "model.model_dir",
    "model.hint",
)

#: fields added after runs were recorded, left out of a run's identity at these values, so the
#: runs made before them keep their keys (and their folders and finished results)
IDENTITY_NEUTRAL_DEFAULTS: dict[str, Any] = {
    "method.reset_every": None,
    "method.source_images": None,
    "stream.recurrences": 1,
    "stream.walk_table": None,
    "stream.walk_target": 0.4,
    "stream.walk_band": 0.1,
    "stream.walk_speed": 1000,
    "stream.walk_steps": 100,
    "stream.walk_transition": 5,
    "stream.walk_dwell": 5,
    "eval.online_eta": None,
    "eval.step_cost": None,
}

SCHEMA_NAME = "tta_bench_schema"


def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore (idempotent)."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=AppConfig)
