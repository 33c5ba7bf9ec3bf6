"""The reality-check protocol (Cha & Moon, 2024) for the normalization comparison.

"Hyperparameters in Continual Learning: a Reality Check" argues that choosing each method's
hyperparameters by its score on the very scenario it is reported on overstates it. Its
protocol has two phases on *different data* that share the *same CL scenario*:

1. **tuning phase**: every method searches its declared space on the tuning data and
   freezes the values with the best criterion (A_auc by default);
2. **evaluation phase**: the frozen values run once per seed on the evaluation data, with
   no re-tuning. Only this phase is reported.

For comparison the usual protocol is run too: the same search directly on the evaluation
data, its best values reported on the evaluation data. The table shows both and how the
ranking of the methods changes between them.

Methods are (strategy, norm) pairs of :mod:`continual.experiments.compare_norms` (ER or
Naive × BN, AdaB²N, BCN + WS); spaces (Hydra sweep syntax, expanded by
:func:`continual.search_space.grid`): the learning rate for all, κ and λ for AdaB²N, the
number of groups for BCN + WS. The default pair is Split digits (tuning) → Split CIFAR-10
(evaluation), both class-incremental with 5 tasks of 2 classes, about 108 training and
70 test samples per class, the same online batch, replay memory, evaluation period and
model: different data, same scenario.

    python -m continual.experiments.reality_check --out results/reality_check.json

Runs are cached in ``--out`` by their full configuration, so an interrupted call resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from continual.experiments.compare_norms import RunConfig, build_scenario, run
from continual.search_space import grid

#: searched values (Hydra sweep syntax). The learning rate belongs to the strategy: it is
#: searched with BN, and each other norm searches its own values at the chosen rate.
DEFAULT_SPACES: dict[str, dict[str, str]] = {
    "bn": {"lr": "0.03,0.1"},
    "adab2n": {"kappa": "0.2,0.8", "lambd": "0.03,0.3"},
    "bcn_ws": {"num_groups": "4,32"},
}
#: the norm whose search fixes the strategy's shared values (the learning rate).
BASE_NORM = "bn"
METHODS: tuple[tuple[str, str], ...] = tuple((s, n) for s in ("er", "naive") for n in ("bn", "adab2n", "bcn_ws"))
#: hyperparameters that are fields of RunConfig; anything else goes to the norm's options.
_RUN_FIELDS = ("lr", "kappa", "lambd", "ada_t0", "mem_size", "mem_batch_size")
METRICS = ("A_auc", "A_last", "A_avg", "F_last")


@dataclass
class ProtocolConfig:
    """The two phases: data of each, what is shared, seeds and the selection criterion."""

    tuning: dict[str, Any] = field(default_factory=lambda: {"benchmark": "digits", "test_per_class": 70})
    evaluation: dict[str, Any] = field(
        default_factory=lambda: {"benchmark": "cifar10", "train_per_class": 108, "test_per_class": 70}
    )
    #: RunConfig fields common to both phases (the scenario and its budgets).
    shared: dict[str, Any] = field(default_factory=lambda: {"scenario": "split", "nf": 10, "eval_period": 200})
    spaces: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(DEFAULT_SPACES))
    methods: tuple[tuple[str, str], ...] = METHODS
    tuning_seeds: tuple[int, ...] = (0,)
    evaluation_seeds: tuple[int, ...] = (0, 1, 2)
    criterion: str = "A_auc"

    def __post_init__(self) -> None:
        if self.criterion not in METRICS or self.criterion == "F_last":
            raise ValueError(f"criterion must be one of A_auc, A_last, A_avg, got {self.criterion!r}")
        scenario_fields = ("scenario", "n_experiences", "batch_size", "mem_size", "mem_batch_size", "passes", "eval_period")
        for phase in (self.tuning, self.evaluation):
            clash = sorted(set(phase) & set(scenario_fields))
            if clash:
                raise ValueError(f"{clash} must be the same in both phases: put them in 'shared'")
        if self.tuning == self.evaluation:
            raise ValueError("the tuning and evaluation phases must use different data")

    def run_config(self, phase: str, strategy: str, norm: str, hparams: dict[str, Any], seed: int) -> RunConfig:
        data = self.tuning if phase == "tuning" else self.evaluation
        fields = {**self.shared, **data, "strategy": strategy, "norm": norm, "seed": seed}
        options = {}
        for name, value in hparams.items():
            if name in _RUN_FIELDS:
                fields[name] = value
            else:
                options[name] = value
        if options:
            fields["norm_options"] = options
        return RunConfig(**fields)


def _key(config: RunConfig) -> str:
    return json.dumps(asdict(config), sort_keys=True)


class RunCache:
    """Runs by configuration, persisted after each one (a rerun skips what is done)."""

    def __init__(
        self, path: Path | None, runner: Callable[[RunConfig], dict[str, Any]], also: Sequence[Path] = (),
        shared: bool = False,
    ) -> None:
        if shared and path is None:
            raise ValueError("parallel workers need a file (path) in their shared folder")
        self.path, self.runner, self.shared = path, runner, shared
        self.runs: dict[str, dict[str, Any]] = {}
        # ``also``: caches of other calls, read only. ``shared``: parallel workers, each with
        # its own file in the folder of ``path``, claim runs there and read each other's.
        self._read([*also, *([path] if path is not None else [])])

    def _read(self, sources: Sequence[Path]) -> None:
        for source in sources:
            try:
                records = json.loads(source.read_text())["runs"]
            except (OSError, ValueError, KeyError):
                continue  # absent, or being replaced right now: read again later
            for record in records:
                self.runs.setdefault(_key(RunConfig(**record["config"])), record)

    def _wait_or_claim(self, key: str) -> bool:
        """With a shared folder (several worker processes, each with its own file there):
        True if this process claimed the run, False once another worker's result is read."""
        assert self.path is not None
        claim = self.path.parent / "claims" / (hashlib.sha1(key.encode()).hexdigest() + ".claim")
        claim.parent.mkdir(parents=True, exist_ok=True)
        while True:
            self._read(sorted(self.path.parent.glob("*.json")))
            if key in self.runs:
                return False
            try:
                claim.open("x").close()
                return True
            except FileExistsError:
                time.sleep(10)  # another worker runs it

    def __call__(self, config: RunConfig) -> dict[str, Any]:
        key = _key(config)
        if key not in self.runs and (not self.shared or self._wait_or_claim(key)):
            self.runs[key] = self.runner(config)
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                temporary = self.path.with_suffix(".tmp")
                temporary.write_text(json.dumps({"runs": list(self.runs.values())}, indent=1))
                temporary.replace(self.path)
        return self.runs[key]


