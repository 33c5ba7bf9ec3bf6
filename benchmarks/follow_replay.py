"""Choose ``follow``'s detector settings by replay: record a stream once, score any settings in
seconds.

    python -m benchmarks.follow_replay record out.pt experiment=cifar10c_continual seed=1
    python -m benchmarks.follow_replay replay out.pt [more.pt ...] --grid '[{}, {"hold": 2048}]'
    python -m benchmarks.follow_replay signal experiment=cifar10c_continual seed=1 --thresholds 0.3,0.4
    python -m benchmarks.follow_replay signal experiment=cifar10c_continual seed=1 --signal all_layers --thresholds 0.14
    python -m benchmarks.follow_replay signal experiment=digits_quick seed=0 --signal all_layers --thresholds 0.14 --relative 2.5,3

``follow``'s two paths do not depend on its detector: the class-balanced statistics update
on every batch with the slow path's own labels, and the test-batch forward runs on every
batch of at least ``min_batch_size``. So one run records, per batch, the slow prediction,
the test-batch prediction and the true labels, and any detector setting is then scored by
running the library's own detector (:meth:`tta.methods.follow.Follow._detect`) over the
slow predictions and choosing the output with the method's own :func:`~tta.methods.follow.choose_output`. The two selections of
docs/RESULTS.md chose ``follow``'s defaults this way; ``tests/benchmarks/test_follow_replay.py``
checks that a replay equals the method's own output.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import tta
from tta.methods.follow import RESTART_SIGNALS, Follow, choose_output, input_signature, signature_change
from tta.surgery import find_norm_layers


@dataclass
class Recording:
    """Per batch of one stream: ``slow`` and ``fast`` logits (``fast`` is ``None`` below
    ``min_batch_size``) and the true ``labels``."""

    slow: list[torch.Tensor]
    fast: list[torch.Tensor | None]
    labels: list[torch.Tensor]

    def save(self, path: str | Path) -> None:
        torch.save({"slow": self.slow, "fast": self.fast, "labels": self.labels}, path)

    @classmethod
    def load(cls, path: str | Path) -> "Recording":
        data = torch.load(path)
        return cls(data["slow"], data["fast"], data["labels"])


def record(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], **hparams: Any) -> Recording:
    """Run ``follow`` on ``(images, labels)`` batches of one stream and record both paths."""
    adapted = tta.adapt(model, "follow", **hparams)
    outputs: list[torch.Tensor] = []
    adapted.model.register_forward_hook(lambda _module, _inputs, out: outputs.append(out.detach().float()))
    hp = adapted.method.hparams
    # forwards in step order: slow (frozen), update, then test-batch statistics; the
    # every-layer restart signal runs the test-batch forward first
    fast_first = hp.restart_signal == "all_layers" and hp.restart_shift is not None
    rec = Recording([], [], [])
    with torch.no_grad():
        for images, labels in batches:
            outputs.clear()
            adapted(images)
            full = len(images) >= hp.min_batch_size
            slow_at, fast_at = (1, 0) if fast_first and full else (0, 2)
            rec.slow.append(outputs[slow_at].cpu())
            rec.fast.append(outputs[fast_at].cpu() if full else None)
            rec.labels.append(labels.cpu())
    return rec


def replay(rec: Recording, **hparams: Any) -> float:
    """Online error (%) of ``follow`` with ``hparams`` on a recorded stream."""
    num_classes = rec.slow[0].shape[1]
    head = nn.Sequential(nn.Flatten(), nn.Linear(num_classes, num_classes))  # holds the detector state
    method = tta.adapt(head, "follow", **hparams).method
    assert isinstance(method, Follow)
    hp = method.hparams
    errors = total = 0
    for slow, fast, labels in zip(rec.slow, rec.fast, rec.labels):
        n = slow.shape[0]
        correlated = method._detect(slow, n, update=True)
        out = choose_output(slow, fast, correlated, hp.prior_correction and n >= hp.min_batch_size, 1)
        errors += int((out.argmax(1) != labels).sum())
        total += n
    return 100.0 * errors / max(total, 1)


class _Captured(Exception):
    """Stops a forward once the watched layer's input is captured."""


