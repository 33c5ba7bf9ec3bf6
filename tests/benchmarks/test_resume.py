"""Mid-stream checkpoints: a crashed or killed run, restarted, ends with the same results.

The in-process tests stop a run right after a checkpoint or in the middle of a batch and
continue it in a fresh model; the subprocess test SIGKILLs ``python -m benchmarks.run`` at
random moments (slow: run it with ``python -m pytest -m slow tests/benchmarks/test_resume.py``,
as ``.ci/run`` does).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.evaluation import CheckpointMismatch, StreamCheckpoint, evaluate, evaluate_multi_stream, write_results
from benchmarks.evaluation.checkpoint import rng_state, set_rng_state
from benchmarks.streams import StreamConfig, build_domain_streams, build_stream

STREAM = StreamConfig(
    dataset="digits", domains=("gaussian_noise", "contrast"), n_examples=40, batch_size=8, schedule="continual"
)


class Noisy(nn.Module):
    """A stateful model that draws from every global RNG at every call: resuming it is exact
    only if the state dict and all generators come back."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 10)
        self.register_buffer("seen", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))
        self.seen += pooled.mean(0) + torch.rand(3) + float(np.random.rand()) + random.random()
        return self.linear(pooled + self.seen) + torch.randn(x.shape[0], 10)


class Crash(Exception):
    pass


class CrashAfter(StreamCheckpoint):
    """Dies right after its ``n``-th write, like a process killed after a checkpoint."""

    def __init__(self, *args, crash_after: int, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.crash_after = crash_after

    def save(self, **kwargs) -> None:  # noqa: ANN003
        super().save(**kwargs)
        if self.saves == self.crash_after:
            raise Crash


def _files(result_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(result_dir.iterdir())}


def _run(model_factory, path: Path, *, every: int = 2, crash_after: int | None = None, multi: bool = False):  # noqa: ANN001, ANN202
    streams = build_domain_streams(STREAM.replace(schedule="reset_each_shift")) if multi else [build_stream(STREAM)]
    streams[0].batch(0)  # first use imports modules that draw from Python's RNG: before seeding
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    model = model_factory()
    kwargs = {"fingerprint": "f" * 64}
    checkpoint = (
        StreamCheckpoint(path, every, **kwargs) if crash_after is None else CrashAfter(path, every, crash_after=crash_after, **kwargs)
    )
    if multi:
        return evaluate_multi_stream(model, streams, progress=False, checkpoint=checkpoint), checkpoint
    return [evaluate(model, streams[0], progress=False, checkpoint=checkpoint)], checkpoint


@pytest.mark.parametrize("crash_after", [1, 3])
def test_resume_after_a_crash_restores_model_rngs_and_records(tmp_path: Path, crash_after: int) -> None:
    reference, _ = _run(Noisy, tmp_path / "ref.pt")
    with pytest.raises(Crash):
        _run(Noisy, tmp_path / "ck.pt", crash_after=crash_after)
    assert (tmp_path / "ck.pt").is_file()
    resumed, checkpoint = _run(Noisy, tmp_path / "ck.pt")  # a fresh model, as after a SIGKILL
    assert checkpoint.resumed_at == 2 * crash_after
    write_results(reference, tmp_path / "a", timing=False)
    write_results(resumed, tmp_path / "b", timing=False)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    np.testing.assert_array_equal(reference[0].records.confidence, resumed[0].records.confidence)


def test_resume_of_an_adapted_model_with_optimizer_state(tmp_path: Path) -> None:
    import tta
    from benchmarks.models.digits import DigitsCNN

    def factory() -> nn.Module:
        return tta.adapt(DigitsCNN(10, 8, "bn"), "tent", lr=1e-2)

    reference, _ = _run(factory, tmp_path / "ref.pt", every=1)
    with pytest.raises(Crash):
        _run(factory, tmp_path / "ck.pt", every=1, crash_after=4)
    resumed, checkpoint = _run(factory, tmp_path / "ck.pt", every=1)
    assert checkpoint.resumed_at == 4
    np.testing.assert_array_equal(reference[0].records.prediction, resumed[0].records.prediction)
    np.testing.assert_array_equal(reference[0].records.confidence, resumed[0].records.confidence)


def test_multi_stream_resume(tmp_path: Path) -> None:
    import tta
    from benchmarks.models.digits import DigitsCNN

    def factory() -> nn.Module:
        return tta.adapt(DigitsCNN(10, 8, "bn"), "norm", num_streams=2)

    reference, _ = _run(factory, tmp_path / "ref.pt", multi=True)
    with pytest.raises(Crash):
        _run(factory, tmp_path / "ck.pt", multi=True, crash_after=2)
    resumed, checkpoint = _run(factory, tmp_path / "ck.pt", multi=True)
    assert checkpoint.resumed_at == 4
    for a, b in zip(reference, resumed):
        np.testing.assert_array_equal(a.records.confidence, b.records.confidence)


def test_checkpoint_of_another_fingerprint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    block = {"schema": "tta-protocol", "model": {"weights_sha256": "aaa"}, "setting": {"batch_size": 8}}
    StreamCheckpoint(path, 1, "a" * 64, protocol=block).save(model=Noisy(), position=3, recorders=[], extra={})
    other = {**block, "model": {"weights_sha256": "bbb"}}
    with pytest.raises(CheckpointMismatch, match=r"refusing to resume(.|\n)*model.weights_sha256: checkpoint=aaa \| this run=bbb"):
        StreamCheckpoint(path, 1, "b" * 64, protocol=other).load()
    assert StreamCheckpoint(path, 1, "b" * 64, resume=False).load() is None  # runtime.resume=false starts over
    assert StreamCheckpoint(path, 1, "a" * 64).load()["position"] == 3


def test_rng_state_round_trip_includes_generator_objects() -> None:
    torch_gen, numpy_gen = torch.Generator().manual_seed(5), np.random.default_rng(5)
    generators = {"t": torch_gen, "n": numpy_gen}
    saved = rng_state(generators)
    first = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=torch_gen).item(), numpy_gen.random())
    set_rng_state(saved, generators)
    again = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=torch_gen).item(), numpy_gen.random())
    assert first == again


