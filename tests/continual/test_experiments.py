"""The BN vs AdaB²N comparison script runs end to end (tiny model) and tabulates."""

from __future__ import annotations

import pytest

from continual.experiments.compare_norms import RunConfig, run, summarize

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_compare_runs_and_summarizes() -> None:
    runs = []
    for norm in ("bn", "adab2n"):
        config = RunConfig(benchmark="digits", norm=norm, seed=0, model="cnn", nf=4, eval_period=400, mem_size=50)
        runs.append(run(config, progress=False))
    for result in runs:
        assert set(result["metrics"]) == {"A_auc", "A_last", "A_avg", "F_last"}
        assert len(result["task_accuracies"]) == 5
        assert [seen for seen, _ in result["curve"]] == [405, 807]
    # The same seed gives both normalizations the same stream and initial weights; the
    # normalization (and nothing else) makes the runs differ.
    assert runs[0]["task_accuracies"] != runs[1]["task_accuracies"]
    table = summarize(runs + [{**runs[0], "metrics": {k: 0.0 for k in runs[0]["metrics"]}}])
    assert "| bn | 2 |" in table and "| adab2n | 1 |" in table and "±" in table