def default_runner(progress: bool = True) -> Callable[[RunConfig], dict[str, Any]]:
    """``run`` with the scenario of the last data setting kept (they repeat run after run)."""
    scenarios: dict[str, Any] = {}

    def runner(config: RunConfig) -> dict[str, Any]:
        data_key = json.dumps([config.benchmark, config.scenario, config.train_per_class, config.test_per_class,
                               config.n_experiences, config.seed if config.scenario == "si_blurry" else None])
        if data_key not in scenarios:
            scenarios.clear()
            scenarios[data_key] = build_scenario(config)
        result = run(config, scenarios[data_key], progress=False)
        if progress:
            metrics = ", ".join(f"{k} {100 * v:.1f}" for k, v in result["metrics"].items())
            print(f"{config.benchmark} {config.strategy} {config.norm} seed {config.seed} "
                  f"lr {config.lr} κ {config.kappa} λ {config.lambd} {config.norm_options}: {metrics} "
                  f"({result['seconds']:.0f} s)", flush=True)
        return result

    return runner


def _search(
    protocol: ProtocolConfig, phase: str, strategy: str, norm: str, runs: RunCache, base: dict[str, Any]
) -> dict[str, Any]:
    """Every point of the norm's space (on top of ``base``) on ``phase``'s data; the best by
    the criterion (mean over the tuning seeds; ties go to the first point in grid order)."""
    trials = []
    for point in grid(protocol.spaces[norm]):
        hparams = {**base, **point}
        results = [runs(protocol.run_config(phase, strategy, norm, hparams, seed)) for seed in protocol.tuning_seeds]
        score = float(np.mean([r["metrics"][protocol.criterion] for r in results]))
        trials.append({"hparams": hparams, "score": score})
    best = max(trials, key=lambda t: t["score"])  # max keeps the first of equal scores
    return {"trials": trials, "best": best}


def _evaluate(protocol: ProtocolConfig, strategy: str, norm: str, hparams: dict[str, Any], runs: RunCache) -> dict[str, Any]:
    results = [runs(protocol.run_config("evaluation", strategy, norm, hparams, seed)) for seed in protocol.evaluation_seeds]
    values = {name: 100 * np.array([r["metrics"][name] for r in results]) for name in METRICS}
    return {
        "hparams": hparams,
        "mean": {name: float(v.mean()) for name, v in values.items()},
        "std": {name: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for name, v in values.items()},
    }


def _ranks(scores: dict[tuple[str, str], float]) -> dict[tuple[str, str], int]:
    order = sorted(scores, key=lambda method: -scores[method])
    return {method: order.index(method) + 1 for method in scores}


def _choose(protocol: ProtocolConfig, phase: str, runs: RunCache) -> dict[tuple[str, str], dict[str, Any]]:
    """The searches of every method on ``phase``'s data: BN's first (it fixes the strategy's
    learning rate), then every other norm's at that rate."""
    searches: dict[tuple[str, str], dict[str, Any]] = {}
    for strategy in dict.fromkeys(s for s, _ in protocol.methods):
        shared = _search(protocol, phase, strategy, BASE_NORM, runs, {})
        base = shared["best"]["hparams"]
        for _, norm in (m for m in protocol.methods if m[0] == strategy):
            searches[(strategy, norm)] = shared if norm == BASE_NORM else _search(protocol, phase, strategy, norm, runs, base)
    return searches


