"""Online ER or naive fine-tuning with plain BN vs AdaB²N (vs BCN + WS) on digits or CIFAR-10.

The protocol of the AdaB²N paper's online setting (Lyu et al., NeurIPS 2023; docs/METHODS.md
§6), scaled to CPUs: class-incremental tasks of 2 classes, one pass over the stream in
incoming batches of 10, experience replay from a reservoir buffer with a replay mini-batch
concatenated to every batch, SGD without momentum, reduced ResNet-18 (nf = 20). The same
seed gives every normalization the same initial weights, stream order and buffer draws.
Metrics are Si-Blurry's (A_auc, A_last, A_avg, F_last; §9.5), measured on the classes seen
so far.

Variations:

* ``--strategy naive``: plain online fine-tuning, no replay buffer at all. AdaB²N's
  regularizer then acts on every step (``--regularize-on auto``), since the official "replay
  steps only" rule would switch it off.
* ``--scenario si_blurry``: the Si-Blurry stream (Moon et al., ICCV 2023; §9.5) built from the
  same data with the paper's defaults N = 50 % disjoint classes and M = 10 % blurred samples
  (``--disjoint-pct``, ``--blurry-pct``), stochastic split seeded with the run seed, stream
  kept in the splitter's presentation order. AdaB²N gives a sample the task in which its
  class was first seen, which is defined on blurry streams.

    python -m continual.experiments.compare_norms --benchmark digits
    python -m continual.experiments.compare_norms --benchmark cifar10 --train-per-class 2000
    python -m continual.experiments.compare_norms --benchmark digits --strategy naive --scenario si_blurry

Prints a mean ± std table over seeds, one row per (benchmark, scenario, strategy, norm), and
writes every run to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.data.base import ImageArrays
from continual.metrics.online import OnlineAccuracyMetrics
from continual.models import reduced_resnet18, small_cnn
from continual.plugin import NormalizationPlugin
from continual.replay import ReservoirReplayPlugin
from continual.scenarios import class_incremental, online_stream, si_blurry_benchmark
from continual.subsets import per_class_subset

# Closed choices of the string fields (the CLI validates them; run() fails early on others).
CHOICES: dict[str, tuple[str, ...]] = {
    "benchmark": ("digits", "cifar10"),
    "norm": ("bn", "adab2n", "bcn_ws"),
    "strategy": ("er", "naive"),
    "scenario": ("split", "si_blurry"),
    "regularize_on": ("auto", "replay", "always"),
}


@dataclass
class RunConfig:
    """One online run."""

    benchmark: str = "digits"
    norm: str = "bn"
    seed: int = 0
    strategy: str = "er"
    scenario: str = "split"
    model: str = "rr18"
    nf: int = 20
    n_experiences: int = 5
    batch_size: int = 10
    mem_size: int = 200
    mem_batch_size: int = 10
    passes: int = 1
    lr: float = 0.03
    kappa: float = 0.4
    lambd: float = 0.1
    ada_t0: int = 0
    regularize_on: str = "auto"
    disjoint_pct: int = 50
    blurry_pct: int = 10
    eval_period: int = 200
    train_per_class: int | None = None
    test_per_class: int | None = None
    threads: int = 1
    norm_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")


def load_data(config: RunConfig) -> tuple[ImageArrays, ImageArrays]:
    """Train and test arrays of the benchmark, cut to ``*_per_class`` (seed 0) if given."""
    if config.benchmark == "digits":
        from benchmarks.data import load_digits

        train, test = load_digits("train"), load_digits("test")
    else:
        from benchmarks.data.folder import cifar10_jpeg

        train, test = cifar10_jpeg("train"), cifar10_jpeg("test")
    return per_class_subset(train, config.train_per_class), per_class_subset(test, config.test_per_class)


def build_scenario(config: RunConfig):
    """The task streams; a Si-Blurry split depends on ``config.seed`` (one split per seed)."""
    train, test = load_data(config)
    if config.scenario == "split":
        return class_incremental(train, test, config.n_experiences)
    # Si-Blurry's official runs seed the splitter with the run seed (§9.5), so every seed
    # draws its own class partition and blur.
    return si_blurry_benchmark(
        train, test, num_tasks=config.n_experiences, disjoint_pct=config.disjoint_pct,
        blurry_pct=config.blurry_pct, seed=config.seed,
    )


def build_model(config: RunConfig, num_classes: int) -> torch.nn.Module:
    if config.model == "rr18":
        return reduced_resnet18(num_classes, nf=config.nf)
    if config.model == "cnn":
        return small_cnn(num_classes, width=config.nf)
    raise ValueError(f"unknown model {config.model!r}")


def regularize_on(config: RunConfig) -> str:
    """AdaB²N's regularizer steps: ``auto`` is the official "replay steps" for ER, and every
    step for naive training, which has no replay step (the regularizer would never act)."""
    if config.regularize_on != "auto":
        return config.regularize_on
    return "replay" if config.strategy == "er" else "always"


def norm_plugin(config: RunConfig) -> NormalizationPlugin:
    if config.norm == "adab2n":
        return NormalizationPlugin(
            "adab2n", num_tasks=config.n_experiences, kappa=config.kappa, lambd=config.lambd,
            ada_t0=config.ada_t0, regularize_on=regularize_on(config),  # type: ignore[arg-type]
        )
    return NormalizationPlugin(config.norm, **config.norm_options)  # type: ignore[arg-type]


def training_plugins(config: RunConfig) -> list[Any]:
    """The normalization plugin, plus the reservoir replay plugin for ER only."""
    plugins: list[Any] = [norm_plugin(config)]
    if config.strategy == "er":
        plugins.append(ReservoirReplayPlugin(config.mem_size, config.batch_size, config.mem_batch_size))
    return plugins


def build_strategy(config: RunConfig, model: torch.nn.Module, metric: OnlineAccuracyMetrics):
    """Avalanche ``Naive`` with :func:`training_plugins`: online ER, or fine-tuning alone."""
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No loggers specified")
        return Naive(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=config.lr),
            criterion=torch.nn.CrossEntropyLoss(),
            train_mb_size=config.batch_size,
            train_epochs=config.passes,
            eval_mb_size=256,
            plugins=training_plugins(config),
            evaluator=EvaluationPlugin(metric, loggers=[]),
        )


def run_protocol(config: RunConfig, model: torch.nn.Module, num_classes: int) -> Any:
    """The typed protocol block of a run (:class:`benchmarks.protocol.ContinualProtocol`):
    initial weights, the exact data arrays, the scenario, the metrics and the software."""
    from benchmarks.protocol import (
        ContinualDataProtocol, ContinualProtocol, ContinualSettingProtocol, InputProtocol, MethodProtocol,
        MetricProtocol, ModelProtocol, arrays_sha256, normalization_layers, software_protocol, state_dict_sha256,
    )

    train, test = load_data(config)
    norm = {"kappa": config.kappa, "lambd": config.lambd, "ada_t0": config.ada_t0,
            "regularize_on": regularize_on(config)} if config.norm == "adab2n" else dict(config.norm_options)
    return ContinualProtocol(
        model=ModelProtocol(
            kind="continual", arch=config.model, label=f"{config.model}(nf={config.nf})",
            weights_sha256=state_dict_sha256(model.state_dict()),  # the seeded initial weights
            normalization_layers=normalization_layers(model), num_classes=num_classes,
        ),
        input=InputProtocol(resolution=int(train.images.shape[1])),
        data=ContinualDataProtocol(
            benchmark=config.benchmark, train_sha256=arrays_sha256(train), test_sha256=arrays_sha256(test),
            train_per_class=config.train_per_class, test_per_class=config.test_per_class, num_classes=num_classes,
            train_samples=len(train), test_samples=len(test),
        ),
        setting=ContinualSettingProtocol(
            scenario=config.scenario, strategy=config.strategy, n_experiences=config.n_experiences,
            batch_size=config.batch_size, passes=config.passes,
            scenario_params=({"disjoint_pct": config.disjoint_pct, "blurry_pct": config.blurry_pct}
                             if config.scenario == "si_blurry" else {"shuffle_within_task": True}),
            replay={"mem_size": config.mem_size, "mem_batch_size": config.mem_batch_size} if config.strategy == "er" else {},
            seeds={"run": config.seed},
        ),
        metric=MetricProtocol(
            name="A_auc,A_last,A_avg,F_last",
            # recorded text, part of the fingerprint of existing records: the section is now
            # docs/METHODS.md §9.5
            definition="Si-Blurry's online metrics (ALGORITHMS.md §9.5) on the test samples of the classes seen so far",
            averaging="A_auc: mean of the accuracy measured every eval_period samples; A_avg: mean over task ends",
            window=config.eval_period,
        ),
        method=MethodProtocol(
            name=f"{config.strategy}+{config.norm}",
            hparams={config.norm: norm, "sgd": {"lr": config.lr, "momentum": 0.0}},
        ),
        software=software_protocol("cpu"),
    )


_METRIC_STATE = ("samples_seen", "seen", "schedule", "curve", "task_accuracies", "class_accuracies")


def _training_state(strategy: Any, metric: OnlineAccuracyMetrics) -> dict[str, Any]:
    """What a mid-stream checkpoint needs besides the model and the RNGs. The optimizer is
    left out: Avalanche resets it at every ``train()`` call, i.e. every online batch."""
    state: dict[str, Any] = {
        "metric": {name: getattr(metric, name) for name in _METRIC_STATE},
        "clock": strategy.clock,
        "plugins": [],
    }
    for plugin in strategy.plugins:
        if isinstance(plugin, NormalizationPlugin):
            state["plugins"].append(plugin.state_dict())
        elif isinstance(plugin, ReservoirReplayPlugin):
            state["plugins"].append(plugin.storage_policy)  # the buffer, pickled whole
    return state


def _restore_training_state(strategy: Any, metric: OnlineAccuracyMetrics, state: dict[str, Any]) -> None:
    for name in _METRIC_STATE:
        setattr(metric, name, state["metric"][name])
    strategy.clock = state["clock"]
    saved = iter(state["plugins"])
    for plugin in strategy.plugins:
        if isinstance(plugin, NormalizationPlugin):
            plugin.load_state_dict(next(saved))
        elif isinstance(plugin, ReservoirReplayPlugin):
            plugin.storage_policy = next(saved)


def run(config: RunConfig, scenario=None, progress: bool = True, checkpoint: Any = None) -> dict[str, Any]:
    """Train one online run and return its metrics and timing.

    ``scenario`` must come from :func:`build_scenario` of a config with the same data fields
    (and, for Si-Blurry, the same seed); None builds it. ``checkpoint``: a
    :class:`benchmarks.evaluation.StreamCheckpoint` (its fingerprint is replaced by this
    run's protocol fingerprint); the run checkpoints every ``checkpoint.every`` online
    batches and continues from a checkpoint of the same protocol, with the same result as an
    uninterrupted run.
    """
    torch.set_num_threads(config.threads)
    scenario = scenario if scenario is not None else build_scenario(config)
    num_classes = len(set().union(*(set(e.classes_in_this_experience) for e in scenario.train_stream)))
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    model = build_model(config, num_classes)
    protocol = run_protocol(config, model, num_classes)
    metric = OnlineAccuracyMetrics.from_stream(scenario.test_stream, num_classes, eval_period=config.eval_period)
    strategy = build_strategy(config, model, metric)
    total = sum(len(e.dataset) for e in scenario.train_stream)
    position, resumed_at = 0, None
    if checkpoint is not None:
        checkpoint.fingerprint, checkpoint.protocol = protocol.fingerprint(), protocol.to_dict()
        checkpoint.weights_only = False  # the replay buffer and Avalanche's clock are pickled objects
        payload = checkpoint.load()
        if payload is not None:
            # The checkpointed model has the converted normalization layers: convert first.
            norm = next(p for p in strategy.plugins if isinstance(p, NormalizationPlugin))
            strategy.model = norm.install(strategy.model)
            checkpoint.restore(payload, strategy.model)
            _restore_training_state(strategy, metric, payload["extra"])
            position = resumed_at = int(payload["position"])
    start = time.perf_counter()
    # Split tasks are shuffled within each task; a Si-Blurry stream keeps the splitter's
    # presentation order (its blurred samples' positions are part of the scenario).
    stream = online_stream(
        scenario.train_stream, config.batch_size, shuffle=config.scenario == "split", seed=config.seed
    )
    desc = f"{config.benchmark} {config.scenario} {config.strategy} {config.norm} seed {config.seed}"
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for index, experience in enumerate(stream):
            if index >= position:  # batches before a resumed position were trained already
                strategy.train(experience)
                if checkpoint is not None and checkpoint.due(index + 1, None):
                    checkpoint.save(
                        model=strategy.model, position=index + 1, recorders=[],
                        extra=_training_state(strategy, metric),
                    )
            bar.update(len(experience.dataset))
    if checkpoint is not None:
        checkpoint.remove()
    return {
        "config": asdict(config),
        "protocol": protocol.to_dict(),
        "fingerprint": protocol.fingerprint(),
        "plugins": [type(plugin).__name__ for plugin in strategy.plugins],
        "metrics": metric.result(),
        "task_accuracies": metric.task_accuracies,
        "curve": metric.curve,
        "seconds": time.perf_counter() - start,
        "resumed_at_batch": resumed_at,
    }


GROUP_KEYS = ("benchmark", "scenario", "strategy", "norm")
# Records written before the strategy and scenario options existed were split-scenario ER.
_GROUP_DEFAULTS = {"strategy": "er", "scenario": "split"}


def group_key(run: dict[str, Any]) -> tuple[str, ...]:
    """The fields that tell runs of different kinds apart (only seeds are averaged)."""
    return tuple(str(run["config"].get(key, _GROUP_DEFAULTS.get(key))) for key in GROUP_KEYS)


def summarize(runs: list[dict[str, Any]]) -> str:
    """Markdown table of mean ± std (over seeds) per (benchmark, scenario, strategy, norm), in percent."""
    names = ["A_auc", "A_last", "A_avg", "F_last"]
    header = " | ".join(GROUP_KEYS)
    lines = [
        f"| {header} | seeds | " + " | ".join(names) + " | s/run |",
        "|---" * (len(names) + len(GROUP_KEYS) + 2) + "|",
    ]
    for key in dict.fromkeys(group_key(run) for run in runs):
        group = [run for run in runs if group_key(run) == key]
        cells = []
        for name in names:
            values = 100 * np.array([run["metrics"][name] for run in group])
            cells.append(f"{values.mean():.1f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.1f}")
        seconds = np.mean([run["seconds"] for run in group])
        lines.append(f"| {' | '.join(key)} | {len(group)} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    return "\n".join(lines)


_HELP = {
    "strategy": "er: online ER with a reservoir buffer; naive: online fine-tuning, no replay",
    "scenario": "split: class-incremental tasks; si_blurry: Si-Blurry stream (one split per seed)",
    "regularize_on": "AdaB²N regularizer steps; auto: replay steps for er, every step for naive",
    "disjoint_pct": "si_blurry N: percentage of disjoint classes (paper default 50)",
    "blurry_pct": "si_blurry M: percentage of blurry-class samples blurred across tasks (paper default 10)",
    "train_per_class": "keep this many training samples per class (seeded subset)",
    "test_per_class": "keep this many test samples per class (seeded subset)",
}


def _parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, RunConfig]:
    defaults = RunConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--norms", nargs="+", default=["bn", "adab2n"], choices=CHOICES["norm"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None, help="JSON file for all runs")
    parser.add_argument(
        "--checkpoint-every", type=int, default=0, metavar="N",
        help="checkpoint every N online batches into <out>.checkpoints/ (needs --out); running the same "
        "command again skips the runs already in --out and continues the interrupted one",
    )
    for name, value in asdict(defaults).items():
        if name in ("norm", "seed", "norm_options"):
            continue
        kind = int if name in ("train_per_class", "test_per_class") else type(value)
        parser.add_argument(
            "--" + name.replace("_", "-"), type=kind, default=value, choices=CHOICES.get(name), help=_HELP.get(name)
        )
    args = parser.parse_args(argv)
    if args.checkpoint_every and args.out is None:
        parser.error("--checkpoint-every needs --out (the checkpoints go beside it)")
    fields = {k: v for k, v in vars(args).items() if k in asdict(defaults)}
    return args, RunConfig(**fields)


def main(argv: list[str] | None = None) -> None:
    args, base = _parse(argv)
    # A Si-Blurry split depends on the seed, a class-incremental one does not. Jobs run
    # seed by seed, so only the current scenario is kept (a CIFAR-10 one holds 150 MB).
    scenario, scenario_key = None, None
    runs = []
    finished: list[dict[str, Any]] = []
    if args.checkpoint_every and args.out.is_file():
        finished = json.loads(args.out.read_text())
    jobs = [(seed, norm) for seed in args.seeds for norm in args.norms]
    for seed, norm in tqdm(jobs, desc="runs", unit="run"):
        config = RunConfig(**{**asdict(base), "seed": seed, "norm": norm})
        done = [r for r in finished if r.get("config") == json.loads(json.dumps(asdict(config)))]
        if done:  # finished before an interruption: keep its record
            runs.append(done[0])
            continue
        key = seed if config.scenario == "si_blurry" else None
        if scenario is None or key != scenario_key:
            scenario, scenario_key = build_scenario(config), key
        checkpoint = None
        if args.checkpoint_every:
            from benchmarks.evaluation import StreamCheckpoint

            name = f"{config.benchmark}-{config.scenario}-{config.strategy}-{norm}-seed{seed}.pt"
            checkpoint = StreamCheckpoint(args.out.with_name(args.out.name + ".checkpoints") / name, args.checkpoint_every, "")
        result = run(config, scenario, checkpoint=checkpoint)
        runs.append(result)
        tqdm.write(f"seed {seed} {norm}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in result["metrics"].items())
                   + f" ({result['seconds']:.0f} s)")
        if args.out is not None:
            from benchmarks.files import atomic_write_text

            atomic_write_text(args.out, json.dumps(runs, indent=1))
    print(summarize(runs))


if __name__ == "__main__":
    main()
