"""``python -m benchmarks.perf``: the performance table (see ``docs/PERFORMANCE.md``)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

import tta
from benchmarks.perf.models import MODELS, build_model
from tta.registry import method_class

SECTIONS = ("methods", "corruptions", "multistream", "profile")


def default_methods() -> list[str]:
    """Every registered method that runs on the perf models as they are, in registry order:
    those that ``require`` nothing more, or only source data, which the perf code makes up
    (:func:`benchmarks.perf.methods.source_data_for`; bcn needs a BCN-trained model)."""
    return [
        name for name in tta.registered_methods()
        if method_class(name).requires is None or method_class(name).source_data_argument is not None
    ]


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _sizes(text: str) -> dict[str, int]:
    out = {}
    for part in _names(text):
        name, _, value = part.partition("=")
        if name not in MODELS or not value:
            raise argparse.ArgumentTypeError(f"expected MODEL=SIZE with MODEL in {sorted(MODELS)}, got {part!r}")
        out[name] = int(value)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.perf",
        description="Adaptation overhead vs plain inference, corruption generation speed, "
        "multi-stream throughput and hot-path profiling; prints and saves a Markdown table.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (about 3 minutes on 2 CPU cores)")
    parser.add_argument("--device", default="all", choices=("all", "cpu", "cuda"), help="'all': CPU, and CUDA when present")
    parser.add_argument("--sections", type=_names, default=list(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    parser.add_argument("--models", type=_names, default=list(MODELS), help=f"comma list of {','.join(MODELS)}")
    parser.add_argument("--methods", type=_names, default=default_methods(), help="comma list of method names (default: the registry's, see default_methods)")
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 16, 64, 256])
    parser.add_argument("--sizes", type=_sizes, default={}, help="input sizes, e.g. resnet50=64,vit_tiny=32 (default: 64/32 on CPU, 224 on CUDA)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant first")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds per timed block (calls are repeated to reach it)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--target-batch", type=int, default=64, help="batch size the ratio targets refer to")
    parser.add_argument("--corruption-batch", type=int, default=None, help="default 256 on CPU, 1024 on CUDA")
    parser.add_argument("--corruption-severity", type=int, default=5)
    parser.add_argument("--reference-images", type=int, default=16, help="images per timed block of the NumPy reference")
    parser.add_argument("--corruptions", type=_names, default=None, help="subset of corruption names")
    parser.add_argument("--streams-model", default="cifar_resnet26", choices=sorted(MODELS))
    parser.add_argument("--streams-methods", type=_names, default=["norm", "unmix_tns"])
    parser.add_argument("--streams-batch", type=int, default=64)
    parser.add_argument("--streams-batches", type=int, default=3, help="batches per stream")
    parser.add_argument("--profile-model", default="cifar_resnet26", choices=sorted(MODELS))
    parser.add_argument("--profile-batch", type=int, default=None, help="default: --target-batch")
    parser.add_argument("--long-stream-steps", type=int, default=500, help="steps of the memory-growth check")
    parser.add_argument("--long-stream-batch", type=int, default=16)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile of the statistics methods (slow to compile)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default="outputs/perf", help="folder for perf.md, perf.json and the profiler tables")
    args = parser.parse_args(argv)
    if args.quick:
        defaults = parser.parse_args([])
        quick = dict(
            batch_sizes=[1, 16, 64], repeats=3, warmup=1, min_time=0.1, sizes={"resnet50": 32, "vit_tiny": 32},
            reference_images=4, streams_batch=16, streams_batches=2, long_stream_steps=100, corruption_batch=64,
        )
        for key, value in quick.items():
            if getattr(args, key) == getattr(defaults, key):
                setattr(args, key, value)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    for model in args.models:
        if model not in MODELS:
            parser.error(f"unknown model {model!r}; choose from {sorted(MODELS)}")
    return args


def _devices(choice: str) -> list[torch.device]:
    cuda = torch.cuda.is_available()
    if choice == "cuda" and not cuda:
        raise SystemExit("--device cuda: no CUDA device")
    if choice == "cpu" or (choice == "all" and not cuda):
        return [torch.device("cpu")]
    if choice == "cuda":
        return [torch.device("cuda")]
    return [torch.device("cpu"), torch.device("cuda")]


def _load() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def _environment(devices: list[torch.device]) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": _load(),
    }
    if any(d.type == "cuda" for d in devices):
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _profile_section(args: argparse.Namespace, device: torch.device, out: Path, log: Any) -> dict[str, Any]:
    import copy

    from benchmarks.perf import profiling

    size = MODELS[args.profile_model].size(device, args.sizes.get(args.profile_model))
    batch = args.profile_batch or args.target_batch
    model = build_model(args.profile_model, device, size)
    torch.manual_seed(0)
    x = torch.rand(batch, 3, size, size, device=device)
    x_long = torch.rand(args.long_stream_batch, 3, size, size, device=device)

    def plain() -> object:
        with torch.inference_mode():
            return model(x)

    section: dict[str, Any] = {"model": args.profile_model, "batch_size": batch, "input_size": size,
                               "long_stream_steps": args.long_stream_steps, "long_stream_batch": args.long_stream_batch,
                               "methods": {}}
    summary = profiling.profile_step(plain, device)
    section["plain_ops"] = summary["ops"]
    (out / f"profile_{device.type}_plain.txt").write_text(summary["table"])
    registered = set(tta.available_methods())
    for method in [m for m in args.methods if m in registered and m != "source"]:
        try:
            adapted = tta.adapt(copy.deepcopy(model), method)
        except ValueError as error:
            section["methods"][method] = {"status": f"n/a: {error}"[:100]}
            continue
        info: dict[str, Any] = {}
        call = lambda a=adapted: a(x)  # noqa: E731
        summary = profiling.profile_step(call, device)
        info["syncs"], info["ops"] = summary["syncs"], summary["ops"]
        (out / f"profile_{device.type}_{method}.txt").write_text(summary["table"])
        if args.long_stream_steps > 0:
            long_adapted = tta.adapt(copy.deepcopy(model), method)
            info["memory"] = profiling.memory_growth(lambda a=long_adapted: a(x_long), device, steps=args.long_stream_steps)
        section["methods"][method] = info
        log(f"  {device} {method:<10} host-sync ops/step: {info['syncs'] or 'none'}; leaf ops/step {info['ops']:.0f} "
            f"(plain {section['plain_ops']:.0f}); RSS growth {info.get('memory', {}).get('rss_growth_mib', float('nan')):.1f} MiB")
    if args.compile:
        section["compile"] = {}
        for method in [m for m in ("norm", "alpha_bn", "unmix_tns") if m in args.methods]:
            def build(name: str = method) -> Any:
                torch.manual_seed(0)
                return tta.adapt(model, name)

            try:
                result = profiling.compile_speedup(build, x, device, repeats=args.repeats, min_time=args.min_time, plain=model)
            except Exception as error:  # noqa: BLE001 - report why compile does not apply
                result = {"error": f"{type(error).__name__}: {error}"[:300]}
            section["compile"][method] = result
            log(f"  {device} compile {method}: {result}")
    return section


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    devices = _devices(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, flush=True)

    from benchmarks.perf import report
    from benchmarks.perf.corruption_speed import measure_corruptions
    from benchmarks.perf.methods import measure_methods
    from benchmarks.perf.multistream import measure_multistream

    env = _environment(devices)
    command = "python -m benchmarks.perf " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started = time.perf_counter()
    method_rows, corruption_rows, stream_rows, profile = [], [], [], {}
    for device in devices:
        if "methods" in args.sections:
            log(f"== methods vs plain inference on {device} ==")
            method_rows += measure_methods(
                device, args.models, args.batch_sizes, args.methods, sizes=args.sizes, repeats=args.repeats,
                warmup=args.warmup, min_time=args.min_time, memory=not args.no_memory, log=log,
            )
        if "corruptions" in args.sections:
            log(f"== corruption generation on {device} ==")
            batch = args.corruption_batch or (1024 if device.type == "cuda" else 256)
            corruption_rows += measure_corruptions(
                device, names=args.corruptions, batch_size=batch, severity=args.corruption_severity,
                reference_images=args.reference_images, repeats=max(1, min(args.repeats, 3)), min_time=args.min_time, log=log,
            )
        if "multistream" in args.sections:
            log(f"== multi-stream vs sequential evaluation on {device} ==")
            stream_rows += measure_multistream(
                device, model_name=args.streams_model, methods=tuple(args.streams_methods), batch_size=args.streams_batch,
                batches_per_stream=args.streams_batches, repeats=max(1, min(args.repeats, 3)), log=log,
            )
        if "profile" in args.sections:
            log(f"== profile on {device} ==")
            profile[device.type] = _profile_section(args, device, out, log)
    env["load_average_end"] = _load()
    env["seconds"] = round(time.perf_counter() - started, 1)
    checks = report.check_targets(
        method_rows, corruption_rows, stream_rows, measured_devices=[str(d) for d in devices], target_batch=args.target_batch
    )
    sizes = {name: MODELS[name].size(d, args.sizes.get(name)) for name in args.models for d in devices}
    markdown = "\n".join(
        [
            "# Performance run",
            "",
            f"`{command}`",
            "",
            f"{env['date']}; torch {env['torch']}; {env['cpu_count']} CPUs, {env['torch_threads']} torch threads"
            + (f"; GPU {env['gpu']}" if "gpu" in env else "; no GPU (GPU figures not measured)")
            + f"; load average {env['load_average_start']} at start, {env['load_average_end']} at end; {env['seconds']} s.",
            "",
            f"Input sizes: {', '.join(f'{k} {v}px' for k, v in sizes.items())}. Times are medians of {args.repeats} "
            "interleaved repeats; ratios are paired per repeat. Peak memory is per call (CPU: tensor allocations "
            "recorded by torch.profiler; CUDA: max_memory_allocated).",
            "",
            "## Targets",
            "",
            report.targets_table(checks),
            "",
            "## Methods vs plain inference",
            report.methods_table(method_rows) if method_rows else "\n(not measured)",
            "",
            "## Corruption generation",
            "",
            report.corruptions_table(corruption_rows),
            "",
            "## Multi-stream evaluation (15 corruptions) vs 15 sequential runs",
            "",
            report.streams_table(stream_rows),
            "",
            "## Profile",
            report.profile_tables(profile) if profile else "\n(not measured)",
            "",
        ]
    )
    protocol = _protocol(args, devices)
    results = {
        "command": command,
        "protocol": protocol.to_dict(),
        "fingerprint": protocol.fingerprint(),
        "environment": env,
        "args": {k: v for k, v in vars(args).items()},
        "targets": [c.to_dict() for c in checks],
        "methods": [r.to_dict() for r in method_rows],
        "corruptions": [r.to_dict() for r in corruption_rows],
        "multistream": [r.to_dict() for r in stream_rows],
        "profile": profile,
    }
    (out / "perf.md").write_text(markdown)
    (out / "perf.json").write_text(json.dumps(results, indent=1, default=str))  # devices, paths
    print("\n" + markdown)
    print(f"saved {out / 'perf.md'} and {out / 'perf.json'}")
    return results


def _protocol(args: argparse.Namespace, devices: list[torch.device]) -> Any:
    """The typed protocol block of this perf run (benchmarks.protocol.PerfProtocol)."""
    from benchmarks.protocol import MethodProtocol, PerfProtocol, resolved_hparams, software_protocol

    methods = {
        name: MethodProtocol(name=name, hparams=resolved_hparams(tta.MethodSpec.parse(name))) for name in args.methods
    }
    return PerfProtocol(
        models={
            name: {
                "label": MODELS[name].label,
                "weights": "random, torch.manual_seed(0); BatchNorm statistics calibrated on 2 random batches",
                "input_size": {d.type: MODELS[name].size(d, args.sizes.get(name)) for d in devices},
            }
            for name in args.models
        },
        inputs={"kind": "uniform random in [0, 1]", "seed": 0},
        methods=methods,
        batch_sizes=tuple(int(b) for b in args.batch_sizes),
        metric={
            "name": "seconds per call",
            "definition": f"median over {args.repeats} interleaved repeats (after {args.warmup} warm-up calls) "
            "of the wall-clock time of one adapting forward; ratios paired per repeat",
            "memory": "peak per call (CPU: torch.profiler allocations; CUDA: max_memory_allocated)",
        },
        software=tuple(software_protocol(d) for d in devices),
    )

