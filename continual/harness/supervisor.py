"""Run a submission in its sandbox under a wall-time and memory budget.

The harness talks to the submission process over a socket (:mod:`continual.harness.wire`):
every message is a request answered by one checked reply, one training experience at a
time (so the stream cannot be read ahead), then predictions at every evaluation point,
validated as they arrive. A watchdog thread kills the sandbox when the startup timeout or the
time budget runs out, or when the kernel reports that the tree hit its memory limit. The
submission's output is read through a pipe into a bounded tail (:class:`LogTail`), so no
amount of output reaches the harness's memory or disk.

The verdict is taken by cause: ``over_memory_budget`` when the sandbox's control group
counted an out-of-memory kill (or the submission failed on a refused allocation), whatever
error text came with it; ``protocol_error`` for any message the decoder refuses; the
submission's own report otherwise. The function never raises for what a submission does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm import tqdm

from continual.harness import wire
from continual.harness.audit import default_protected_paths, default_readable_paths
from continual.harness.config import HarnessConfig
from continual.harness.sandbox import SCRATCH, Sandbox, SandboxLimits, Unsandboxed, default_layout
from continual.harness.task import CompetitionTask, Segment

PROJECT_ROOT = Path(__file__).resolve().parents[2]
_BOOTSTRAP = (
    "import sys; sys.path.insert(0, {root!r}); "
    "from continual.harness.runner import main; main(int(sys.argv[1]))"
)
#: memory the runtime (Python, torch, Avalanche) may take while it starts, before the budget
#: is set on top of what it then uses
RUNTIME_ALLOWANCE = 3 * 1024**3
#: bytes of the submission's output kept for its log (the rest is counted, not stored)
LOG_TAIL_BYTES = 256 * 1024

#: statuses of a run; only "ok" runs are ranked.
STATUSES = (
    "ok", "timeout", "over_memory_budget", "crashed", "protocol_error", "invalid_submission", "invalid_predictions",
    "startup_failed", "invalid_scenario", "tuning_failed", "harness_error",
)


@dataclass
class Outcome:
    """What happened to one submission run."""

    status: str
    reason: str = ""
    predictions: dict[int, np.ndarray] = field(default_factory=dict)
    startup_s: float = 0.0
    run_s: float = 0.0
    exit_code: int | None = None
    #: the last :data:`LOG_TAIL_BYTES` of the submission's output, and how much it wrote
    log: bytes = b""
    log_bytes: int = 0
    #: the memory limit of the run (runtime footprint + budget), bytes
    memory_limit: int | None = None
    #: how many process or thread creations the task limit refused
    task_limit_hits: int = 0


class _Stop(Exception):
    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class LogTail(threading.Thread):
    """Drains a pipe, keeping only its last ``limit`` bytes (and counting the rest)."""

    def __init__(self, stream: IO[bytes], limit: int = LOG_TAIL_BYTES) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.limit = limit
        self.chunks: deque[bytes] = deque()
        self.kept = 0
        self.total = 0

    def run(self) -> None:
        read = getattr(self.stream, "read1", self.stream.read)
        while True:
            try:
                chunk = read(65536)
            except (OSError, ValueError):
                return
            if not chunk:
                return
            self.total += len(chunk)
            self.chunks.append(chunk)
            self.kept += len(chunk)
            while self.kept - len(self.chunks[0]) >= self.limit:
                self.kept -= len(self.chunks.popleft())

    def text(self) -> bytes:
        return b"".join(self.chunks)[-self.limit :]


class Watchdog(threading.Thread):
    """Kills the sandbox at the deadline or when it went over its memory limit."""

    def __init__(self, kill: Any, isolation: Sandbox | Unsandboxed) -> None:
        super().__init__(daemon=True)
        self._kill = kill
        self.isolation = isolation
        self.deadline = float("inf")
        self.phase = "startup"
        self.verdict: tuple[str, str] | None = None
        self._stopped = threading.Event()

    def arm(self, seconds: float, phase: str) -> None:
        self.deadline = time.monotonic() + seconds
        self.phase = phase

    def kill(self, status: str, reason: str) -> None:
        if self.verdict is None:
            self.verdict = (status, reason)
        self._kill()

    def run(self) -> None:
        while not self._stopped.wait(0.1):
            if time.monotonic() > self.deadline:
                if self.phase == "startup":
                    self.kill("startup_failed", "the runtime did not start within the startup timeout")
                else:
                    self.kill("timeout", "the submission exceeded its time budget")
                return
            try:
                over = self.isolation.memory_verdict()
            except OSError:
                over = ""
            if over:
                self.kill("over_memory_budget", over)
                return

    def stop(self) -> None:
        self._stopped.set()


def _kill_session(process: subprocess.Popen) -> None:
    """SIGKILL the session the harness created for this run (and only it)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _environment(config: HarnessConfig, scratch: str) -> dict[str, str]:
    # A clean environment (the interpreter also runs with -I): nothing of the harness's
    # environment reaches the submission.
    threads = str(config.threads)
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": scratch,
        "TMPDIR": scratch,
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "HF_HUB_OFFLINE": "1",
        "MPLCONFIGDIR": scratch,
    }


