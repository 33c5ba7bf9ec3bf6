"""Checks that need the code, run on every composed config before any work starts.

Hydra's schema (:mod:`benchmarks.app.schema`) already rejects wrong types and unknown keys.
What it cannot know is what the code registers: the method name (methods register
themselves in :mod:`tta`, so the method group is data-driven), the method's hyperparameter
names and types (its ``Hparams`` dataclass, checked by :class:`tta.MethodSpec` when the
:class:`~benchmarks.app.spec.RunSpec` is built), the corruption names, and whether the model
weights exist. :class:`PreflightChecks` is a Hydra callback that runs
:func:`check_config` on the single run's config, or on the config of every job of a
multirun sweep, before the first job is launched.

Hydra turns exceptions raised by callbacks into warnings and carries on, so a failed check
exits the process with :class:`PreflightFailed` (a ``SystemExit``: the message goes to
stderr and the exit status is 1) before any output folder is created or any job starts.
The task function checks its config again, so jobs started by other sweepers or by code
are covered too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from benchmarks.app.errors import BenchConfigError
from benchmarks.app.models import check_model_config
from benchmarks.app.preprocessing import check_preprocessing
from benchmarks.app.spec import RunSpec
from tta.spec import MethodSpec

logger = logging.getLogger(__name__)


def check_method(spec: str, hparams: dict[str, Any], num_streams: int = 1) -> dict[str, Any]:
    """Validate a method config (:class:`tta.MethodSpec`); returns the hyperparameters
    converted to their declared types."""
    try:
        return dict(MethodSpec.parse(spec, hparams, num_streams=num_streams).given)
    except (ValueError, TypeError) as error:
        raise BenchConfigError(f"method {spec!r} with hparams {hparams}: {error}") from None


def _known_domains(source: str) -> set[str]:
    from benchmarks.streams.config import CLEAN_DOMAINS, STANDARD_DOMAINS

    known = set(STANDARD_DOMAINS) | set(CLEAN_DOMAINS)
    if source == "generate":
        try:
            from benchmarks.corruptions import REGISTRY

            known = set(REGISTRY) | set(CLEAN_DOMAINS)
        except Exception:  # noqa: BLE001 - fall back to the standard names
            pass
    return known


def stream_config(cfg: "DictConfig | RunSpec") -> Any:
    """The :class:`benchmarks.streams.StreamConfig` of a config; raises ``ValueError`` if it is invalid."""
    spec = RunSpec.from_config(cfg)
    if spec.stream is None:
        raise ValueError(spec.stream_error)
    return spec.stream


def _check_data(config: Any) -> list[str]:
    """Data files that must exist before a run starts (cheap checks only)."""
    if config.dataset == "cifar10_jpeg":
        tarball = Path(config.data_root or ".") / f"cifar10-jpeg-{config.split}.tar.gz"
        if not tarball.is_file():
            return [f"dataset file not found: {tarball} (set $TTA_SHARED_DATA or dataset.data_root to the folder holding it)"]
    elif config.source == "files" and config.data_root and not Path(config.data_root).is_dir():
        return [f"dataset folder not found: {config.data_root} (dataset.data_root)"]
    return []


def num_streams(cfg: "DictConfig | RunSpec") -> int:
    return RunSpec.from_config(cfg).num_streams


def check_config(cfg: "DictConfig | RunSpec") -> RunSpec:
    """Raise :class:`BenchConfigError` listing every problem of a config; returns its
    :class:`~benchmarks.app.spec.RunSpec` (built here when given a ``DictConfig``)."""
    spec = RunSpec.from_config(cfg)
    problems: list[str] = [] if spec.method_error is None else [spec.method_error]
    config = spec.stream
    if config is None:
        problems.append(f"stream: {spec.stream_error}")
    else:
        unknown = [d for d in config.domains if d not in _known_domains(config.source)]
        if unknown:
            problems.append(f"unknown domain(s) {unknown} in stream.domains; known: {sorted(_known_domains(config.source))}")
        problems += _check_data(config)
        if spec.eval.multi_stream and config.schedule != "reset_each_shift":
            problems.append("eval.multi_stream=true runs domains as parallel reset-each-shift streams; it needs stream.schedule=reset_each_shift")
    eta, cost = spec.eval.online_eta, spec.eval.step_cost
    if eta is not None and not 0.0 < float(eta) <= 1.0:
        problems.append(f"eval.online_eta={eta} must be in (0, 1] (the stream's speed as a fraction of plain inference)")
    if cost is not None and (eta is None or not float(cost) > 0.0):
        problems.append(f"eval.step_cost={cost} needs eval.online_eta and must be a positive ratio to plain inference")
    if spec.runtime.checkpoint_every < 0:
        problems.append(f"runtime.checkpoint_every={spec.runtime.checkpoint_every} must be >= 0 (0: no checkpoints)")
    problems += check_model_config(spec.model)
    problems += check_preprocessing(spec.model, image_size=spec.image_size, dataset=config.dataset if config else None)
    if problems:
        raise BenchConfigError("invalid benchmark config:\n  - " + "\n  - ".join(p.replace("\n", "\n    ") for p in problems))
    return spec


def sweep_job_configs(config: DictConfig) -> list[tuple[list[str], DictConfig]]:
    """The composed config of every job of the current multirun (BasicSweeper semantics)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = GlobalHydra.instance().config_loader()
    arguments = list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))  # type: ignore[arg-type]
    params = OmegaConf.select(config, "hydra.sweeper.params")
    if params:
        arguments = [f"{k}={v}" for k, v in params.items()] + arguments
    overrides = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
    jobs = BasicSweeper.split_arguments(overrides, None)[0]
    return [(job, loader.load_sweep_config(config, list(job))) for job in jobs]


