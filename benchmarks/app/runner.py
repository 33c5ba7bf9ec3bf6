"""One benchmark run: config -> model, method, stream -> online evaluation -> result files.

:func:`run` is the Hydra task function behind ``python -m benchmarks.run``. It

1. returns the stored summary at once when the run's folder already holds a finished
   ``run.json`` of the same identity (re-running a sweep skips what finished);
2. checks the config (:func:`benchmarks.app.checks.check_config`; the method was parsed once,
   into the :class:`~benchmarks.app.spec.RunSpec`);
3. builds the source model, wraps it with :func:`tta.adapt` (the one place the method is
   built) and evaluates it online on the
   stream (:func:`benchmarks.evaluation.evaluate`, or the batched multi-stream evaluation
   with ``eval.multi_stream=true``), with a progress bar; with
   ``runtime.checkpoint_every=N`` it checkpoints every N batches into the run folder and a
   restarted run continues from there (:mod:`benchmarks.evaluation.checkpoint`);
4. writes the result tables, then ``run.json`` last (all atomically), with the run's
   protocol fingerprint (:mod:`benchmarks.app.fingerprint`), removes the checkpoint, and
   logs one summary line.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from benchmarks.app.ccc_calibration import AUTO as CCC_AUTO
from benchmarks.app.ccc_calibration import ensure_table as ensure_ccc_table
from benchmarks.app.checks import check_config
from benchmarks.app.errors import BenchConfigError
from benchmarks.app.fingerprint import build_protocol
from benchmarks.app.identity import abspath, safe_name
from benchmarks.app.models import build_model, model_label
from benchmarks.app.records import load_finished, write_record
from benchmarks.app.source_data import source_batches, source_data_argument
from benchmarks.app.spec import RunSpec
from benchmarks.evaluation.checkpoint import CHECKPOINT_NAME, CheckpointMismatch

logger = logging.getLogger(__name__)


def output_dir(spec: RunSpec) -> Path:
    """Hydra's output folder of this job (the run folder), or the run dir outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(abspath(str(spec.paths.output_root))) / spec.name / f"{safe_name(spec.method)}-{spec.run_key}"


def method_label(name: str, hparams: dict[str, Any]) -> str:
    if not hparams:
        return name
    inner = ",".join(f"{k}={v}" for k, v in sorted(hparams.items()))
    return f"{name}({inner})"


def setting_of(spec: RunSpec, stream: Any) -> dict[str, Any]:
    """What a run was evaluated on, apart from the method and the seed (the report's columns).
    The compute-aware protocol's fields appear only when it is on, so the settings of runs
    recorded before it existed are unchanged."""
    from benchmarks.streams.config import STANDARD_DOMAINS

    order = stream.effective_label_order
    compute: dict[str, Any] = {}
    if spec.eval.online_eta is not None:
        cost = spec.eval.step_cost
        compute = {"online_eta": float(spec.eval.online_eta), "step_cost": "measured" if cost is None else float(cost)}
    return {
        "model": model_label(spec.model),
        "dataset": stream.dataset + ("(files)" if stream.source == "files" else ""),
        "schedule": stream.schedule,
        "label_order": order,
        "delta": float(stream.delta) if order == "dirichlet" else None,
        "seeding": stream.seeding,
        "imbalance": (
            None if stream.imbalance_factor is None else f"{stream.imbalance_factor:g}:{stream.imbalance_order}"
        ),
        "severities": ",".join(str(s) for s in stream.severities),
        "domains": "standard15" if tuple(stream.domains) == STANDARD_DOMAINS else ",".join(stream.domains),
        "batch_size": int(stream.batch_size),
        "n_examples": stream.n_examples,
        "replays": int(stream.replays),
        **compute,
    }


def _check_output_classes(model: torch.nn.Module, num_classes: int, image_size: int, device: str) -> None:
    with torch.no_grad():
        out = model(torch.zeros(2, 3, image_size, image_size, device=device))
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise BenchConfigError(
            f"the model outputs shape {tuple(out.shape)} but the dataset has {num_classes} classes "
            "(set model.num_classes or pick a checkpoint trained on this dataset)"
        )