def _reported_error(header: dict) -> _Stop:
    status = {
        "memory": "over_memory_budget",
        "invalid_submission": "invalid_submission",
        "invalid_predictions": "invalid_predictions",
    }.get(str(header.get("kind")), "crashed")
    return _Stop(status, str(header.get("message", "the submission failed"))[:2000])


def _ask(channel: wire.HarnessChannel, header: dict, reply: str, **kwargs: Any) -> tuple[dict, dict]:
    received, arrays = channel.request(header, reply, **kwargs)
    if received["type"] == "error":
        raise _reported_error(received)
    return received, arrays


def _scores(arrays: dict[str, np.ndarray]) -> np.ndarray:
    scores = arrays["scores"]
    if not np.isfinite(scores).all():
        raise _Stop("invalid_predictions", "predictions contain NaN or infinite scores")
    return scores.copy()


def run_submission(
    config: HarnessConfig, task: CompetitionTask, workdir: Path, progress: bool = True,
    hparams: dict | None = None, run_id: str = "run",
) -> Outcome:
    """Run ``config.submission`` on ``task`` in its sandbox; never raises for what the
    submission does (it becomes the outcome's status). ``workdir``: a private host folder
    for the submission's copy (and, unsandboxed only, its scratch). ``hparams`` (JSON values)
    reach the submission as ``context.hparams``.

    Raises:
        SandboxUnavailable: the sandbox cannot be built (``unsafe_no_sandbox`` not set).
    """
    segments: list[Segment] = task.segments(config.experience_size, config.eval_period)
    workdir.mkdir(parents=True, exist_ok=True)
    submission_copy = workdir / "submission.py"
    submission_copy.write_bytes(Path(config.submission).read_bytes())
    startup_limit = config.memory_budget_mb * 1024**2 + RUNTIME_ALLOWANCE
    isolation: Sandbox | Unsandboxed
    if config.unsafe_no_sandbox:
        scratch = str(workdir / "scratch")
        Path(scratch).mkdir(exist_ok=True)
        isolation = Unsandboxed(submission_copy, scratch, _environment(config, scratch), startup_limit)
    else:
        scratch = SCRATCH
        limits = SandboxLimits(
            memory_bytes=startup_limit, max_tasks=config.max_tasks, cpus=config.threads,
            scratch_bytes=config.scratch_mb * 1024**2,
        )
        layout = default_layout(PROJECT_ROOT, [config.results_dir, *config.protected_paths])
        isolation = Sandbox(run_id, limits, layout, submission_copy, _environment(config, scratch))
    parent_sock, child_sock = socket.socketpair()
    outcome = Outcome(status="crashed", memory_limit=startup_limit)
    argv = [sys.executable, "-I", "-B", "-c", _BOOTSTRAP.format(root=str(PROJECT_ROOT)), str(child_sock.fileno())]
    try:
        process = subprocess.Popen(
            isolation.command(argv), pass_fds=(child_sock.fileno(),), cwd=scratch if config.unsafe_no_sandbox else "/",
            env=isolation.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except BaseException:
        isolation.close()
        parent_sock.close()
        raise
    finally:
        child_sock.close()
    if isinstance(isolation, Unsandboxed):
        isolation.pid = process.pid
    tail = LogTail(process.stdout)  # type: ignore[arg-type]
    tail.start()

    def kill() -> None:
        _kill_session(process)
        if isinstance(isolation, Sandbox):
            isolation.group.kill_all(timeout=2.0)

    watchdog = Watchdog(kill, isolation)
    watchdog.arm(config.startup_timeout_s, "startup")
    watchdog.start()
    channel = wire.HarnessChannel(parent_sock)
    started = time.monotonic()
    run_started = None
    try:
        num_test = len(task.test_images)
        _ask(channel, {
            "type": "setup",
            "threads": config.threads,
            "memory_budget_mb": config.memory_budget_mb,
            "scratch": scratch,
            "submission": isolation.submission_path,
            "readable": [*default_readable_paths(PROJECT_ROOT), str(Path(isolation.submission_path).parent)],
            "protected": default_protected_paths(Path(config.results_dir).resolve(), config.protected_paths),
            "context": {
                "num_classes": task.num_classes, "num_tasks": task.num_tasks,
                "input_shape": [int(task.train_images.shape[3]), *map(int, task.train_images.shape[1:3])],
                "experience_size": config.experience_size, "seed": config.seed, "device": "cpu",
                "threads": config.threads, "scratch_dir": scratch, "time_budget_s": config.time_budget_s,
                "memory_budget_mb": config.memory_budget_mb, "hparams": dict(hparams or {}),
            },
        }, "ready")
        run_started = time.monotonic()
        outcome.startup_s = run_started - started
        # The budget counts from what the runtime uses now (imports, page cache).
        outcome.memory_limit = isolation.memory_usage() + config.memory_budget_mb * 1024**2
        isolation.set_memory_limit(outcome.memory_limit)
        watchdog.arm(config.time_budget_s, "run")
        _ask(channel, {"type": "test_images"}, "loaded", images=task.test_images)
        evaluation = 0
        # A bar on a terminal; in logs (stderr redirected) one line per evaluation point.
        bar = progress and sys.stderr.isatty()
        num_evaluations = sum(segment.evaluates for segment in segments)
        expected_scores = (wire.ArraySpec("scores", "float32", (num_test, task.num_classes)),)
        for segment in tqdm(segments, desc=f"{config.display_name}", unit="exp", disable=not bar, leave=False):
            _ask(
                channel,
                {"type": "train", "task": segment.task, "first": segment.first_in_task, "last": segment.last_in_task},
                "trained",
                images=task.train_images[segment.start : segment.end],
                labels=task.train_labels[segment.start : segment.end],
            )
            if segment.evaluates:
                try:
                    header, arrays = _ask(channel, {"type": "predict", "index": evaluation}, "predictions", expect=expected_scores)
                except wire.WrongArray as error:
                    raise _Stop("invalid_predictions", str(error)) from error
                if header.get("index") != evaluation:
                    raise _Stop("invalid_predictions", f"predictions for evaluation {header.get('index')}, expected {evaluation}")
                outcome.predictions[evaluation] = _scores(arrays)
                evaluation += 1
                if progress and not bar:
                    print(
                        f"{config.display_name}: evaluation {evaluation}/{num_evaluations} after {segment.end} "
                        f"training samples ({time.monotonic() - run_started:.1f} s)",
                        file=sys.stderr, flush=True,
                    )
        _ask(channel, {"type": "end"}, "done")
        outcome.status, outcome.reason = "ok", ""
    except _Stop as stop:
        outcome.status, outcome.reason = stop.status, stop.reason
    except wire.ProtocolError as error:
        outcome.status, outcome.reason = "protocol_error", str(error)[:2000]
    except (EOFError, OSError) as error:
        outcome.status = "crashed"
        outcome.reason = f"the submission process ended unexpectedly ({type(error).__name__})"
    except Exception as error:  # a harness bug must still leave a record
        outcome.status, outcome.reason = "harness_error", f"{type(error).__name__}: {error}"[:2000]
    finally:
        watchdog.stop()
        if run_started is not None:
            outcome.run_s = time.monotonic() - run_started
        parent_sock.close()  # ends a process that still waits for a request (failed runs)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            kill()
            process.wait()
        try:
            memory = isolation.memory_verdict()
        except OSError:
            memory = ""
        if isinstance(isolation, Sandbox):
            try:
                outcome.task_limit_hits = isolation.group.task_limit_hits()
            except OSError:
                pass
        kill()  # stray members of the session or the sandbox, if any
        isolation.close()
        tail.join(timeout=10)
        outcome.log, outcome.log_bytes = tail.text(), tail.total
    if watchdog.verdict is not None:  # the watchdog's reason beats the broken pipe it caused
        outcome.status, outcome.reason = watchdog.verdict
    elif memory and outcome.status != "ok":  # by cause: the kernel stopped it at the limit
        outcome.status, outcome.reason = "over_memory_budget", memory
    if outcome.status != "ok":
        outcome.predictions = {}
    outcome.exit_code = process.returncode
    if isinstance(isolation, Sandbox) and process.returncode is not None and process.returncode > 128:
        outcome.exit_code = 128 - process.returncode  # bwrap's 128 + N: killed by signal N, as Popen says it
    if outcome.status == "crashed" and outcome.exit_code not in (0, None):
        try:
            outcome.reason += f" (killed by {signal.Signals(-outcome.exit_code).name})"
        except ValueError:
            outcome.reason += f"; exit status {outcome.exit_code}"
    return outcome
