"""Choosing a default rule by measurement (benchmarks.select): hand-computed regrets, the
constraint, conditioned rules, refusals, dev/eval separation, and one run through the real app."""

from __future__ import annotations

import csv
import io
import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.app.records import scan_runs, write_record
from benchmarks.app.selection import (
    FALLBACK,
    Rule,
    SelectError,
    best_conditioned_rule,
    build_streams,
    current_auto_rule,
    score,
    select,
    selection_key,
)
from benchmarks.select import run_selection

NORM_LAYERS = {"bn": ["BatchNorm2d x 3"], "gn": ["GroupNorm x 3"]}


def fake_run(root: Path, method: str, error: float, *, seed: int = 0, order: str = "iid", model: str = "bn",
             batch: int = 64, weights: str | None = None) -> Path:
    """A finished run with a protocol block; ``error`` in percent."""
    run_dir = root / f"{method}-{model}-{order}-{seed}-{batch}"
    (run_dir / ".hydra").mkdir(parents=True)
    block = {
        "schema": "tta-protocol", "version": 1,
        "model": {"label": f"digits_cnn({model})", "weights_sha256": weights or f"w-{model}",
                  "normalization_layers": NORM_LAYERS[model]},
        "data": {"dataset": "digits", "sha256": "d"},
        "setting": {"label_order": order, "batch_size": batch, "seeds": {"run": seed}, "order_sha256": f"o-{order}-{seed}-{batch}"},
        "metric": {"name": "online_error"},
        "method": {"name": method, "hparams": {method: {}}},
        "software": {"git_commit": "c0ffee"},
    }
    write_record(run_dir, {
        "run_id": run_dir.name, "run_key": run_dir.name, "name": root.name, "seed": seed,
        "method": {"name": method, "hparams": {}, "label": method},
        "setting": {"model": f"digits_cnn({model})", "dataset": "digits", "label_order": order, "batch_size": batch},
        "summary": {"mean_error": error / 100},
        "protocol": block,
        "overrides": [f"method={method}", f"seed={seed}", f"stream.label_order={order}", f"model=digits_{model}",
                      f"stream.batch_size={batch}"],
    })
    return run_dir


#: dev: errors (%) of each method on stream A (BN, iid), B (BN, sorted), C (GN, iid)
DEV = {
    ("bn", "iid"): {"source": 40.0, "norm": 20.0, "lame": 45.0, "alpha_bn": 22.0},
    ("bn", "sorted"): {"source": 40.0, "norm": 70.0, "lame": 30.0, "alpha_bn": 40.4},
    ("gn", "iid"): {"source": 50.0, "norm": 30.0, "lame": 60.0, "alpha_bn": 45.0},
}
#: eval: seed 1, Dirichlet order, batch 16
EVAL = {
    ("bn", "dirichlet"): {"source": 42.0, "norm": 35.0, "lame": 30.0, "alpha_bn": 33.0},
    ("gn", "dirichlet"): {"source": 50.0, "norm": 48.0, "lame": 70.0, "alpha_bn": 49.0},
}


def write_split(root: Path, table: dict, *, seed: int, batch: int) -> list[dict]:
    for (model, order), errors in table.items():
        for method, error in errors.items():
            fake_run(root, method, error, seed=seed, order=order, model=model, batch=batch)
    return scan_runs([root]).finished


def records(tmp_path: Path, dev: dict = DEV, eval_: dict = EVAL) -> tuple[list[dict], list[dict]]:
    return write_split(tmp_path / "dev", dev, seed=0, batch=64), write_split(tmp_path / "eval", eval_, seed=1, batch=16)


def bn_only(table: dict) -> dict:
    return {k: v for k, v in table.items() if k[0] == "bn"}


