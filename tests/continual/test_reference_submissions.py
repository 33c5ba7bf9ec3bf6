"""The two reference submissions follow the contract (in-process) and score through the harness."""

from __future__ import annotations

import importlib
from dataclasses import replace

import pytest
import torch

from continual.harness.config import HarnessConfig
from continual.harness.contract import SubmissionContext
from continual.layers import AdaB2N

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _context(tmp_path) -> SubmissionContext:
    return SubmissionContext(
        num_classes=10, num_tasks=5, input_shape=(3, 32, 32), experience_size=10, seed=0, device="cpu",
        threads=1, scratch_dir=str(tmp_path), time_budget_s=60.0, memory_budget_mb=1024,
    )


@pytest.mark.parametrize(("module", "norm_type"), [("naive_bn", torch.nn.BatchNorm2d), ("er_adab2n", AdaB2N)])
def test_reference_submission_trains_one_experience(tmp_path, module: str, norm_type: type) -> None:
    from continual.scenarios import online_stream, split_digits

    submission = importlib.import_module(f"continual.submissions.{module}")
    strategy = submission.make_strategy(_context(tmp_path))
    experience = next(iter(online_stream(split_digits().train_stream, 10, seed=0)))
    strategy.train(experience)
    assert any(type(m) is norm_type for m in strategy.model.modules())
    assert strategy.model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["naive_bn", "er_adab2n"])
def test_reference_submission_through_the_harness(tmp_path, module: str) -> None:
    from continual.harness.app import run_competition

    config = HarnessConfig(
        submission=f"continual/submissions/{module}.py", train_per_class=30, test_per_class=20,
        eval_period=100, results_dir=str(tmp_path),
    )
    record = run_competition(replace(config), progress=False)
    assert record["status"] == "ok", record["reason"]
    assert record["metrics"]["A_last"] > 0.1


def test_reference_submissions_share_one_set_up(tmp_path, monkeypatch) -> None:
    """Both build their strategy through continual.submissions.common; they differ only in
    their plugins (and ER+AdaB²N takes its κ, λ and learning rate from context.hparams)."""
    from continual.replay import ReservoirReplayPlugin

    calls = {}
    for module in ("naive_bn", "er_adab2n"):
        submission = importlib.import_module(f"continual.submissions.{module}")
        monkeypatch.setattr(submission, "online_strategy", lambda context, plugins, lr=0.03, m=module: calls.setdefault(m, (plugins, lr)))
    importlib.import_module("continual.submissions.naive_bn").make_strategy(_context(tmp_path))
    tuned = replace(_context(tmp_path), hparams={"kappa": 0.8, "lambd": 0.3, "lr": 0.1})
    importlib.import_module("continual.submissions.er_adab2n").make_strategy(tuned)
    (naive_plugins, naive_lr), (er_plugins, er_lr) = calls["naive_bn"], calls["er_adab2n"]
    assert [p.norm for p in naive_plugins] == ["bn"] and naive_lr == 0.03
    assert er_plugins[0].norm == "adab2n" and isinstance(er_plugins[1], ReservoirReplayPlugin) and er_lr == 0.1
    assert (er_plugins[0].kappa, er_plugins[0].lambd) == (0.8, 0.3)