def test_checkpoint_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ck.pt"
    checkpoint = StreamCheckpoint(path, 1, "a" * 64)
    checkpoint.save(model=Noisy(), position=1, recorders=[], extra={})
    before = path.read_bytes()

    def dies(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise Crash

    monkeypatch.setattr(os, "replace", dies)
    with pytest.raises(Crash):
        checkpoint.save(model=Noisy(), position=2, recorders=[], extra={})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


# -- the real thing: SIGKILL the app at random moments -------------------------------------------
ROOT = Path(__file__).resolve().parents[2]
ARGS = [
    "experiment=digits_quick",
    "method=tent",
    "stream.domains=[gaussian_noise,contrast]",
    "stream.n_examples=160",
    "stream.batch_size=8",
    "runtime.progress=false",
    "runtime.checkpoint_every=1",
    "runtime.num_threads=1",
    "name=resume",
]


def _start(out: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.run", *ARGS, f"paths.output_root={out}"],
        cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _versions(pattern: Path) -> set[tuple[int, int]]:
    """(inode, change time) of the files matching ``pattern``: a new pair per atomic write
    (inode numbers alone are reused by the file system)."""
    found = set()
    for path in Path(pattern.anchor).glob(str(pattern.relative_to(pattern.anchor))):
        try:
            stat = path.stat()
        except FileNotFoundError:  # replaced between glob and stat
            continue
        found.add((stat.st_ino, stat.st_ctime_ns))
    return found


def _kill_after_writes(
    process: subprocess.Popen, pattern: Path, writes: int, before: set[tuple[int, int]], rng: random.Random
) -> bool:
    """SIGKILL ``process`` a random moment after it wrote ``writes`` new checkpoints; False
    if it finished first."""
    seen: set[tuple[int, int]] = set()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        seen |= _versions(pattern) - before
        if len(seen) >= writes:
            time.sleep(rng.uniform(0.0, 0.03))  # anywhere: mid-batch or mid-write
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.001)
    return False


@pytest.mark.slow
def test_sigkill_at_random_batches_then_restart_gives_identical_result_files(tmp_path: Path) -> None:
    from tests.benchmarks.test_app import make_bench_env

    env = {**make_bench_env(), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    out.mkdir()
    reference = _start(out, env)
    log = reference.communicate(timeout=400)[0]
    assert reference.returncode == 0, log
    (run_dir,) = (out / "resume").iterdir()
    shutil.move(str(run_dir), str(tmp_path / "reference"))

    rng = random.Random(int(os.environ.get("TTA_RESUME_TEST_SEED", time.time_ns() % 2**32)))
    pattern = out / "resume" / "*" / "checkpoint.pt"
    for _ in range(2):  # two kills, each after 1-12 new checkpoints of the 40 batches
        before = _versions(pattern)
        process = _start(out, env)
        if not _kill_after_writes(process, pattern, rng.randint(1, 12), before, rng):
            pytest.fail(f"the run ended (status {process.returncode}) before it was killed:\n{process.communicate()[0]}")
    assert not list((out / "resume").glob("*/run.json"))
    final = _start(out, env)
    log = final.communicate(timeout=400)[0]
    assert final.returncode == 0, log
    (run_dir,) = (out / "resume").iterdir()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["checkpoints"]["resumed_at_batch"] is not None and record["checkpoints"]["resumed_at_batch"] > 0
    assert not (run_dir / "checkpoint.pt").exists()
    for name in ("results.csv", "results.json", "config.json"):
        assert (run_dir / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    assert record["fingerprint"] == json.loads((tmp_path / "reference" / "run.json").read_text())["fingerprint"]


def test_a_checkpoint_holding_a_real_protocol_block_reads_back_with_weights_only(tmp_path: Path) -> None:
    from benchmarks.files import json_ready
    from benchmarks.protocol import software_protocol

    # software.torch is torch's TorchVersion, a str subclass that weights_only refuses
    block = {"software": software_protocol("cpu"), "schema": "tta-protocol"}
    checkpoint = StreamCheckpoint(tmp_path / "ck.pt", 1, "a" * 64, protocol=json_ready(block))
    checkpoint.save(model=Noisy(), position=1, recorders=[], extra={})
    assert StreamCheckpoint(tmp_path / "ck.pt", 1, "a" * 64).load()["position"] == 1