def test_hand_computed_regrets_and_the_source_constraint(tmp_path: Path) -> None:
    dev, ev = records(tmp_path, bn_only(DEV), bn_only(EVAL))
    sel = select(dev, ev)
    # best: A norm 20, B lame 30. alpha_bn: regret 2 and 10.4, +0.4 vs source on B (<= 0.5)
    a = sel.dev["alpha_bn"]
    assert [round(r["regret_best"], 6) for r in a.rows] == [2.0, 10.4]
    assert a.max_regret_best == pytest.approx(10.4) and a.mean_regret_best == pytest.approx(6.2)
    assert a.max_regret_source == pytest.approx(0.4) and a.feasible
    assert not sel.dev["norm"].feasible and sel.dev["norm"].max_regret_source == pytest.approx(30.0)
    assert not sel.dev["lame"].feasible and sel.dev["lame"].max_regret_source == pytest.approx(5.0)
    assert sel.dev["source"].max_regret_best == pytest.approx(20.0) and sel.dev["source"].feasible
    assert sel.chosen == Rule("alpha_bn", "alpha_bn")  # a tie with "by norm_kind" goes to the single method
    # eval: D best lame 30; alpha_bn 33 -> regret 3, -9 vs source
    e = sel.eval["alpha_bn"]
    assert e.rows[0]["regret_best"] == pytest.approx(3.0) and e.rows[0]["regret_source"] == pytest.approx(-9.0)


def test_the_constraint_is_hard(tmp_path: Path) -> None:
    dev_table = bn_only(DEV)
    dev_table[("bn", "sorted")] = {**dev_table[("bn", "sorted")], "alpha_bn": 40.6}  # 0.6 points worse than source
    dev, ev = records(tmp_path, dev_table, bn_only(EVAL))
    sel = select(dev, ev)
    assert not sel.dev["alpha_bn"].feasible
    assert sel.chosen.default == "source"
    assert select(dev, ev, max_source_regret=1.0).chosen.default == "alpha_bn"


def test_conditioned_rule_per_norm_kind_matches_brute_force(tmp_path: Path) -> None:
    dev, ev = records(tmp_path)
    sel = select(dev, ev)
    # BN cell: alpha_bn (max 10.4); GN cell: norm (regret 0, -20 vs source)
    assert sel.chosen.name == "by norm_kind"
    assert dict(sel.chosen.choice) == {"batchnorm": "alpha_bn", "group_layer_norm": "norm"}
    assert sel.dev["by norm_kind"].max_regret_best == pytest.approx(10.4)
    assert sel.dev["by norm_kind"].mean_regret_best == pytest.approx((2 + 10.4 + 0) / 3)
    assert sel.dev["alpha_bn"].max_regret_best == pytest.approx(15.0)  # worse alone: 15 on the GN stream
    # eval: D -> alpha_bn 33 (best lame 30), E -> norm 48 (best)
    rows = sel.eval["by norm_kind"].rows
    assert [(r["method"], round(r["regret_best"], 6)) for r in rows] == [("alpha_bn", 3.0), ("norm", 0.0)]

    streams, pool = build_streams(dev, "dev")
    from benchmarks.app.selection import label_streams

    label_streams(streams)
    for limit in (0.0, 0.5, 10.0, 100.0):
        found = score(best_conditioned_rule("norm_kind", streams, pool, limit), streams, limit)
        brute = min((score(Rule("x", FALLBACK, "norm_kind", (("batchnorm", a), ("group_layer_norm", b))), streams, limit)
                     for a, b in itertools.product(pool, repeat=2)), key=selection_key)
        assert (found.feasible, found.max_regret_best, found.mean_regret_best) == pytest.approx(
            (brute.feasible, brute.max_regret_best, brute.mean_regret_best)), limit


def test_conditioned_rule_is_optimal_on_random_tables() -> None:
    """The per-value search equals brute force over every map (3 values x 4 methods), random errors."""
    from benchmarks.app.selection import Stream

    pool = ["a", "b", "c", "source"]
    values = ["v0", "v1", "v2"]
    rng = random.Random(1)
    for trial in range(40):
        streams = [Stream(key=f"{v}-{i}", split="dev", protocol={}, setting={}, seed=i, features={"f": v},
                          errors={m: rng.choice([10.0, 20.0, 30.0]) + rng.random() for m in pool}, label=f"{v}-{i}")
                   for v in values for i in range(2)]
        limit = rng.choice([0.0, 5.0, 100.0])
        found = score(best_conditioned_rule("f", streams, pool, limit), streams, limit)
        brute = min((score(Rule("x", FALLBACK, "f", tuple(zip(values, ms))), streams, limit)
                     for ms in itertools.product(pool, repeat=len(values))), key=selection_key)
        assert (found.feasible, found.max_regret_best, found.mean_regret_best) == pytest.approx(
            (brute.feasible, brute.max_regret_best, brute.mean_regret_best)), trial


