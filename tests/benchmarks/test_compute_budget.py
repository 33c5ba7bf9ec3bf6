"""Compute-aware evaluation (Alfarra et al., ICML 2024): which batches a method adapts on,
what the others are predicted with, and the app's option."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tta
from benchmarks.evaluation import ComputeBudget, StreamCheckpoint, evaluate
from benchmarks.models.digits import DigitsCNN
from benchmarks.streams import build_stream
from tests.benchmarks.test_resume import STREAM, Crash, CrashAfter


class Counting(nn.Module):
    """Stands in for ``tta.Adapted``: counts adapting calls and no-adapt calls."""

    def __init__(self, step_sleep: float = 0.0) -> None:
        super().__init__()
        self.step_sleep = step_sleep
        self.adapting = True
        self.calls: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapting and self.step_sleep:
            time.sleep(self.step_sleep)
        self.calls.append("step" if self.adapting else "predict")
        return torch.zeros(x.shape[0], 3)

    def no_adapt(self):  # noqa: ANN201
        model = self

        class _Context:
            def __enter__(self) -> None:
                model.adapting = False

            def __exit__(self, *args: object) -> None:
                model.adapting = True

        return _Context()


def _pattern(budget: ComputeBudget, batches: int, model: Counting | None = None) -> list[str]:
    model = model or Counting()
    for _ in range(batches):
        budget(model, torch.zeros(2, 1))
    return model.calls


@pytest.mark.parametrize(
    ("eta", "cost", "expected"),
    [
        (1.0, 2.5, ["step", "predict", "predict"] * 3),  # ceil(2.5) - 1 = 2 batches missed
        (0.5, 2.5, ["step", "predict"] * 4 + ["step"]),  # ceil(1.25) - 1 = 1
        (1.0, 1.0, ["step"] * 9),  # as fast as plain inference: never behind
        (0.3, 3.0, ["step"] * 9),  # ceil(0.9) - 1 = 0: a slow enough stream waits for anyone
        (1.0, 1.01, ["step", "predict"] * 4 + ["step"]),  # the official rule rounds up
    ],
)
def test_a_declared_cost_gives_the_official_skip_pattern(eta: float, cost: float, expected: list[str]) -> None:
    budget = ComputeBudget(eta, cost=cost)
    assert _pattern(budget, len(expected)) == expected
    assert budget.adapted_batches == expected.count("step") and budget.skipped_batches == expected.count("predict")
    assert budget.summary()["adapted_fraction"] == pytest.approx(expected.count("step") / len(expected))


def test_a_measured_cost_times_the_step_against_the_plain_model() -> None:
    fast_plain = ComputeBudget(1.0, plain_model=lambda x: torch.zeros(x.shape[0], 3))
    calls = _pattern(fast_plain, 4, Counting(step_sleep=0.05))
    assert calls[0] == "step" and calls[1:] == ["predict"] * 3  # a step 50 ms against ~0 ms: far behind
    assert fast_plain.ratios[0] > 10

    def slow_plain(x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)
        return torch.zeros(x.shape[0], 3)

    slow = ComputeBudget(1.0, plain_model=slow_plain)
    assert _pattern(slow, 4) == ["step"] * 4 and max(slow.ratios) < 1


@pytest.mark.parametrize(
    "kwargs",
    [{"eta": 0.0, "cost": 1.0}, {"eta": 1.5, "cost": 1.0}, {"eta": 1.0, "cost": -1.0},
     {"eta": 1.0, "cost": float("nan")}, {"eta": 1.0}],
)
def test_bad_budgets_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ComputeBudget(**kwargs)


def test_a_model_that_cannot_skip_adaptation_is_refused() -> None:
    with pytest.raises(TypeError, match="without adapting"):
        ComputeBudget(1.0, cost=2.0)(lambda x: x, torch.zeros(2, 3))


def test_missed_batches_are_predicted_by_the_latest_model_without_adapting() -> None:
    torch.manual_seed(0)
    adapted = tta.adapt(DigitsCNN(10, 8, "bn"), "tent", lr=1e-2)
    budget = ComputeBudget(1.0, cost=2.0)
    x0, x1, x2 = (torch.randn(8, 3, 8, 8) for _ in range(3))
    budget(adapted, x0)  # adapts: the parameters move
    after_step = {k: v.clone() for k, v in adapted.state_dict().items() if torch.is_tensor(v)}
    with adapted.no_adapt():
        expected = adapted(x1)
    out = budget(adapted, x1)  # missed: the latest model's prediction, no state change
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for key, value in adapted.state_dict().items():
        if torch.is_tensor(value):
            assert torch.equal(value, after_step[key]), key
    budget(adapted, x2)  # caught up: adapts again
    assert any(not torch.equal(v, after_step[k]) for k, v in adapted.state_dict().items() if k in after_step)


def test_a_resumed_compute_aware_run_continues_the_skip_pattern(tmp_path: Path) -> None:
    def run(path: Path, crash_after: int | None = None):  # noqa: ANN202
        stream = build_stream(STREAM)
        torch.manual_seed(3)
        model = tta.adapt(DigitsCNN(10, 8, "bn"), "tent", lr=1e-2)
        budget = ComputeBudget(1.0, cost=3.0)
        kwargs = {"fingerprint": "f" * 64}
        checkpoint = StreamCheckpoint(path, 1, **kwargs) if crash_after is None else CrashAfter(path, 1, crash_after=crash_after, **kwargs)
        return evaluate(model, stream, progress=False, checkpoint=checkpoint, budget=budget), budget

    reference, ref_budget = run(tmp_path / "ref.pt")
    with pytest.raises(Crash):
        run(tmp_path / "ck.pt", crash_after=4)  # stops in the middle of a missed stretch
    resumed, budget = run(tmp_path / "ck.pt")
    assert budget.state_dict() == ref_budget.state_dict()
    np.testing.assert_array_equal(reference.records.prediction, resumed.records.prediction)
    np.testing.assert_array_equal(reference.records.confidence, resumed.records.confidence)


def test_the_app_option_records_the_budget_and_names_its_metric(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_module

    import benchmarks.app  # noqa: F401
    import benchmarks.app.runner as runner
    from benchmarks.app.errors import BenchConfigError
    from benchmarks.app.identity import run_id
    from benchmarks.app.records import RECORD_NAME, read_record
    from benchmarks.models.digits import digits_source_model

    digits_source_model()

    def make(*overrides: str):  # noqa: ANN202
        with initialize_config_module(config_module="conf", version_base="1.3"):
            return compose(config_name="config", overrides=[
                "experiment=digits_quick", "stream.domains=[gaussian_noise,contrast]", "stream.n_examples=48",
                "stream.batch_size=12", "runtime.progress=false", f"paths.output_root={tmp_path}", *overrides,
            ])

    cfg = make("method=tent", "eval.online_eta=1.0", "eval.step_cost=2.0")
    runner.run(cfg)
    record = read_record(tmp_path / "digits_quick" / run_id(cfg) / RECORD_NAME)
    assert record["compute"]["adapted_batches"] == 4 and record["compute"]["skipped_batches"] == 4
    assert record["setting"]["online_eta"] == 1.0 and record["setting"]["step_cost"] == 2.0
    assert record["protocol"]["metric"]["name"] == "compute_aware_online_error"
    plain = make("method=tent")
    runner.run(plain)
    plain_record = read_record(tmp_path / "digits_quick" / run_id(plain) / RECORD_NAME)
    assert "compute" not in plain_record and "online_eta" not in plain_record["setting"]
    assert plain_record["protocol"]["metric"]["name"] == "online_error"
    for bad in (["eval.online_eta=1.5"], ["eval.step_cost=2.0"]):
        with pytest.raises(BenchConfigError, match="eval"):
            runner.run(make("method=tent", *bad))
