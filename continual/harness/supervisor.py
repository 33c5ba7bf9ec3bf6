"""Run a submission in its own process under a wall-time and memory budget.

The harness talks to the submission process over a socket (:mod:`continual.harness.wire`):
it sends one training experience at a time and waits for the acknowledgement before the
next one (so the stream cannot be read ahead), asks for predictions at every evaluation
point and validates them as they arrive. A watchdog thread kills the submission's process
group when the startup timeout or the time budget runs out, or when its resident memory
grows past the budget (the submission also runs under an address-space ``setrlimit``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
from tqdm import tqdm

from continual.harness import wire
from continual.harness.config import HarnessConfig
from continual.harness.sandbox import default_protected_paths, default_readable_paths
from continual.harness.task import CompetitionTask, Segment

PROJECT_ROOT = Path(__file__).resolve().parents[2]
_BOOTSTRAP = (
    "import sys; sys.path.insert(0, {root!r}); "
    "from continual.harness.runner import main; main(int(sys.argv[1]))"
)

#: statuses of a run; only "ok" runs are ranked.
STATUSES = (
    "ok", "timeout", "over_memory_budget", "crashed", "invalid_submission", "invalid_predictions", "startup_failed",
    "invalid_scenario", "tuning_failed",
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


class _Stop(Exception):
    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class Watchdog(threading.Thread):
    """Kills the submission's process group at the deadline or past the memory limit."""

    def __init__(self, process: subprocess.Popen, memory_budget_mb: int) -> None:
        super().__init__(daemon=True)
        self.process = process
        self.memory_budget = memory_budget_mb * 1024**2
        self.deadline = float("inf")
        self.phase = "startup"
        self.baseline_rss: int | None = None
        self.verdict: tuple[str, str] | None = None
        self._stopped = threading.Event()

    def arm(self, seconds: float, phase: str) -> None:
        self.deadline = time.monotonic() + seconds
        self.phase = phase

    def start_memory_accounting(self) -> None:
        self.baseline_rss = self._rss()

    def _rss(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.process.pid)
            return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except psutil.Error:
            return 0

    def kill(self, status: str, reason: str) -> None:
        if self.verdict is None:
            self.verdict = (status, reason)
        kill_process_group(self.process)

    def run(self) -> None:
        while not self._stopped.wait(0.1):
            if self.process.poll() is not None:
                return
            if time.monotonic() > self.deadline:
                if self.phase == "startup":
                    self.kill("startup_failed", "the runtime did not start within the startup timeout")
                else:
                    self.kill("timeout", "the submission exceeded its time budget")
                return
            if self.baseline_rss is not None:
                grown = self._rss() - self.baseline_rss
                if grown > self.memory_budget:
                    self.kill(
                        "over_memory_budget",
                        f"resident memory grew by {grown / 1024**2:.0f} MB, budget {self.memory_budget / 1024**2:.0f} MB",
                    )
                    return

    def stop(self) -> None:
        self._stopped.set()