def test_feature_values_no_dev_stream_measured_fall_back_to_source(tmp_path: Path) -> None:
    dev, ev = records(tmp_path, bn_only(DEV), bn_only(EVAL))
    sel = select(dev, ev, features=["batch_size"])  # dev streams have batch 64, eval streams 16
    rule = sel.dev["by batch_size"].rule
    assert dict(rule.choice) == {"64": "alpha_bn"}
    assert [r["method"] for r in sel.dev[rule.name].rows] == ["alpha_bn", "alpha_bn"]
    assert [r["method"] for r in sel.eval[rule.name].rows] == [FALLBACK]
    with pytest.raises(SelectError, match="unknown feature"):
        select(dev, ev, features=["colour"])


def test_todays_auto_is_a_scored_candidate_when_its_methods_ran(tmp_path: Path) -> None:
    auto = current_auto_rule()
    picks = dict(auto.choice)
    assert set(picks) == {"batchnorm", "group_layer_norm", "batch_channel_norm", "none"} and picks["none"] == "source"
    dev_table = {k: {**v, picks["batchnorm"]: 39.0, picks["group_layer_norm"]: 31.0} for k, v in DEV.items()}
    eval_table = {k: {**v, picks["batchnorm"]: 39.0, picks["group_layer_norm"]: 31.0} for k, v in EVAL.items()}
    dev, ev = records(tmp_path, dev_table, eval_table)
    sel = select(dev, ev)
    rows = sel.dev[auto.name].rows
    assert {r["stream"]: r["method"] for r in rows} == {  # streams in label order
        "batch_size=64, label_order=iid, model=digits_cnn(bn), seed=0": picks["batchnorm"],
        "batch_size=64, label_order=iid, model=digits_cnn(gn), seed=0": picks["group_layer_norm"],
        "batch_size=64, label_order=sorted, model=digits_cnn(bn), seed=0": picks["batchnorm"],
    }
    # without those methods in the pool, auto is named in a note and not scored
    sel = select(dev, ev, methods=["source", "norm", "lame", "alpha_bn"])
    assert auto.name not in sel.dev and any("auto is not scored" in n for n in sel.notes)


def test_eval_results_never_change_the_choice(tmp_path: Path) -> None:
    dev, _ = records(tmp_path / "base")
    choices, eval_tables = set(), set()
    rng = random.Random(0)
    for trial in range(6):
        permuted = {}
        for stream, errors in EVAL.items():
            values = list(errors.values())
            rng.shuffle(values)
            permuted[stream] = dict(zip(errors, values))
        ev = write_split(tmp_path / f"eval{trial}", permuted, seed=1, batch=16)
        sel = select(dev, ev)
        choices.add(sel.chosen)
        eval_tables.add(tuple((n, round(s.max_regret_best, 6)) for n, s in sorted(sel.eval.items())))
    assert len(choices) == 1
    assert len(eval_tables) > 1  # the permutations did change the eval scores


def test_runs_that_differ_in_more_than_the_method_are_refused(tmp_path: Path) -> None:
    dev_table = bn_only(DEV)
    for (model, order), errors in dev_table.items():
        for method, error in errors.items():
            # the norm run of the iid stream used other weights: not the same stream
            weights = "w-other" if (method, order) == ("norm", "iid") else None
            fake_run(tmp_path / "dev", method, error, order=order, model=model, weights=weights)
    dev = scan_runs([tmp_path / "dev"]).finished
    ev = write_split(tmp_path / "eval", bn_only(EVAL), seed=1, batch=16)
    with pytest.raises(SelectError, match=r"protocol groups.*model\.weights_sha256"):
        select(dev, ev)
    # allowed between streams, the runs of one stream still disagree: that stream lacks norm
    with pytest.raises(SelectError, match=r"has no run of norm; its closest run .* differs in model\.weights_sha256"):
        select(dev, ev, swept=["model.weights_sha256"])


