"""The reality-check protocol of the continual experiments (issue 18): the evaluation phase
runs the values frozen in the tuning phase, the usual protocol's choice comes from the
evaluation data, and the ranks follow the evaluation phase. A scripted runner stands in for
training (the training itself is covered by test_experiments.py)."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from continual.experiments.compare_norms import RunConfig
from continual.experiments.reality_check import ProtocolConfig, RunCache, run_protocol, summarize


def _scripted(config: RunConfig) -> dict:
    # The tuning data (digits) reward a high learning rate and κ, the evaluation data
    # (cifar10) a low one; BCN + WS is better everywhere.
    tuning = config.benchmark == "digits"
    lr = config.lr if tuning else 0.2 - config.lr
    kappa = config.kappa if tuning else 1 - config.kappa
    score = 0.3 + lr + (0.1 * kappa if config.norm == "adab2n" else 0) + (0.2 if config.norm == "bcn_ws" else 0)
    score += 0.001 * config.seed
    metrics = {"A_auc": score, "A_last": score, "A_avg": score, "F_last": 0.0}
    return {"config": asdict(config), "metrics": metrics, "seconds": 0.0}


@pytest.fixture()
def protocol() -> ProtocolConfig:
    return ProtocolConfig(
        methods=(("er", "bn"), ("er", "adab2n"), ("er", "bcn_ws")),
        spaces={"bn": {"lr": "0.03,0.1"}, "adab2n": {"kappa": "0.2,0.8"}, "bcn_ws": {"num_groups": [4, 32]}},
    )


def test_frozen_values_come_from_the_tuning_phase(protocol, tmp_path) -> None:
    calls = []

    def runner(config):
        calls.append(config)
        return _scripted(config)

    rows = {row["norm"]: row for row in run_protocol(protocol, RunCache(tmp_path / "runs.json", runner))}
    assert rows["adab2n"]["tuning"]["best"]["hparams"] == {"lr": 0.1, "kappa": 0.8}
    assert rows["adab2n"]["evaluation"]["hparams"] == {"lr": 0.1, "kappa": 0.8}
    assert rows["adab2n"]["usual"]["hparams"] == {"lr": 0.03, "kappa": 0.2}
    assert rows["bcn_ws"]["evaluation"]["hparams"] == {"lr": 0.1, "num_groups": 4}  # tie: first in grid order
    # The evaluation phase: every seed once, on the evaluation data, with the frozen values.
    frozen = [c for c in calls if c.benchmark == "cifar10" and c.norm == "adab2n" and c.lr == 0.1 and c.kappa == 0.8]
    assert sorted(c.seed for c in frozen) == [0, 1, 2]
    assert all(c.train_per_class == 108 and c.test_per_class == 70 for c in frozen)
    # Tuning ran on the tuning data with the tuning seeds only.
    tuned = [c for c in calls if c.benchmark == "digits"]
    # BN's search fixes the learning rate; the other norms search their own values at it.
    assert len(tuned) == 2 + 2 + 2 and {c.seed for c in tuned} == {0}
    assert {c.lr for c in tuned if c.norm != "bn"} == {0.1}
    assert any(c.norm_options == {"num_groups": 32} for c in tuned if c.norm == "bcn_ws")
    # Every run happens once: a second call reads them all from the cache file.
    again = run_protocol(protocol, RunCache(tmp_path / "runs.json", lambda config: pytest.fail("rerun")))
    assert [r["evaluation"]["mean"] for r in again] == [rows[n]["evaluation"]["mean"] for n in ("bn", "adab2n", "bcn_ws")]


def test_ranks_follow_the_evaluation_phase(protocol, tmp_path) -> None:
    rows = {row["norm"]: row for row in run_protocol(protocol, RunCache(None, _scripted))}
    # Evaluation (lr 0.1 frozen everywhere): BCN + WS, then AdaB²N (κ 0.8 -> +0.02), then BN.
    assert [rows[n]["rank"] for n in ("bcn_ws", "adab2n", "bn")] == [1, 2, 3]
    assert rows["bn"]["evaluation"]["mean"]["A_auc"] == pytest.approx(100 * (0.3 + 0.1 + 0.001))
    assert rows["bn"]["evaluation"]["std"]["A_auc"] == pytest.approx(0.1)
    table = summarize(list(rows.values()), protocol)
    assert table.splitlines()[2].startswith("| ER + BCN + WS | lr 0.1, G 4 | 60.0 | 60.1 ± 0.1 |")
    # Usual protocol (lr 0.03 chosen on the evaluation data): AdaB²N (κ 0.2) 2nd, BN 3rd, as here.
    assert table.splitlines()[3].endswith("| 2 → 2 |") and table.splitlines()[4].endswith("| 3 → 3 |")


def test_phases_must_differ_and_share_the_scenario() -> None:
    with pytest.raises(ValueError, match="different data"):
        ProtocolConfig(evaluation={"benchmark": "digits", "test_per_class": 70})
    with pytest.raises(ValueError, match="shared"):
        ProtocolConfig(tuning={"benchmark": "digits", "eval_period": 100})