def summarize(results: list[Any], schedule: str, window: int) -> dict[str, Any]:
    """One run's numbers from its EvalResult(s) (several with eval.multi_stream)."""
    from benchmarks.evaluation.metrics import (
        error_rate,
        expected_calibration_error,
        window_errors,
    )

    correct = np.concatenate([r.records.correct for r in results]) if results else np.zeros(0, bool)
    confidence = np.concatenate([r.records.confidence for r in results]) if results else np.zeros(0)
    domain_errors: dict[str, float] = {}
    pair_errors: dict[str, float] = {}
    curve_start: list[int] = []
    curve_stop: list[int] = []
    curve_error: list[float] = []
    segments: list[dict[str, Any]] = []
    offset = 0
    for r in results:
        domain_errors.update(r.domain_errors())
        pair_errors.update({f"{d}@{s}": e for (d, s), e in r.domain_severity_errors().items()})
        bounds, errors = window_errors(r.records.correct, window)
        curve_start += [int(b) + offset for b in bounds[:-1]]
        curve_stop += [int(b) + offset for b in bounds[1:]]
        curve_error += [float(e) for e in errors]
        for seg in (r.config or {}).get("segments", []):
            segments.append({**seg, "start": int(seg["start"]) + offset, "stop": int(seg["stop"]) + offset})
        offset += len(r.records)
    headline = list(pair_errors.values()) if schedule == "gradual" else list(domain_errors.values())
    # per visit of a recurring stream, averaged over the parallel streams (empty otherwise)
    visits = [r.recurrence_errors() for r in results]
    recurrence_errors = [float(np.mean(v)) for v in zip(*visits)] if visits and all(visits) else []
    seconds = max((r.seconds for r in results), default=0.0)
    model_seconds = max((r.model_seconds for r in results), default=0.0)
    images = int(correct.size)
    return {
        "mean_error": float(np.mean(headline)) if headline else float("nan"),
        "error": error_rate(correct),
        "ece": expected_calibration_error(confidence, correct),
        "domain_errors": domain_errors,
        "domain_severity_errors": pair_errors,
        "num_samples": images,
        "num_batches": int(sum(r.num_batches for r in results)),
        "num_streams": len(results),
        "seconds": seconds,
        "model_seconds": model_seconds,
        "images_per_s": images / seconds if seconds > 0 else float("nan"),
        "peak_memory_mb": max((r.peak_memory_mb for r in results), default=float("nan")),
        "peak_memory_kind": results[0].peak_memory_kind if results else "",
        "curve": {"window": window, "start": curve_start, "stop": curve_stop, "error": curve_error},
        "segments": segments,
        **({"recurrence_errors": recurrence_errors} if recurrence_errors else {}),
    }


def _visits(summary: dict[str, Any]) -> str:
    """The first and last visit of a recurring stream, where a slow collapse shows."""
    visits = summary.get("recurrence_errors") or []
    if not visits:
        return ""
    return f", visit 1 {100 * visits[0]:.2f}% -> visit {len(visits)} {100 * visits[-1]:.2f}%"


def summary_line(record: dict[str, Any], *, skipped: bool = False) -> str:
    s = record["summary"]
    setting = record["setting"]
    order = setting["label_order"] + (f"(delta={setting['delta']:g})" if setting.get("delta") is not None else "")
    head = "skipped (finished earlier)" if skipped else "finished"
    return (
        f"{head} | {record['method']['label']} | {setting['model']} | {setting['dataset']} {setting['schedule']} {order} "
        f"seed={record.get('seed')} | mean error {100 * s['mean_error']:.2f}% over {len(s['domain_errors'])} domains, "
        f"overall {100 * s['error']:.2f}%{_visits(s)} | {s['num_samples']} images in {s['seconds']:.1f} s "
        f"| {record['_dir'] if '_dir' in record else record.get('run_id')}"
    )