def restart_signal(
    model: nn.Module, batches: Iterable[torch.Tensor], min_batch_size: int = 16, signal: str = "first_layer"
) -> list[float | None]:
    """Per batch, the change of ``follow``'s restart signal (:func:`tta.methods.follow.signature_change`
    of the first BatchNorm layer's input, or with ``signal="all_layers"`` of every layer's
    input in the test-batch forward, against the previous batch of at least
    ``min_batch_size``; ``None`` where there is none or the batch is smaller). ``follow``
    with ``restart_shift=t`` (and that ``restart_signal``) restarts exactly at the batches
    whose change exceeds ``t``: the signal depends on the images alone. The first layer's
    comes from the source model, one partial forward per batch (the layers before the first
    BatchNorm do not adapt); every layer's from ``follow`` itself with a threshold no change
    reaches (its test-batch forward does not depend on the adapted statistics)."""
    if signal == "all_layers":
        return relative_restart_signal(model, batches, min_batch_size, signal)[0]
    norms = find_norm_layers(model)
    if not norms:
        raise ValueError("the model has no BatchNorm layer: follow has nothing to restart")
    captured: list[torch.Tensor] = []

    def capture(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        captured.append(inputs[0])
        raise _Captured

    handle = norms[0][1].register_forward_pre_hook(capture)
    changes: list[float | None] = []
    previous: torch.Tensor | None = None
    try:
        model.eval()
        with torch.no_grad():
            for images in batches:
                captured.clear()
                try:
                    model(images)
                except _Captured:
                    pass
                signature = input_signature(captured[0], 1)
                if len(images) < min_batch_size:
                    changes.append(None)
                    continue
                changes.append(None if previous is None else float(signature_change(signature, previous)[0]))
                previous = signature
    finally:
        handle.remove()
    return changes


def relative_restart_signal(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    min_batch_size: int = 16,
    signal: str = "first_layer",
    window: int = 16,
    min_history: int = 4,
) -> tuple[list[float | None], list[float | None]]:
    """Per batch, the restart signal's change (as :func:`restart_signal`) and its ratio to the
    stream's own past changes (``follow``'s ``restart_relative`` with ``restart_window=window``
    and ``restart_min_history=min_history``; ``None`` where there is none). ``follow`` with
    ``restart_shift=t`` and ``restart_relative=k`` restarts exactly where the change exceeds
    ``t`` and the ratio ``k``. Both come from ``follow`` itself, with thresholds that nothing reaches (the
    history holds the changes, whatever restarts)."""
    adapted = tta.adapt(
        copy.deepcopy(model), "follow", restart_signal=signal, restart_shift=math.inf, restart_relative=math.inf,
        restart_window=window, restart_min_history=min_history, min_batch_size=min_batch_size,
    )
    if not Follow.layers(adapted.model):
        raise ValueError("the model has no BatchNorm layer: follow has nothing to restart")
    changes: list[float | None] = []
    ratios: list[float | None] = []
    for images in batches:
        adapted(images)
        change, ratio = float(adapted.method.last_signal[0]), float(adapted.method.last_relative_signal[0])
        changes.append(None if math.isnan(change) else change)
        ratios.append(None if math.isnan(ratio) else ratio)
    return changes, ratios


def _configured(overrides: Sequence[str]) -> tuple[Any, nn.Module, Any]:
    from hydra import compose, initialize_config_module

    import benchmarks.app  # noqa: F401  (the config schema and resolvers)
    from benchmarks.app.models import build_model
    from benchmarks.app.spec import RunSpec
    from benchmarks.streams import build_stream

    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["method=follow", *overrides])
    spec = RunSpec.from_config(cfg)
    torch.set_num_threads(int(spec.runtime.num_threads or 1))
    model = build_model(spec.model, num_classes=spec.num_classes, device=spec.device, progress=False)
    return spec, model, build_stream(spec.stream)


