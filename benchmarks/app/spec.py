"""The typed run specification: a composed Hydra config converted once, where the app starts.

:func:`RunSpec.from_config` turns the ``DictConfig`` of a job into frozen, typed values (the
schema's dataclasses for the model, the stream's :class:`~benchmarks.streams.StreamConfig`,
the method parsed into a :class:`tta.MethodSpec`, the run identity). The checks, the runner and the
protocol builder read this object; nothing after it converts the ``DictConfig`` again, so
every helper sees the same values (resolvers such as ``${tta.abspath:}`` are evaluated once).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from benchmarks.app.errors import BenchConfigError
from benchmarks.app.identity import plain_values
from benchmarks.app.schema import AppConfig, EvalConfig, ModelConfig, PathsConfig, RuntimeConfig
from tta.registry import UnknownMethod, available_methods, method_class, registered_methods
from tta.spec import MethodSpec


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs, resolved and typed (see the module docstring)."""

    name: str
    seed: int
    device: str
    model: ModelConfig
    method: str
    #: hyperparameters as given in the config
    hparams: dict[str, Any]
    #: the method parsed once (name, parts, checked hyperparameters, streams), or the error
    #: that prevented parsing it
    method_spec: MethodSpec | None
    method_error: str | None
    #: RDumb's periodic reset of the wrapper (``method.reset_every``), or None
    reset_every: int | None
    #: clean training images given to the method as source data (``method.source_images``)
    source_images: int | None
    #: the stream definition, or the error that prevented building it
    stream: Any
    stream_error: str | None
    num_classes: int
    image_size: int
    eval: EvalConfig
    runtime: RuntimeConfig
    paths: PathsConfig
    #: the resolved config minus the keys that do not change a result (``run_key`` hashes it)
    identity: dict[str, Any]
    #: the whole resolved config (written to ``config.json``)
    resolved: dict[str, Any]
    #: Hydra's task overrides of this job (``["method=tent", ...]``), empty outside Hydra
    overrides: tuple[str, ...] = ()

    @property
    def num_streams(self) -> int:
        """Parallel streams: the domains with ``eval.multi_stream``, else 1."""
        return _num_streams(self.eval, self.stream)

    @property
    def run_key(self) -> str:
        from benchmarks.app.identity import run_key

        return run_key(self.identity)

    @classmethod
    def from_config(cls, cfg: DictConfig | "RunSpec") -> "RunSpec":
        if isinstance(cfg, RunSpec):
            return cfg
        from benchmarks.app.identity import identity
        from benchmarks.streams import StreamConfig

        if "hydra" in cfg:  # Hydra callbacks see the hydra node too; it is no part of a run
            cfg = cfg.copy()
            with open_dict(cfg):
                del cfg["hydra"]
        try:
            typed: AppConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
        except Exception as error:  # noqa: BLE001 - OmegaConf's interpolation/validation errors
            raise BenchConfigError(f"invalid benchmark config: {error}") from None
        stream_values = plain_values(dataclasses.asdict(typed.stream))
        if stream_values.get("schedule") == "ccc" and stream_values.get("walk_table") is None:
            from benchmarks.app.ccc_calibration import AUTO

            stream_values["walk_table"] = AUTO  # measured for the run's model by the runner
        dataset = typed.dataset
        stream, stream_error = None, None
        try:
            stream = StreamConfig(
                dataset=dataset.name,
                source=plain_values(dataset.source),
                data_root=dataset.data_root,
                split=dataset.split,
                image_size=dataset.image_size,
                device=str(typed.device),
                **stream_values,
            )
        except (ValueError, TypeError) as error:
            stream_error = str(error)
        method, hparams = str(typed.method.name), dict(plain_values(typed.method.hparams))
        method_spec, method_error = None, None
        try:
            method_spec = MethodSpec.parse(method, hparams, num_streams=_num_streams(typed.eval, stream))
        except UnknownMethod as error:
            method_error = (
                f"unknown method {error.name!r} (method.name={method!r}); registered methods: "
                f"{', '.join(available_methods())} (compositions: '<statistics>+<method>', e.g. 'unmix_tns+tent')"
            )
        except (ValueError, TypeError) as error:
            method_error = f"method {method!r} with hparams {hparams}: {error}"
        reset_every = typed.method.reset_every
        if reset_every is not None and reset_every < 1 and method_error is None:
            method_error = f"method.reset_every must be a positive number of batches or null, got {reset_every}"
        source_images = typed.method.source_images
        if source_images is not None and method_error is None:
            takers = [part.name for part in method_spec.parts if part.source_data_argument]  # type: ignore[union-attr]
            if source_images < 1:
                method_error = f"method.source_images must be a positive number of images or null, got {source_images}"
            elif not takers:
                readers = [name for name in registered_methods() if method_class(name).source_data_argument]
                method_error = f"method.source_images: {method!r} reads no source data (these do: {', '.join(readers)})"
        resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        assert isinstance(resolved, dict)
        return cls(
            name=str(typed.name),
            seed=int(typed.seed),
            device=str(typed.device),
            model=typed.model,
            method=method,
            hparams=hparams,
            method_spec=method_spec,
            method_error=method_error,
            reset_every=reset_every,
            source_images=source_images,
            stream=stream,
            stream_error=stream_error,
            num_classes=int(dataset.num_classes),
            image_size=int(dataset.image_size),
            eval=typed.eval,
            runtime=typed.runtime,
            paths=typed.paths,
            identity=identity(cfg),
            resolved=resolved,
            overrides=_task_overrides(),
        )


def _num_streams(eval_config: EvalConfig, stream: Any) -> int:
    return len(stream.domains) if eval_config.multi_stream and stream is not None else 1


def _task_overrides() -> tuple[str, ...]:
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return tuple(str(o) for o in HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - outside a Hydra app
        pass
    return ()