def run(cfg: DictConfig | RunSpec) -> dict[str, Any]:
    """Run (or skip) one benchmark config; returns its summary.

    The ``DictConfig`` is converted once into a :class:`RunSpec`; everything below reads it.
    """
    spec = RunSpec.from_config(cfg)
    out_dir = output_dir(spec)
    key = spec.run_key
    if spec.runtime.skip_finished:
        done = load_finished(out_dir, spec.identity)
        if done is not None:
            logger.info(summary_line(done, skipped=True))
            return done["summary"]

    check_config(spec)
    if spec.runtime.num_threads:
        torch.set_num_threads(int(spec.runtime.num_threads))
    progress = bool(spec.runtime.progress) if spec.runtime.progress is not None else sys.stderr.isatty()
    device = spec.device
    stream_cfg = spec.stream
    method = spec.method
    method_spec = spec.method_spec
    assert method_spec is not None  # check_config reported a method that did not parse
    hparams = dict(method_spec.given)

    import tta
    from benchmarks.evaluation import ComputeBudget, StreamCheckpoint, evaluate, evaluate_multi_stream, write_results
    from benchmarks.streams import build_domain_streams, build_stream

    tick = time.perf_counter()
    model = build_model(spec.model, num_classes=spec.num_classes, device=device, progress=progress)
    _check_output_classes(model, int(spec.model.num_classes or spec.num_classes), spec.image_size, device)
    torch.manual_seed(spec.seed)  # any code that still draws from the global RNG
    logger.info("run %s-%s: %s on %s (%s)", safe_name(method), key, method_label(method, hparams), model_label(spec.model), out_dir)
    if stream_cfg.schedule == "ccc" and stream_cfg.walk_table == CCC_AUTO:
        stream_cfg = stream_cfg.replace(walk_table=str(ensure_ccc_table(model, stream_cfg, spec.paths.cache_dir)))
    streams = build_domain_streams(stream_cfg) if spec.eval.multi_stream else [build_stream(stream_cfg)]
    if spec.source_images is not None:  # parsed again with the loader, which a config cannot hold
        loader = source_batches(stream_cfg, spec.source_images, spec.seed)
        given = {**method_spec.given, source_data_argument(method_spec): loader}
        method_spec = tta.MethodSpec.parse(method, given, num_streams=method_spec.num_streams)
    # seed: the wrapper's generator, from which methods draw random state (UnMix-TNS)
    adapted = tta.adapt(model, method_spec, num_streams=method_spec.num_streams, seed=spec.seed, reset_every=spec.reset_every)
    protocol = build_protocol(spec, model, adapted.method, streams)
    fingerprint = protocol.fingerprint()
    checkpoint = None
    if spec.runtime.checkpoint_every:
        checkpoint = StreamCheckpoint(
            out_dir / CHECKPOINT_NAME, spec.runtime.checkpoint_every, fingerprint,
            protocol=protocol.to_dict(), resume=spec.runtime.resume,
        )
    budget = None
    if spec.eval.online_eta is not None:
        cost = None if spec.eval.step_cost is None else float(spec.eval.step_cost)
        budget = ComputeBudget(float(spec.eval.online_eta), plain_model=model.eval(), cost=cost, device=device)
    common = {
        "window": int(spec.eval.window), "n_bins": int(spec.eval.n_bins), "progress": progress, "device": device,
        "budget": budget,
    }
    try:
        if spec.eval.multi_stream:
            results = evaluate_multi_stream(adapted, streams, checkpoint=checkpoint, **common)
        else:
            results = [evaluate(adapted, streams[0], name=safe_name(method), checkpoint=checkpoint, **common)]
    except CheckpointMismatch as error:
        raise BenchConfigError(str(error)) from None

    # Timing stays out of the result tables (it is in run.json), so a resumed run writes
    # exactly the bytes an uninterrupted run writes.
    files = write_results(
        results, out_dir, config={"app": spec.resolved, "streams": [r.config for r in results]}, timing=False
    )
    record = {
        "run_id": out_dir.name,
        "run_key": key,
        "name": spec.name,
        "seed": spec.seed,
        "method": {"name": method, "hparams": hparams, "label": method_label(method, hparams)},
        "setting": setting_of(spec, stream_cfg),
        "summary": summarize(results, stream_cfg.schedule, int(spec.eval.window)),
        **({"compute": budget.summary()} if budget is not None else {}),
        "identity": spec.identity,
        "fingerprint": fingerprint,
        "protocol": protocol.to_dict(),
        "overrides": list(spec.overrides),
        "files": sorted(p.name for p in files.values()),
        "wall_seconds": time.perf_counter() - tick,
    }
    if checkpoint is not None:
        record["checkpoints"] = {
            "every": checkpoint.every, "written": checkpoint.saves, "seconds": checkpoint.save_seconds,
            "resumed_at_batch": checkpoint.resumed_at,
        }
    write_record(out_dir, record)  # last: its presence marks the run finished
    if checkpoint is not None:
        checkpoint.remove()  # the run is finished; nothing to resume
    logger.info(summary_line({**record, "_dir": str(out_dir)}))
    return record["summary"]