class PreflightFailed(SystemExit):
    """A config failed its checks before any work started (exit status 1, message on stderr)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{message}\n(checked before any job started: nothing was run)")


class PreflightChecks(Callback):
    """Hydra callback: check every config before the first job runs (``hydra.callbacks``), and
    say at the end of a sweep how many of *its* runs finished (a sweep folder may also hold the
    runs of earlier sweeps)."""

    def __init__(self) -> None:
        #: run keys of the current sweep's jobs (known for the BasicSweeper's sweeps)
        self.sweep_keys: set[str] | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_config(config)
        except BenchConfigError as error:
            raise PreflightFailed(str(error)) from None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_") or "")
        if not sweeper.endswith("BasicSweeper"):
            return  # other sweepers generate their jobs lazily; each job checks itself
        try:
            jobs = sweep_job_configs(config)
        except Exception as error:  # noqa: BLE001 - the sweeper reports composition errors itself
            logger.debug("pre-flight composition skipped: %s", error)
            return
        keys = set()
        for overrides, job_config in jobs:
            try:
                keys.add(check_config(job_config).run_key)
            except BenchConfigError as error:
                raise PreflightFailed(f"sweep job {' '.join(overrides)}:\n{error}") from None
        self.sweep_keys = keys
        logger.info("checked the configs of %d sweep jobs", len(jobs))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from benchmarks.app.records import scan_runs

        sweep_dir = Path(str(config.hydra.sweep.dir))
        finished = scan_runs([sweep_dir]).finished
        report = f"report: python -m benchmarks.report {sweep_dir}"
        if self.sweep_keys is None:  # jobs unknown (another sweeper): the folder's count
            logger.info("sweep finished: %d finished runs in %s; %s", len(finished), sweep_dir, report)
            return
        ours = sum(record.get("run_key") in self.sweep_keys for record in finished)
        earlier = len(finished) - ours
        logger.info(
            "sweep finished: %d of its %d runs finished in %s%s; %s",
            ours, len(self.sweep_keys), sweep_dir,
            f" (and {earlier} finished runs of earlier sweeps)" if earlier else "", report,
        )
