"""compare_norms runs continue from a mid-stream checkpoint with the same result."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.evaluation import CheckpointMismatch, StreamCheckpoint
from continual.experiments.compare_norms import RunConfig, run
from tests.benchmarks.test_resume import Crash, CrashAfter  # the same "killed after the n-th write" checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TINY = dict(benchmark="digits", seed=0, model="cnn", nf=4, train_per_class=20, test_per_class=10,
            eval_period=50, mem_size=30)



def _result(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("seconds", "resumed_at_batch")}


def test_resumed_run_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    # AdaB2N with ER: model, replay buffer, task counter and metric state must all come back
    config = RunConfig(**TINY, norm="adab2n")
    reference = run(config, progress=False)
    path = tmp_path / "ck.pt"
    with pytest.raises(Crash):  # dies after 7 x 2 online batches, in the second task
        run(config, progress=False, checkpoint=CrashAfter(path, 7, "", crash_after=2))
    resumed = run(config, progress=False, checkpoint=StreamCheckpoint(path, 7, ""))
    assert resumed["resumed_at_batch"] == 14 and not path.exists()
    assert _result(resumed) == _result(reference)


def test_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    with pytest.raises(Crash):
        run(RunConfig(**TINY, norm="bn"), progress=False, checkpoint=CrashAfter(path, 5, "", crash_after=1))
    with pytest.raises(CheckpointMismatch, match="method.name: checkpoint=er\\+bn \\| this run=er\\+adab2n"):
        run(RunConfig(**TINY, norm="adab2n"), progress=False, checkpoint=StreamCheckpoint(path, 5, ""))


def test_cli_skips_finished_runs_and_checkpoints_beside_out(tmp_path: Path) -> None:
    import json

    from continual.experiments.compare_norms import _parse, main

    out = tmp_path / "runs.json"
    args = ["--benchmark", "digits", "--model", "cnn", "--nf", "4", "--train-per-class", "20", "--test-per-class", "10",
            "--eval-period", "50", "--mem-size", "30", "--seeds", "0", "--norms", "bn", "adab2n",
            "--checkpoint-every", "5", "--out", str(out)]
    main(args)
    runs = json.loads(out.read_text())
    assert [r["config"]["norm"] for r in runs] == ["bn", "adab2n"]
    assert list((tmp_path / "runs.json.checkpoints").iterdir()) == []  # removed once finished
    runs[0]["metrics"]["A_last"] = -1.0  # marks the record: a restart must keep it, not rerun it
    out.write_text(json.dumps(runs))
    main(args)
    assert json.loads(out.read_text())[0]["metrics"]["A_last"] == -1.0
    with pytest.raises(SystemExit):
        _parse(["--checkpoint-every", "5"])
