"""The submission process: sets its limits, loads the submission and answers the harness.

Started by :mod:`continual.harness.supervisor` as a fresh interpreter inside the
operating-system sandbox (:mod:`continual.harness.sandbox`; never a fork of the harness,
which holds the test labels). Every harness message is a request answered by one reply
(:mod:`continual.harness.wire`):

1. ``setup`` (budgets, allowed paths, context): import the runtime (torch, Avalanche),
   install the :mod:`~continual.harness.audit` policy (defence in depth), reply ``ready``;
2. ``test_images`` (shuffled, no labels): load the submission, call its factory, reply
   ``loaded``;
3. ``train``: build an Avalanche online experience, call ``strategy.train(experience)``,
   reply ``trained``; ``predict``: reply ``predictions`` with the scores of all test images;
4. ``end``: reply ``done``. A failure replies ``error`` with its kind (``memory``,
   ``invalid_submission``, ``invalid_predictions``, ``crash``) and traceback.

Nothing in this process is trusted by the harness: a submission can rewrite all of it. The
harness checks every reply, and takes the memory verdict from the kernel's accounting first.
"""

from __future__ import annotations

import errno
import importlib.util
import resource
import socket
import sys
import traceback
from types import ModuleType
from typing import Any

import numpy as np

from continual.harness import wire

_FILE_SIZE_LIMIT = 4 * 1024**3


class InvalidSubmission(RuntimeError):
    """The submission file does not follow the contract."""


class InvalidPredictions(RuntimeError):
    """``predict`` returned something that is not a score array."""


def _limit_files() -> None:
    # Memory, tasks and CPU are bounded for the whole tree by the sandbox's control groups.
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


def serve(channel: wire.SubmissionChannel) -> None:
    """Answer the harness's requests until ``end`` (raises on submission errors)."""
    setup, _ = _expect(channel, "setup")
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
    from continual.harness.audit import Policy
    from continual.harness.contract import SubmissionContext

    _limit_files()
    Policy(setup["scratch"], setup["readable"], setup["protected"]).install()
    channel.reply({"type": "ready"})

    _, arrays = _expect(channel, "test_images")
    test_images = torch.from_numpy(arrays["images"].copy()).permute(0, 3, 1, 2).float().div_(255.0)
    submission = _load_submission(setup["submission"])
    context = SubmissionContext(**{**setup["context"], "input_shape": tuple(setup["context"]["input_shape"])})
    torch.manual_seed(context.seed)
    np.random.seed(context.seed)
    strategy = submission.make_strategy(context)
    if not callable(getattr(strategy, "train", None)):
        raise InvalidSubmission("make_strategy must return an Avalanche strategy (with a train method)")
    predict = getattr(submission, "predict", _default_predict)
    channel.reply({"type": "loaded"})

    from avalanche.benchmarks.scenarios.generic_scenario import CLStream

    stream = CLStream(name="train", exps_iter=iter(()), set_stream_info=False)
    segment = 0
    while True:
        header, arrays = channel.receive()
        kind = header["type"]
        if kind == "train":
            strategy.train(_experience(arrays["images"], arrays["labels"], header, segment, stream))
            segment += 1
            channel.reply({"type": "trained"})
        elif kind == "predict":
            scores = _as_scores(predict(strategy, test_images))
            channel.reply({"type": "predictions", "index": header["index"]}, scores=scores)
        elif kind == "end":
            channel.reply({"type": "done"})
            return
        else:
            raise wire.ProtocolError(f"unexpected request {kind!r}")


def _expect(channel: wire.SubmissionChannel, kind: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    header, arrays = channel.receive()
    if header["type"] != kind:
        raise wire.ProtocolError(f"expected {kind}, got {header['type']}")
    return header, arrays


def _out_of_memory(error: BaseException | None) -> bool:
    """Whether a refused allocation caused ``error`` (by exception type, along its chain)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, MemoryError) or (isinstance(error, OSError) and error.errno == errno.ENOMEM):
            return True
        error = error.__cause__ or error.__context__
    return False


def _error_kind(error: BaseException) -> str:
    if _out_of_memory(error):
        return "memory"
    if isinstance(error, InvalidSubmission):
        return "invalid_submission"
    if isinstance(error, InvalidPredictions):
        return "invalid_predictions"
    return "crash"


def main(fd: int) -> None:
    """Entry point of the submission process; ``fd`` is its end of the harness socket."""
    channel = wire.SubmissionChannel(socket.socket(fileno=fd))
    try:
        serve(channel)
    except BaseException as error:  # report everything, including SystemExit from the submission
        detail = "".join(traceback.format_exception(error))[-8000:]
        print(detail, file=sys.stderr, flush=True)
        try:
            channel.reply({"type": "error", "kind": _error_kind(error), "message": f"{type(error).__name__}: {error}"[:2000],
                           "traceback": detail})
        except Exception:  # the harness may be gone, or no request was read; the exit status still tells
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        raise SystemExit(1) from None
    channel.sock.close()
