"""The submission process: sets its limits, loads the submission and answers the harness.

Started by :mod:`continual.harness.supervisor` as a fresh interpreter (never a fork of the
harness, which holds the test labels). Sequence:

1. receive the setup (budgets, allowed paths, context) from the harness;
2. import the runtime (torch, Avalanche), cap the address space at the current size plus the
   memory budget, install the :mod:`~continual.harness.sandbox` policy, report ``ready``;
3. receive the test images (shuffled, no labels), load the submission, call its factory;
4. for every ``train`` message build an Avalanche online experience, call
   ``strategy.train(experience)`` and acknowledge; for every ``predict`` message return the
   scores of all test images;
5. report ``done``, or ``error`` with its kind (``memory``, ``invalid_submission``,
   ``invalid_predictions``, ``crash``) and traceback.
"""

from __future__ import annotations

import importlib.util
import resource
import sys
import traceback
from multiprocessing.connection import Connection
from types import ModuleType
from typing import Any

import numpy as np

from continual.harness import wire

_FILE_SIZE_LIMIT = 4 * 1024**3


class InvalidSubmission(RuntimeError):
    """The submission file does not follow the contract."""


class InvalidPredictions(RuntimeError):
    """``predict`` returned something that is not a score array."""


def _limit_memory(budget_mb: int) -> None:
    import psutil

    baseline = psutil.Process().memory_info().vms
    limit = baseline + budget_mb * 1024**2
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (_FILE_SIZE_LIMIT, _FILE_SIZE_LIMIT))


def _load_submission(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("submission", path)
    if spec is None or spec.loader is None:
        raise InvalidSubmission(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as error:
        raise InvalidSubmission(f"syntax error in the submission: {error}") from error
    if not callable(getattr(module, "make_strategy", None)):
        raise InvalidSubmission("the submission must define make_strategy(context)")
    if hasattr(module, "predict") and not callable(module.predict):
        raise InvalidSubmission("predict must be a function")
    return module


def _default_predict(strategy: Any, images: Any) -> Any:
    import torch

    model = strategy.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([model(chunk.to(strategy.device)).float().cpu() for chunk in images.split(256)])
    finally:
        model.train(was_training)


def _as_scores(raw: Any) -> np.ndarray:
    try:
        if hasattr(raw, "detach"):
            raw = raw.detach().float().cpu().numpy()
        scores = np.asarray(raw, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise InvalidPredictions(f"predict returned {type(raw).__name__}, not an array of scores") from error
    return np.ascontiguousarray(scores)


def _experience(images: np.ndarray, labels: np.ndarray, header: dict[str, Any], index: int, stream: Any) -> Any:
    from avalanche.benchmarks.scenarios.dataset_scenario import DatasetExperience
    from avalanche.benchmarks.scenarios.online import OnlineCLExperience

    from continual.scenarios import as_avalanche_dataset

    dataset = as_avalanche_dataset(images, labels)
    # Only data already streamed is known: the origin experience describes this piece, with
    # the task index as its experience id.
    origin = DatasetExperience(dataset=dataset, current_experience=int(header["task"]))
    experience = OnlineCLExperience(
        dataset=dataset,
        origin_experience=origin,
        is_first_subexp=bool(header["first"]),
        is_last_subexp=bool(header["last"]),
        access_task_boundaries=True,
    )
    experience.current_experience = index
    # Avalanche reads the stream's name for logging; the stream itself is never iterated.
    experience.origin_stream = origin.origin_stream = stream
    return experience


def serve(conn: Connection) -> None:
    """Run the protocol on ``conn`` until ``end`` (raises on submission errors)."""
    setup, _ = wire.receive(conn)
    import torch

    torch.set_num_threads(int(setup["threads"]))
    # Import what submissions use before the policy forbids loading native code.
    import avalanche.training  # noqa: F401
    import avalanche.training.plugins  # noqa: F401
    import avalanche.training.storage_policy  # noqa: F401

    import continual.models  # noqa: F401
    import continual.plugin  # noqa: F401
    import continual.replay  # noqa: F401
    import continual.scenarios  # noqa: F401
    from continual.harness.contract import SubmissionContext
    from continual.harness.sandbox import Policy

    _limit_memory(int(setup["memory_budget_mb"]))
    Policy(setup["scratch"], setup["readable"], setup["protected"]).install()
    wire.send(conn, {"type": "ready"})

    header, arrays = wire.receive(conn)
    if header["type"] != "test_images":
        raise wire.ProtocolError(f"expected test_images, got {header['type']}")
    test_images = torch.from_numpy(arrays["images"].copy()).permute(0, 3, 1, 2).float().div_(255.0)
    submission = _load_submission(setup["submission"])
    context = SubmissionContext(**{**setup["context"], "input_shape": tuple(setup["context"]["input_shape"])})
    torch.manual_seed(context.seed)
    np.random.seed(context.seed)
    strategy = submission.make_strategy(context)
    if not callable(getattr(strategy, "train", None)):
        raise InvalidSubmission("make_strategy must return an Avalanche strategy (with a train method)")
    predict = getattr(submission, "predict", _default_predict)

    from avalanche.benchmarks.scenarios.generic_scenario import CLStream

    stream = CLStream(name="train", exps_iter=iter(()), set_stream_info=False)
    segment = 0
    while True:
        header, arrays = wire.receive(conn)
        kind = header["type"]
        if kind == "train":
            strategy.train(_experience(arrays["images"], arrays["labels"], header, segment, stream))
            segment += 1
            wire.send(conn, {"type": "trained"})
        elif kind == "predict":
            scores = _as_scores(predict(strategy, test_images))
            wire.send(conn, {"type": "predictions", "index": header["index"]}, scores=scores)
        elif kind == "end":
            wire.send(conn, {"type": "done"})
            return
        else:
            raise wire.ProtocolError(f"unexpected message {kind!r}")


def _error_kind(error: BaseException) -> str:
    if isinstance(error, MemoryError) or "can't allocate memory" in str(error) or "DefaultCPUAllocator" in str(error):
        return "memory"
    if isinstance(error, InvalidSubmission):
        return "invalid_submission"
    if isinstance(error, InvalidPredictions):
        return "invalid_predictions"
    return "crash"


def main(fd: int) -> None:
    """Entry point of the submission process; ``fd`` is its end of the harness socket."""
    conn = Connection(fd)
    try:
        serve(conn)
    except BaseException as error:  # report everything, including SystemExit from the submission
        detail = "".join(traceback.format_exception(error))[-8000:]
        print(detail, file=sys.stderr, flush=True)
        try:
            wire.send(conn, {"type": "error", "kind": _error_kind(error), "message": f"{type(error).__name__}: {error}"[:2000],
                             "traceback": detail})
        except Exception:  # the harness may be gone; the exit status still tells
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        raise SystemExit(1) from None
    conn.close()
