"""Online ER with plain BN vs AdaB²N (vs BCN + WS) on Split digits or Split CIFAR-10.

The protocol of the AdaB²N paper's online setting (Lyu et al., NeurIPS 2023; ALGORITHMS.md
§6), scaled to CPUs: class-incremental tasks of 2 classes, one pass over the stream in
incoming batches of 10, experience replay from a reservoir buffer with a replay mini-batch
concatenated to every batch, SGD without momentum, reduced ResNet-18 (nf = 20). The same
seed gives both normalizations the same initial weights, stream order and buffer draws.
Metrics are Si-Blurry's (A_auc, A_last, A_avg, F_last; §9.5), measured on the classes seen
so far.

    python -m continual.experiments.compare_norms --benchmark digits
    python -m continual.experiments.compare_norms --benchmark cifar10 --train-per-class 2000

Prints a mean ± std table over seeds and writes every run to ``--out`` (JSON).
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

from continual.metrics.online import OnlineAccuracyMetrics
from continual.models import reduced_resnet18, small_cnn
from continual.plugin import NormalizationPlugin
from continual.replay import ReservoirReplayPlugin
from continual.scenarios import online_stream, split_cifar10, split_digits


@dataclass
class RunConfig:
    """One online ER run."""

    benchmark: str = "digits"
    norm: str = "bn"
    seed: int = 0
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
    eval_period: int = 200
    train_per_class: int | None = None
    test_per_class: int | None = None
    threads: int = 1
    norm_options: dict[str, Any] = field(default_factory=dict)


def build_scenario(config: RunConfig):
    if config.benchmark == "digits":
        return split_digits(config.n_experiences)
    if config.benchmark == "cifar10":
        return split_cifar10(
            config.n_experiences, train_per_class=config.train_per_class, test_per_class=config.test_per_class
        )
    raise ValueError(f"unknown benchmark {config.benchmark!r}")


def build_model(config: RunConfig, num_classes: int) -> torch.nn.Module:
    if config.model == "rr18":
        return reduced_resnet18(num_classes, nf=config.nf)
    if config.model == "cnn":
        return small_cnn(num_classes, width=config.nf)
    raise ValueError(f"unknown model {config.model!r}")


def norm_plugin(config: RunConfig) -> NormalizationPlugin:
    if config.norm == "adab2n":
        return NormalizationPlugin(
            "adab2n", num_tasks=config.n_experiences, kappa=config.kappa, lambd=config.lambd, ada_t0=config.ada_t0
        )
    return NormalizationPlugin(config.norm, **config.norm_options)  # type: ignore[arg-type]


def run(config: RunConfig, scenario=None, progress: bool = True) -> dict[str, Any]:
    """Train one online ER run and return its metrics and timing."""
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    torch.set_num_threads(config.threads)
    scenario = scenario if scenario is not None else build_scenario(config)
    num_classes = len(set().union(*(set(e.classes_in_this_experience) for e in scenario.train_stream)))
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    model = build_model(config, num_classes)
    metric = OnlineAccuracyMetrics.from_stream(scenario.test_stream, num_classes, eval_period=config.eval_period)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No loggers specified")
        strategy = Naive(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=config.lr),
            criterion=torch.nn.CrossEntropyLoss(),
            train_mb_size=config.batch_size,
            train_epochs=config.passes,
            eval_mb_size=256,
            plugins=[
                norm_plugin(config),
                ReservoirReplayPlugin(config.mem_size, config.batch_size, config.mem_batch_size),
            ],
            evaluator=EvaluationPlugin(metric, loggers=[]),
        )
    total = sum(len(e.dataset) for e in scenario.train_stream)
    start = time.perf_counter()
    stream = online_stream(scenario.train_stream, config.batch_size, seed=config.seed)
    with tqdm(total=total, desc=f"{config.benchmark} {config.norm} seed {config.seed}", unit="img",
              disable=not progress, leave=False) as bar:
        for experience in stream:
            strategy.train(experience)
            bar.update(len(experience.dataset))
    return {
        "config": asdict(config),
        "metrics": metric.result(),
        "task_accuracies": metric.task_accuracies,
        "curve": metric.curve,
        "seconds": time.perf_counter() - start,
    }


def summarize(runs: list[dict[str, Any]]) -> str:
    """Markdown table of mean ± std (over seeds) per normalization, in percent."""
    names = ["A_auc", "A_last", "A_avg", "F_last"]
    lines = ["| norm | seeds | " + " | ".join(names) + " | s/run |", "|---" * (len(names) + 3) + "|"]
    for norm in dict.fromkeys(run["config"]["norm"] for run in runs):
        group = [run for run in runs if run["config"]["norm"] == norm]
        cells = []
        for name in names:
            values = 100 * np.array([run["metrics"][name] for run in group])
            cells.append(f"{values.mean():.1f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.1f}")
        seconds = np.mean([run["seconds"] for run in group])
        lines.append(f"| {norm} | {len(group)} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    return "\n".join(lines)


def _parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, RunConfig]:
    defaults = RunConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", choices=["digits", "cifar10"], default="digits")
    parser.add_argument("--norms", nargs="+", default=["bn", "adab2n"], choices=["bn", "adab2n", "bcn_ws"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None, help="JSON file for all runs")
    for name, value in asdict(defaults).items():
        if name in ("benchmark", "norm", "seed", "norm_options"):
            continue
        kind = int if name in ("train_per_class", "test_per_class") else type(value)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    args = parser.parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if k in asdict(defaults)}
    return args, RunConfig(**fields)


def main(argv: list[str] | None = None) -> None:
    args, base = _parse(argv)
    scenario = build_scenario(base)
    runs = []
    jobs = [(seed, norm) for seed in args.seeds for norm in args.norms]
    for seed, norm in tqdm(jobs, desc="runs", unit="run"):
        config = RunConfig(**{**asdict(base), "seed": seed, "norm": norm})
        result = run(config, scenario)
        runs.append(result)
        tqdm.write(f"seed {seed} {norm}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in result["metrics"].items())
                   + f" ({result['seconds']:.0f} s)")
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(runs, indent=1))
    print(summarize(runs))


if __name__ == "__main__":
    main()