def run_protocol(
    protocol: ProtocolConfig, runs: RunCache, phases: Sequence[str] = ("reality_check", "usual")
) -> list[dict[str, Any]]:
    """One row per method: tuning-phase choice and score, evaluation-phase score, the usual
    protocol's choice and score on the evaluation data, and both ranks.

    ``phases`` may name only one of the two independent chains (tuning search + frozen
    evaluation, or the usual search on the evaluation data + its evaluation), so that they
    can run in two processes; the rows then need a call with both (which reuses the runs).
    """
    methods = protocol.methods
    if "reality_check" in phases:
        tuned = _choose(protocol, "tuning", runs)
        frozen = {m: _evaluate(protocol, *m, tuned[m]["best"]["hparams"], runs) for m in methods}
    if "usual" in phases:
        usual_search = _choose(protocol, "evaluation", runs)
        usual = {m: _evaluate(protocol, *m, usual_search[m]["best"]["hparams"], runs) for m in methods}
    if set(phases) != {"reality_check", "usual"}:
        return []
    rows = [
        {"strategy": m[0], "norm": m[1], "tuning": tuned[m], "evaluation": frozen[m],
         "usual": {"search": usual_search[m], **usual[m]}}
        for m in methods
    ]
    criterion = protocol.criterion
    reality = _ranks({(r["strategy"], r["norm"]): r["evaluation"]["mean"][criterion] for r in rows})
    usual_ranks = _ranks({(r["strategy"], r["norm"]): r["usual"]["mean"][criterion] for r in rows})
    for row in rows:
        row["rank"] = reality[(row["strategy"], row["norm"])]
        row["usual_rank"] = usual_ranks[(row["strategy"], row["norm"])]
    return rows


_NAMES = {"bn": "BN", "adab2n": "AdaB²N", "bcn_ws": "BCN + WS", "er": "ER", "naive": "Naive"}


def _values(hparams: dict[str, Any]) -> str:
    short = {"kappa": "κ", "lambd": "λ", "num_groups": "G"}
    return ", ".join(f"{short.get(k, k)} {v:g}" if isinstance(v, float) else f"{short.get(k, k)} {v}" for k, v in hparams.items())


def summarize(rows: Sequence[dict[str, Any]], protocol: ProtocolConfig) -> str:
    """The Markdown table, best evaluation phase first: per method the frozen values and their
    tuning score, the evaluation-phase scores (mean ± std over seeds, %), the usual
    protocol's values and scores, and the rank under both (usual → reality check)."""
    c = protocol.criterion
    lines = [
        f"| method | frozen values (tuning) | tuning {c} | evaluation {c} | evaluation A_last | "
        f"usual-protocol values | usual {c} | usual A_last | rank: usual → reality check |",
        "|---|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for row in sorted(rows, key=lambda r: r["rank"]):
        evaluation, usual = row["evaluation"], row["usual"]
        change = row["usual_rank"] - row["rank"]
        lines.append(
            f"| {_NAMES[row['strategy']]} + {_NAMES[row['norm']]} | {_values(row['tuning']['best']['hparams'])} | "
            f"{100 * row['tuning']['best']['score']:.1f} | {evaluation['mean'][c]:.1f} ± {evaluation['std'][c]:.1f} | "
            f"{evaluation['mean']['A_last']:.1f} ± {evaluation['std']['A_last']:.1f} | "
            f"{_values(usual['hparams'])} | {usual['mean'][c]:.1f} ± {usual['std'][c]:.1f} | "
            f"{usual['mean']['A_last']:.1f} ± {usual['std']['A_last']:.1f} | "
            f"{row['usual_rank']} → {row['rank']}{'' if change == 0 else f' ({change:+d})'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/reality_check.json"))
    parser.add_argument("--nf", type=int, default=10, help="width of the reduced ResNet-18")
    parser.add_argument("--evaluation-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--strategies", nargs="+", default=["er", "naive"], choices=["er", "naive"])
    parser.add_argument("--also", type=Path, nargs="*", default=[], help="other calls' run files to reuse")
    parser.add_argument("--phases", nargs="+", default=["reality_check", "usual"], choices=["reality_check", "usual"])
    parser.add_argument("--worker", action="store_true",
                        help="one of several parallel calls: --out in a folder they share, one file each")
    parser.add_argument("--reverse", action="store_true", help="methods in reverse order (a second worker)")
    args = parser.parse_args(argv)
    protocol = ProtocolConfig(
        shared={**ProtocolConfig().shared, "nf": args.nf, "threads": args.threads},
        evaluation_seeds=tuple(args.evaluation_seeds),
        methods=tuple(m for m in (METHODS[::-1] if args.reverse else METHODS) if m[0] in args.strategies),
    )
    start = time.perf_counter()
    runs = RunCache(args.out, default_runner(), also=args.also, shared=args.worker)
    rows = run_protocol(protocol, runs, args.phases)
    if not rows:
        print(f"{len(runs.runs)} runs, {time.perf_counter() - start:.0f} s; tables need both phases")
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_name(args.out.stem + "_table.json").write_text(json.dumps({"protocol": asdict(protocol), "rows": rows}, indent=1))
    print(summarize(rows, protocol))
    print(f"\n{len(runs.runs)} runs known, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
