"""The one configuration object of a test-time stream (docs/METHODS.md §9.3).

A stream is fully determined by a :class:`StreamConfig`: which data, which domains at which
severities, in which schedule, in which label order, cut into batches of which size. The
same config (and seed) always yields the same stream, sample for sample.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from benchmarks.corruptions import CORRUPTIONS
from benchmarks.streams.label_order import IMBALANCE_ORDERS, SEEDINGS

# The 15 standard corruptions in the order every test-time paper presents them (§9.3).
STANDARD_DOMAINS: tuple[str, ...] = CORRUPTIONS

#: Domain names that mean "no corruption" ("none" is what the mariodoebler benchmark uses).
CLEAN_DOMAINS: frozenset[str] = frozenset({"clean", "none"})

SCHEDULES: tuple[str, ...] = ("reset_each_shift", "continual", "mixed", "gradual", "ccc")
LABEL_ORDERS: tuple[str, ...] = ("iid", "sorted", "dirichlet", "class_temporal")
SOURCES: tuple[str, ...] = ("generate", "files")

# The severity ramp of the gradual setting, used when a single severity is configured (§9.3).
GRADUAL_SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5, 4, 3, 2, 1)

_SCHEDULE_ALIASES = {"mixed_domains": "mixed"}


@dataclass(frozen=True)
class StreamConfig:
    """Everything that defines a test-time stream.

    Attributes:
        dataset: data source name, see :func:`benchmarks.streams.sources.resolve_source`
            (``"digits"``, ``"cifar10"``, ``"cifar100"``, ...).
        source: ``"generate"`` corrupts clean images on the fly (in batches, on ``device``);
            ``"files"`` reads pre-corrupted images (e.g. the official CIFAR-10-C files).
        data_root: folder of the dataset files (unused by ``digits``).
        split: split of the clean dataset (``"test"`` by default).
        image_size: side length for sources that can resize (``digits``).
        domains: corruption names, or ``"clean"`` / ``"none"`` for uncorrupted images.
        severities: severities 1..5; each domain is visited once per severity (§9.3).
        schedule: ``"reset_each_shift"``, ``"continual"``, ``"mixed"`` (alias
            ``"mixed_domains"``), ``"gradual"`` (§9.3) or ``"ccc"``: a continuously changing
            walk over (corruption, severity) states calibrated to a target accuracy of the
            source model (:mod:`benchmarks.streams.ccc`; ``walk_*`` fields; generated
            sources only).
        label_order: ``"iid"`` (seeded shuffle), ``"sorted"`` (by class, stable),
            ``"dirichlet"`` (§9.2; ``delta == 0`` means sorted, as in the mariodoebler code) or
            ``"class_temporal"`` (RoTTA's and PeTTA's sampler,
            :func:`benchmarks.streams.label_order.class_temporal_order`; a fresh draw for
            every segment).
        delta: Dirichlet concentration δ for ``label_order="dirichlet"`` (γ for
            ``"class_temporal"``; RoTTA and PeTTA use 0.1).
        seeding: how ``seed`` becomes a sample order. ``"library"`` (default): one
            ``np.random.default_rng(seed)`` per segment. ``"official"``: the order
            mariodoebler's test loader gives for the same seed (Python ``random.shuffle``,
            then the Dirichlet sampler on NumPy's global generator; §9.2-§9.3), so a published
            stream can be rebuilt from its seed. It matches that loader for the whole split
            (its default ``NUM_EX = -1``); with ``n_examples`` the library keeps the first
            ``n_examples`` rows in file order, where that loader draws ``random.sample``.
        imbalance_factor: global class imbalance (TRIBE's GLI-TTA, Su et al., AAAI 2024):
            each segment keeps a long-tailed subsample, class ``k`` with
            ``int(n_0 * (1 / factor) ** (k / (C - 1)))`` samples (``n_0``: the segment's
            count of class 0), before the label order is applied on top. ``None``: off.
            TRIBE uses 10, 100 and 200.
        imbalance_order: ``"constant"`` (class 0 is the head, C-1 the tail; GLI-TTA-F) or
            ``"random"`` (the counts shuffled over the classes with the seed; GLI-TTA-V).
        batch_size: samples per batch (>= 1); the last batch of a segment may be smaller
            (no drop_last, §9.3).
        n_examples: samples per domain, the first ``n_examples`` of the split in file order
            (as RobustBench's CIFAR-C loader); ``None`` uses the whole split.
        replays: how many times each domain's split is presented; every replay is a fresh
            corruption draw (different sample ids), so ``replays`` lengthens a small stream.
        recurrences: how many times the whole schedule is visited (PeTTA's recurring
            protocol, 20 visits). Every visit shows the same images (the same corruption draws,
            as the recurring benchmarks reread the same files) in a new order: the first visit
            is the stream of ``recurrences=1``, later ones draw their order from ``(seed,
            recurrence)``. Results then report an error per recurrence.
        seed: run seed of the sample order (every domain is shuffled with it afresh, so all
            domains present the same image order, as in the official loaders, §9.3).
        corruption_seed: seed of the on-the-fly corruption randomness. It is separate from
            ``seed`` because the official corrupted files are fixed while run seeds vary.
        quantize: store generated corruptions as 8-bit values the way the official generator
            does (clip, ``x * 255``, truncate, at the generator's float precision; §9.1 and
            :func:`benchmarks.corruptions.corrupt_uint8`), so generated and file streams hold
            the same kind of values. Off by default (float output).
        device: device on which batches are built and corrupted.
        walk_table: for ``schedule="ccc"``: the calibration table (JSON written by
            :func:`benchmarks.streams.ccc.save_table`): the source model's accuracy at every
            (corruption, severity); the walk uses those of ``domains``.
        walk_target: the source accuracy the walk holds (CCC-Easy/Medium/Hard: 0.4/0.2/0.0).
        walk_band: states within this distance of ``walk_target`` are allowed.
        walk_speed: images per step of the walk.
        walk_steps: steps of the walk (``walk_speed * walk_steps`` images in all).
        walk_transition: steps over which the next state's share rises from 0 to 1.
        walk_dwell: steps spent in a state before the next transition starts.
        dirichlet_min_chunk: minimum samples per Dirichlet chunk (10 in the official code).
        dirichlet_timeout_s: give up the Dirichlet retry loop after this long (120 s).
    """

    dataset: str = "digits"
    source: str = "generate"
    data_root: str | None = None
    split: str = "test"
    image_size: int = 32
    domains: tuple[str, ...] = STANDARD_DOMAINS
    severities: tuple[int, ...] = (5,)
    schedule: str = "continual"
    label_order: str = "iid"
    delta: float = 0.1
    seeding: str = "library"
    imbalance_factor: float | None = None
    imbalance_order: str = "constant"
    batch_size: int = 64
    n_examples: int | None = None
    replays: int = 1
    recurrences: int = 1
    seed: int = 1
    corruption_seed: int = 0
    quantize: bool = False
    device: str = "cpu"
    walk_table: str | None = None
    walk_target: float = 0.4
    walk_band: float = 0.1
    walk_speed: int = 1000
    walk_steps: int = 100
    walk_transition: int = 5
    walk_dwell: int = 5
    dirichlet_min_chunk: int = 10
    dirichlet_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        # Hydra/OmegaConf hand over lists; keep the config hashable-looking and immutable.
        object.__setattr__(self, "domains", tuple(str(d) for d in self.domains))
        object.__setattr__(self, "severities", tuple(int(s) for s in self.severities))
        object.__setattr__(self, "schedule", _SCHEDULE_ALIASES.get(self.schedule, self.schedule))
        object.__setattr__(self, "device", str(self.device))
        self._validate()

    def _validate(self) -> None:
        if not self.domains:
            raise ValueError("domains must not be empty")
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains must be distinct, got {self.domains}")
        if not self.severities or any(not 1 <= s <= 5 for s in self.severities):
            raise ValueError(f"severities must be a non-empty subset of 1..5, got {self.severities}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.label_order not in LABEL_ORDERS:
            raise ValueError(f"label_order must be one of {LABEL_ORDERS}, got {self.label_order!r}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.delta < 0:
            raise ValueError(f"delta must be >= 0, got {self.delta}")
        if self.seeding not in SEEDINGS:
            raise ValueError(f"seeding must be one of {SEEDINGS}, got {self.seeding!r}")
        if self.imbalance_factor is not None and not self.imbalance_factor >= 1:
            raise ValueError(f"imbalance_factor must be >= 1 or None, got {self.imbalance_factor}")
        if self.imbalance_order not in IMBALANCE_ORDERS:
            raise ValueError(f"imbalance_order must be one of {IMBALANCE_ORDERS}, got {self.imbalance_order!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.n_examples is not None and self.n_examples < 1:
            raise ValueError(f"n_examples must be >= 1 or None, got {self.n_examples}")
        if self.replays < 1:
            raise ValueError(f"replays must be >= 1, got {self.replays}")
        if self.recurrences < 1:
            raise ValueError(f"recurrences must be >= 1, got {self.recurrences}")
        if self.label_order == "class_temporal" and (self.delta <= 0 or self.seeding != "library"):
            raise ValueError("the class_temporal order needs delta > 0 and seeding='library'")
        if self.schedule == "ccc":
            if not self.walk_table or self.source != "generate":
                raise ValueError("schedule='ccc' needs walk_table (a calibration table) and source='generate'")
            if self.walk_speed < 1 or self.walk_steps < 1 or self.walk_transition < 1 or self.walk_dwell < 0:
                raise ValueError("walk_speed, walk_steps and walk_transition must be >= 1, walk_dwell >= 0")
        if self.dirichlet_min_chunk < 0 or self.dirichlet_timeout_s <= 0:
            raise ValueError("dirichlet_min_chunk must be >= 0 and dirichlet_timeout_s > 0")

    @property
    def effective_label_order(self) -> str:
        """The label order actually used: Dirichlet with δ = 0 means sorted (§9.2)."""
        if self.label_order == "dirichlet" and self.delta == 0:
            return "sorted"
        return self.label_order

    def severity_sequence(self) -> tuple[int, ...]:
        """Severities visited per domain: the 1..5..1 ramp for gradual with one severity."""
        if self.schedule == "gradual" and len(self.severities) == 1:
            return GRADUAL_SEVERITIES
        return self.severities

    def replace(self, **changes: Any) -> "StreamConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fully resolved config (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["domains"] = list(self.domains)
        out["severities"] = list(self.severities)
        out["effective_label_order"] = self.effective_label_order
        out["severity_sequence"] = list(self.severity_sequence())
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "StreamConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def from_setting(setting: str, **overrides: Any) -> StreamConfig:
    """A config from a mariodoebler setting name (§9.3).

    ``reset_each_shift``, ``continual``, ``gradual``, ``mixed_domains``, ``correlated`` and
    the ``*_correlated`` combinations. ``correlated`` is continual with a within-domain label
    order: Dirichlet with ``delta`` (default 0.1), or sorted when ``delta == 0``.
    """
    base = setting
    correlated = False
    if setting == "correlated":
        base, correlated = "continual", True
    elif setting.endswith("_correlated"):
        base, correlated = setting[: -len("_correlated")], True
    schedule = _SCHEDULE_ALIASES.get(base, base)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown setting {setting!r}")
    values: dict[str, Any] = {"schedule": schedule}
    if correlated:
        values["label_order"] = "dirichlet"
    values.update(overrides)
    return StreamConfig(**values)


def split_by_domain(config: StreamConfig) -> list[StreamConfig]:
    """One single-domain config per domain, for batched multi-stream evaluation.

    Each returned stream is what ``config`` with ``schedule="reset_each_shift"`` presents for
    that domain (a reset before its first batch), so running them as S parallel streams is
    equivalent to the reset-each-shift protocol.
    """
    if config.schedule in ("mixed", "ccc"):
        raise ValueError(f"a {config.schedule} stream cannot be split by domain")
    return [config.replace(domains=(d,)) for d in config.domains]
