"""Harness settings and the ``key=value`` command line."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

BENCHMARKS = ("split_digits", "si_blurry_digits", "split_cifar10", "si_blurry_cifar10")
#: what the tuning phase may maximise.
CRITERIA = ("A_auc", "A_last", "A_avg")
PARTS = ("all", "a", "b")  # continual.subsets.PARTS, repeated to keep this module light


def scenario_type(benchmark: str) -> str:
    """``split`` or ``si_blurry``: the CL scenario of a benchmark name."""
    return "si_blurry" if benchmark.startswith("si_blurry") else "split"


def dataset_of(benchmark: str) -> str:
    return benchmark.rsplit("_", 1)[-1]


@dataclass
class HarnessConfig:
    """Everything a competition run depends on.

    Attributes:
        submission: Python file exposing ``make_strategy(context)`` (see docs/COMPETITION.md).
        name: leaderboard name (default: the file's stem).
        benchmark: one of :data:`BENCHMARKS`.
        num_tasks: tasks T of the stream.
        seed: seed of the stream order (and handed to the submission).
        experience_size: samples per training experience the submission receives.
        eval_period: seen training samples between two anytime evaluations (A_auc).
        train_per_class, test_per_class: optional per-class subsets (CPU budgets).
        time_budget_s: wall time from the submission's first instruction to its last
            prediction (imports of the runtime excluded).
        memory_budget_mb: memory the submission may allocate beyond the runtime's baseline.
        startup_timeout_s: how long the runtime (Python, torch, Avalanche) may take to start.
        threads: CPU time of the submission's whole process tree, in CPUs (enforced by the
            sandbox's CPU quota, whatever the number of threads).
        max_tasks: processes and threads the submission may have alive at once.
        scratch_mb: size of the submission's private scratch folder (a tmpfs; its pages also
            count against the memory budget).
        unsafe_no_sandbox: run without the operating-system sandbox where it cannot be built
            (never for a competition: a submission can then read the labels, change records
            and outlive its run); such runs are marked unsandboxed in their record and on the
            leaderboard. Without it, the harness refuses to run where the sandbox is missing.
        key_file: the secret key that signs run records (default: ``.harness-key`` in
            ``results_dir``, created on first use); records whose signature does not verify
            are never ranked.
        results_dir: where run records, logs and the leaderboard are written.
        protected_paths: extra paths the submission may not read (datasets, label files).
        scenario_dir: a scenario folder (:mod:`continual.harness.scenario_files`) to run on
            instead of building the stream; its settings replace ``benchmark``,
            ``num_tasks``, ``seed`` and the per-class subsets.
        scenario_sha256, labels_sha256: published checksums of the scenario and of its hidden
            labels; when given, a run on anything else is refused before it starts and
            before it is scored.
        data_part: ``all``, or the half ``a`` / ``b`` of every class (disjoint halves of one
            dataset, :func:`continual.subsets.class_half`).
        tuning_benchmark: non-empty: a two-phase run (:mod:`continual.harness.tuning`). The
            submission's declared ``SEARCH_SPACE`` is searched on this benchmark (public
            labels), the best values by ``criterion`` are frozen and run once on the
            evaluation scenario (``benchmark`` / ``data_part`` / ``scenario_dir``, hidden
            labels). Same scenario type, every other setting and budget shared.
        tuning_data_part: the part of the tuning benchmark's data (see ``data_part``).
        tuning_budget_s: total wall time of the tuning phase; no trial starts after it.
        max_trials: at most this many tuning trials (0: no limit besides the budget).
        criterion: what the tuning phase maximises: ``A_auc``, ``A_last`` or ``A_avg``.
    """

    submission: str = ""
    name: str = ""
    benchmark: str = "split_digits"
    num_tasks: int = 5
    seed: int = 0
    experience_size: int = 10
    eval_period: int = 100
    train_per_class: int | None = None
    test_per_class: int | None = None
    time_budget_s: float = 300.0
    memory_budget_mb: int = 2048
    startup_timeout_s: float = 180.0
    threads: int = 1
    max_tasks: int = 256
    scratch_mb: int = 512
    unsafe_no_sandbox: bool = False
    key_file: str = ""
    results_dir: str = "results/competition"
    protected_paths: list[str] = field(default_factory=list)
    scenario_dir: str = ""
    scenario_sha256: str = ""
    labels_sha256: str = ""
    data_part: str = "all"
    tuning_benchmark: str = ""
    tuning_data_part: str = "all"
    tuning_budget_s: float = 1800.0
    max_trials: int = 0
    criterion: str = "A_auc"

    def validate(self) -> None:
        if not self.submission:
            raise ValueError("submission=<file> is required")
        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {self.benchmark!r}")
        for name in ("num_tasks", "experience_size", "eval_period", "threads", "memory_budget_mb", "max_tasks", "scratch_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.time_budget_s <= 0 or self.startup_timeout_s <= 0:
            raise ValueError("time budgets must be positive")
        if self.data_part not in PARTS or self.tuning_data_part not in PARTS:
            raise ValueError(f"data_part and tuning_data_part must be one of {PARTS}")
        if self.tuning_benchmark:
            self._validate_phases()

    def _validate_phases(self) -> None:
        """The reality-check rule: same scenario type, different data."""
        if self.tuning_benchmark not in BENCHMARKS:
            raise ValueError(f"tuning_benchmark must be one of {BENCHMARKS}, got {self.tuning_benchmark!r}")
        if scenario_type(self.tuning_benchmark) != scenario_type(self.benchmark):
            raise ValueError(
                f"the tuning phase ({self.tuning_benchmark}) and the evaluation phase ({self.benchmark}) must "
                "share the scenario type"
            )
        if dataset_of(self.tuning_benchmark) == dataset_of(self.benchmark) and not self.scenario_dir:
            if {self.tuning_data_part, self.data_part} != {"a", "b"}:
                raise ValueError(
                    "the tuning and evaluation phases use the same dataset: give them disjoint halves "
                    "(tuning_data_part=a data_part=b, or the reverse)"
                )
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if self.tuning_budget_s <= 0 or self.max_trials < 0:
            raise ValueError("tuning_budget_s must be positive and max_trials >= 0")

    @property
    def display_name(self) -> str:
        return self.name or Path(self.submission).stem


def _convert(raw: str, annotation: Any, default: Any) -> Any:
    text = str(annotation)
    if raw.lower() in ("none", "null") and "None" in text:
        return None
    if text == "bool":
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected true or false, got {raw!r}")
        return raw.lower() in ("true", "1", "yes")
    if text.startswith("list"):
        stripped = raw.strip().strip("[]")
        return [item.strip() for item in stripped.split(",") if item.strip()]
    if "int" in text:
        return int(raw)
    if "float" in text:
        return float(raw)
    return raw


def parse_overrides(arguments: list[str]) -> HarnessConfig:
    """``["submission=x.py", "time_budget_s=60", ...]`` -> a validated :class:`HarnessConfig`.

    Raises:
        ValueError: an argument is not ``key=value``, names an unknown key or has a bad value.
    """
    config = HarnessConfig()
    known = {f.name: f for f in fields(HarnessConfig)}
    for argument in arguments:
        key, sep, raw = argument.partition("=")
        key = key.strip().lstrip("+")
        if not sep or key not in known:
            raise ValueError(f"expected key=value with key in {sorted(known)}, got {argument!r}")
        spec = known[key]
        try:
            setattr(config, key, _convert(raw, spec.type, getattr(config, key)))
        except ValueError as error:
            raise ValueError(f"bad value for {key}: {raw!r}") from error
    config.validate()
    return config