def kill_process_group(process: subprocess.Popen) -> None:
    """SIGKILL the process group the harness created for this submission (and only it)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _environment(config: HarnessConfig, scratch: Path) -> dict[str, str]:
    # A clean environment (the interpreter runs with -I, which also ignores PYTHON* variables):
    # nothing of the harness's environment leaks into the submission.
    threads = str(config.threads)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(scratch),
        "TMPDIR": str(scratch),
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "HF_HUB_OFFLINE": "1",
    }


def _reported_error(header: dict) -> _Stop:
    status = {
        "memory": "over_memory_budget",
        "invalid_submission": "invalid_submission",
        "invalid_predictions": "invalid_predictions",
    }.get(str(header.get("kind")), "crashed")
    return _Stop(status, str(header.get("message", "the submission failed"))[:2000])


def _last_report(conn: Connection) -> _Stop | None:
    """The error the submission reported just before it ended, if it is still unread.

    The submission process sends its ``error`` message and exits at once. If the harness is
    still sending when that happens (e.g. the next training experience), the send fails on
    the closed socket (EPIPE) although the report already sits in our receive buffer; whether
    the send comes before or after the exit depends only on scheduling. Reading the buffer
    here makes the verdict the submission's report either way.
    """
    try:
        while conn.poll(0):
            header, _ = wire.receive(conn)
            if header.get("type") == "error":
                return _reported_error(header)
    except (EOFError, OSError, wire.ProtocolError):
        pass
    return None


def _expect(conn: Connection, kind: str, max_bytes: int = wire.MAX_HEADER_BYTES):
    header, arrays = wire.receive(conn, max_bytes)
    if header["type"] == "error":
        raise _reported_error(header)
    if header["type"] != kind:
        raise _Stop("crashed", f"protocol violation: expected {kind!r}, got {header['type']!r}")
    return header, arrays


def validate_scores(header: dict, arrays: dict[str, np.ndarray], index: int, shape: tuple[int, int]) -> np.ndarray:
    """The score array of a ``predictions`` message, or :class:`_Stop` ("invalid_predictions")."""
    if header.get("index") != index:
        raise _Stop("invalid_predictions", f"predictions for evaluation {header.get('index')}, expected {index}")
    scores = arrays.get("scores")
    if scores is None or scores.dtype != np.float32:
        raise _Stop("invalid_predictions", "predictions must be a float32 score array")
    if scores.shape != shape:
        raise _Stop("invalid_predictions", f"predictions have shape {scores.shape}, expected {shape}")
    if not np.isfinite(scores).all():
        raise _Stop("invalid_predictions", "predictions contain NaN or infinite scores")
    return scores


def run_submission(
    config: HarnessConfig, task: CompetitionTask, scratch: Path, log_path: Path, progress: bool = True,
    hparams: dict | None = None,
) -> Outcome:
    """Run ``config.submission`` on ``task`` in a sandboxed process; never raises for
    submission failures (they become the outcome's status). ``hparams`` (JSON values) reach
    the submission as ``context.hparams``."""
    segments: list[Segment] = task.segments(config.experience_size, config.eval_period)
    scratch.mkdir(parents=True, exist_ok=True)
    submission_copy = scratch / "submission.py"
    submission_copy.write_bytes(Path(config.submission).read_bytes())
    parent_sock, child_sock = socket.socketpair()
    outcome = Outcome(status="crashed")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", _BOOTSTRAP.format(root=str(PROJECT_ROOT)), str(child_sock.fileno())],
            pass_fds=(child_sock.fileno(),), cwd=scratch, env=_environment(config, scratch),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    child_sock.close()
    conn = Connection(parent_sock.detach())
    watchdog = Watchdog(process, config.memory_budget_mb)
    watchdog.arm(config.startup_timeout_s, "startup")
    watchdog.start()
    started = time.monotonic()
    run_started = None
    try:
        num_test = len(task.test_images)
        score_bytes = num_test * task.num_classes * 4
        wire.send(conn, {
            "type": "setup",
            "threads": config.threads,
            "memory_budget_mb": config.memory_budget_mb,
            "scratch": str(scratch),
            "submission": str(submission_copy),
            "readable": default_readable_paths(PROJECT_ROOT),
            "protected": default_protected_paths(Path(config.results_dir).resolve(), config.protected_paths),
            "context": {
                "num_classes": task.num_classes, "num_tasks": task.num_tasks,
                "input_shape": [int(task.train_images.shape[3]), *map(int, task.train_images.shape[1:3])],
                "experience_size": config.experience_size, "seed": config.seed, "device": "cpu",
                "threads": config.threads, "scratch_dir": str(scratch), "time_budget_s": config.time_budget_s,
                "memory_budget_mb": config.memory_budget_mb, "hparams": dict(hparams or {}),
            },
        })
        _expect(conn, "ready")
        run_started = time.monotonic()
        outcome.startup_s = run_started - started
        watchdog.arm(config.time_budget_s, "run")
        watchdog.start_memory_accounting()
        wire.send(conn, {"type": "test_images"}, images=task.test_images)
        evaluation = 0
        # A bar on a terminal; in logs (stderr redirected) one line per evaluation point.
        bar = progress and sys.stderr.isatty()
        num_evaluations = sum(segment.evaluates for segment in segments)
        for segment in tqdm(segments, desc=f"{config.display_name}", unit="exp", disable=not bar, leave=False):
            wire.send(
                conn,
                {"type": "train", "task": segment.task, "first": segment.first_in_task, "last": segment.last_in_task},
                images=task.train_images[segment.start : segment.end],
                labels=task.train_labels[segment.start : segment.end],
            )
            _expect(conn, "trained")
            if segment.evaluates:
                wire.send(conn, {"type": "predict", "index": evaluation})
                try:
                    header, arrays = _expect(conn, "predictions", max_bytes=score_bytes)
                except wire.ProtocolError as error:  # e.g. more scores than the test set has
                    raise _Stop("invalid_predictions", str(error)) from error
                outcome.predictions[evaluation] = validate_scores(
                    header, arrays, evaluation, (num_test, task.num_classes)
                ).copy()
                evaluation += 1
                if progress and not bar:
                    print(
                        f"{config.display_name}: evaluation {evaluation}/{num_evaluations} after {segment.end} "
                        f"training samples ({time.monotonic() - run_started:.1f} s)",
                        file=sys.stderr, flush=True,
                    )
        wire.send(conn, {"type": "end"})
        _expect(conn, "done")
        outcome.status, outcome.reason = "ok", ""
    except _Stop as stop:
        outcome.status, outcome.reason = stop.status, stop.reason
    except wire.ProtocolError as error:
        outcome.status, outcome.reason = "crashed", f"protocol violation: {error}"
    except (EOFError, OSError) as error:
        report = _last_report(conn)
        if report is not None:
            outcome.status, outcome.reason = report.status, report.reason
        else:
            outcome.status = "crashed"
            outcome.reason = f"the submission process ended unexpectedly ({type(error).__name__})"
    finally:
        watchdog.stop()
        if run_started is not None:
            outcome.run_s = time.monotonic() - run_started
        # Closing our end first ends a process that still waits for messages (failed runs).
        conn.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            kill_process_group(process)
            process.wait()
        kill_process_group(process)  # stray members of its group, if any
    if watchdog.verdict is not None:  # the watchdog's reason beats the broken pipe it caused
        outcome.status, outcome.reason = watchdog.verdict
        outcome.predictions = {}
    elif outcome.status == "crashed" and process.returncode not in (0, None) and not outcome.reason.startswith("protocol"):
        outcome.reason = (outcome.reason or "crashed") + f"; exit status {process.returncode}"
    if outcome.status != "ok":
        outcome.predictions = {}
    outcome.exit_code = process.returncode
    return outcome