def _signal_command(
    overrides: Sequence[str],
    thresholds: Sequence[float],
    out: str | None,
    signal: str,
    relative: Sequence[float],
    window: int,
    min_history: int,
) -> None:
    spec, model, stream = _configured(overrides)
    segments: list[int] = []

    def images() -> Iterable[torch.Tensor]:
        for batch in stream:
            segments.append(int(batch.segment))
            yield batch.images

    min_batch_size = int(spec.method_spec.given.get("min_batch_size", 16))
    ratios: list[float | None] = []
    if relative:
        changes, ratios = relative_restart_signal(model, images(), min_batch_size, signal, window, min_history)
    else:
        changes = restart_signal(model, images(), min_batch_size, signal)
    shifted = [i > 0 and segments[i] != segments[i - 1] for i in range(len(segments))]
    print(f"{len(changes)} batches, {sum(shifted)} domain changes")
    print("| restart_shift | restart_relative | restarts | at a domain change | elsewhere |")
    print("|---|---|---|---|---|")
    for threshold in thresholds:
        for k in relative or [None]:
            fired = [
                c is not None and c > threshold and (k is None or (r is not None and r > k))
                for c, r in zip(changes, ratios or changes)
            ]
            at_change = sum(f and s for f, s in zip(fired, shifted))
            print(f"| {threshold} | {'-' if k is None else k} | {sum(fired)} | {at_change} | {sum(fired) - at_change} |")
    if out:
        payload: dict[str, Any] = {"overrides": list(overrides), "change": changes, "segment": segments}
        if relative:
            payload["relative"] = ratios
        Path(out).write_text(json.dumps(payload))


def _record_command(out: str, overrides: Sequence[str]) -> None:
    spec, model, stream = _configured(overrides)
    rec = record(model, ((b.images, b.labels) for b in stream), **dict(spec.method_spec.given))
    rec.save(out)
    print(f"{out}: {len(rec.labels)} batches, follow {replay(rec, **dict(spec.method_spec.given)):.2f} %")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="run follow on one configured stream and record both paths")
    rec.add_argument("out")
    rec.add_argument("overrides", nargs="*", help="Hydra overrides of the benchmark app (stream, model, seed)")
    sig = sub.add_parser("signal", help="where follow's restart would fire on one configured stream, per restart_shift")
    sig.add_argument("overrides", nargs="*", help="Hydra overrides of the benchmark app (stream, model, seed)")
    sig.add_argument("--thresholds", default="0.3,0.4,0.5,0.6", help="comma-separated restart_shift values")
    sig.add_argument("--out", default=None, help="also write the per-batch signal as JSON here")
    sig.add_argument("--signal", default="first_layer", choices=RESTART_SIGNALS, help="follow's restart_signal")
    sig.add_argument("--relative", default="", help="comma-separated restart_relative values (default: none)")
    sig.add_argument("--window", type=int, default=16, help="follow's restart_window, with --relative")
    sig.add_argument("--min-history", type=int, default=4, help="follow's restart_min_history, with --relative")
    rep = sub.add_parser("replay", help="error of follow on recorded streams, for each setting of a grid")
    rep.add_argument("recordings", nargs="+")
    rep.add_argument("--grid", default="[{}]", help='JSON list of hyperparameter dicts (default: "[{}]", the defaults)')
    args = parser.parse_args(argv)
    if args.command == "record":
        _record_command(args.out, args.overrides)
        return
    if args.command == "signal":
        relative = [float(k) for k in args.relative.split(",") if k]
        thresholds = [float(t) for t in args.thresholds.split(",")]
        _signal_command(args.overrides, thresholds, args.out, args.signal, relative, args.window, args.min_history)
        return
    recordings = {Path(p).stem: Recording.load(p) for p in args.recordings}
    print("| setting | " + " | ".join(recordings) + " |")
    print("|---|" + "---|" * len(recordings))
    for setting in json.loads(args.grid):
        errors = [f"{replay(r, **setting):.2f}" for r in recordings.values()]
        print(f"| {json.dumps(setting)} | " + " | ".join(errors) + " |")


if __name__ == "__main__":
    main()
