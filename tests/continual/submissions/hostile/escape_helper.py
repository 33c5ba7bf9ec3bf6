"""Starts a helper process the way the audit policy never saw (the low-level fork/exec
primitive), in a new session (out of the harness's process group), that outlives the run
and, if asked, holds memory beyond the budget. ``context.hparams``: ``token`` (a string put
on the helper's command line, so the test can look for it among the machine's processes),
``megabytes`` (what the helper allocates and touches), ``seconds`` (how long it lives)."""

import json
import os
import sys

import torch

REPORT = {}


def _spawn(token, megabytes, seconds):
    import _posixsubprocess

    code = (
        "import os, time, sys; os.setsid(); "
        f"data = bytearray({int(megabytes)} * 1024 * 1024); "
        "data[::4096] = b'x' * len(data[::4096]); "
        f"time.sleep({float(seconds)})"
    )
    args = [sys.executable, "-c", code, token]
    read_end, write_end = os.pipe()
    try:
        pid = _posixsubprocess.fork_exec(
            args, [os.fsencode(sys.executable)], True, (write_end,), None, None,
            -1, -1, -1, -1, -1, -1, read_end, write_end, True, False,
            -1, None, None, None, -1, None, False,
        )
    finally:
        os.close(read_end)
        os.close(write_end)
    return pid


class Idle:
    def __init__(self, num_classes):
        self.num_classes = num_classes

    def train(self, experience):
        pass


def make_strategy(context):
    hparams = context.hparams
    try:
        REPORT["helper"] = _spawn(hparams["token"], hparams.get("megabytes", 0), hparams.get("seconds", 120))
    except BaseException as error:  # noqa: BLE001
        REPORT["helper"] = f"blocked: {type(error).__name__}: {error}"
    print("REPORT " + json.dumps(REPORT), flush=True)
    if hparams.get("megabytes"):
        import time

        time.sleep(20)  # let the helper fill its memory while this run is still going
    return Idle(context.num_classes)


def predict(strategy, images):
    return torch.zeros(images.shape[0], strategy.num_classes)