def test_other_refusals(tmp_path: Path) -> None:
    dev, ev = records(tmp_path, bn_only(DEV), bn_only(EVAL))
    same_as_dev = write_split(tmp_path / "copy", {("bn", "iid"): DEV[("bn", "iid")]}, seed=0, batch=64)
    for r in same_as_dev:
        r["run_key"] += "-copy"
    with pytest.raises(SelectError, match="both dev and eval"):
        select(dev, ev + same_as_dev)
    with pytest.raises(SelectError, match="no source run"):
        select(dev, ev, methods=["norm", "lame"])
    with pytest.raises(SelectError, match="has no run of tent"):
        select(dev, ev, methods=["source", "tent"])
    with pytest.raises(SelectError, match="same folder"):
        run_selection(tmp_path / "dev", tmp_path / "dev", tmp_path / "out")


def test_output_files(tmp_path: Path) -> None:
    records(tmp_path)
    sel, files = run_selection(tmp_path / "dev", tmp_path / "eval", tmp_path / "out")
    rule = json.loads(files["rule"].read_text())
    assert rule["rule"] == {"name": "by norm_kind", "feature": "norm_kind",
                            "choice": {"batchnorm": "alpha_bn", "group_layer_norm": "norm"}, "default": "source"}
    assert rule["dev"]["max_regret_best"] == pytest.approx(10.4) and rule["eval"]["max_regret_best"] == pytest.approx(3.0)
    assert rule["eval"]["streams_over_target"] == 1  # 3 points behind lame on the BN eval stream
    text = files["markdown"].read_text()
    assert "**Chosen: by norm_kind** (batchnorm: alpha_bn, group_layer_norm: norm; else source)" in text
    assert "| alpha_bn | alpha_bn: 2.00 / -18.00 | alpha_bn: 15.00 / -5.00 | alpha_bn: 10.40 / +0.40 |" in text
    rows = list(csv.DictReader(io.StringIO(files["streams_csv"].read_text())))
    assert len(rows) == len(sel.dev) * 3 + len(sel.eval) * 2
    summary = list(csv.DictReader(io.StringIO(files["summary_csv"].read_text())))
    chosen = [r for r in summary if r["chosen"] == "True"]
    assert [(r["split"], float(r["max_regret_best"])) for r in chosen] == [("dev", pytest.approx(10.4)), ("eval", pytest.approx(3.0))]


@pytest.mark.slow
def test_two_digits_sweeps_through_the_real_app(tmp_path: Path) -> None:
    from tests.benchmarks.test_app import TINY, bench, make_bench_env

    env = make_bench_env()
    common = [*TINY, "method=source,norm,lame", f"paths.output_root={tmp_path}", "runtime.num_threads=1"]
    for args in (["name=dev", "seed=0", "stream.label_order=iid,sorted"],
                 ["name=eval", "seed=1", "stream.label_order=iid", "stream.batch_size=16"]):
        done = bench(["-m", *common, *args], env, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "sel"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.select", f"dev={tmp_path / 'dev'}", f"eval={tmp_path / 'eval'}", f"out={out}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rule = json.loads((out / "rule.json").read_text())
    assert len(rule["dev_streams"]) == 2 and len(rule["eval_streams"]) == 1
    assert rule["pool"] == ["lame", "norm", "source"] and rule["dev"]["feasible"]
    dev_errors = {s["label"]: s["errors"] for s in rule["dev_streams"]}
    for run in scan_runs([tmp_path / "dev"]).finished:  # the regrets come from the run records
        label = next(k for k in dev_errors if f"label_order={run['setting']['label_order']}" in k)
        assert dev_errors[label][run["method"]["label"]] == pytest.approx(100 * run["summary"]["mean_error"])
    assert "**Chosen:" in (out / "regret.md").read_text()
    # eval runs that include the dev runs are refused with exit status 2
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.select", f"dev={tmp_path / 'dev'}", f"eval={tmp_path}", f"out={out}2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2 and "both dev and eval" in done.stderr
    done = subprocess.run([sys.executable, "-m", "benchmarks.select", f"out={out}3"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "give dev=" in done.stderr
