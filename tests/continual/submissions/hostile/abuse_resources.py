"""Abuses every resource the harness hands out, reporting how far it got: floods its output
(``hparams["log_mb"]`` MB), fills its scratch until the file system refuses, runs
``hparams["threads"]`` busy threads for a few seconds (CPU time per wall second) and starts
processes until refused (the low-level fork/exec primitive, no audit event)."""

import json
import os
import sys
import threading
import time

import numpy as np
import torch

REPORT = {}


def _flood(megabytes):
    line = b"x" * 1023 + b"\n"
    block = line * 1024
    for _ in range(int(megabytes)):
        os.write(1, block)
    return megabytes


def _fill(scratch):
    written = 0
    chunk = b"\0" * (1 << 20)
    with open(os.path.join(scratch, "filler.bin"), "wb") as stream:
        try:
            while written < (64 << 30):
                stream.write(chunk)
                stream.flush()
                written += len(chunk)
        except OSError as error:
            return {"bytes": written, "stopped by": type(error).__name__}
    return {"bytes": written, "stopped by": "nothing"}


def _burn(threads, seconds=4.0):
    torch.set_num_threads(1)
    stop = time.monotonic() + seconds
    a = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)

    def spin():
        while time.monotonic() < stop:
            a @ a  # releases the GIL

    workers = [threading.Thread(target=spin) for _ in range(int(threads))]
    cpu, wall = time.process_time(), time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return round((time.process_time() - cpu) / (time.monotonic() - wall), 2)


def _fork_many(limit=2000):
    import _posixsubprocess

    started = 0
    for _ in range(limit):
        read_end, write_end = os.pipe()
        try:
            _posixsubprocess.fork_exec(
                [sys.executable, "-c", "import time; time.sleep(60)"], [os.fsencode(sys.executable)], True, (write_end,),
                None, None, -1, -1, -1, -1, -1, -1, read_end, write_end, True, False, -1, None, None, None, -1, None, False,
            )
            started += 1
        except OSError as error:
            return {"started": started, "stopped by": type(error).__name__}
        finally:
            os.close(read_end)
            os.close(write_end)
    return {"started": started, "stopped by": "nothing"}


class Idle:
    def __init__(self, num_classes):
        self.num_classes = num_classes

    def train(self, experience):
        pass


def make_strategy(context):
    hparams = context.hparams
    for name, action in [
        ("log MB written", lambda: _flood(hparams.get("log_mb", 64))),
        ("scratch", lambda: _fill(context.scratch_dir)),
        ("CPU seconds per wall second", lambda: _burn(hparams.get("threads", 8))),
        ("processes", lambda: _fork_many(hparams.get("fork_limit", 2000))),
    ]:
        try:
            REPORT[name] = action()
        except BaseException as error:  # noqa: BLE001
            REPORT[name] = f"blocked: {type(error).__name__}: {error}"
    print("REPORT " + json.dumps(REPORT), flush=True)
    return Idle(context.num_classes)


def predict(strategy, images):
    return torch.zeros(images.shape[0], strategy.num_classes)
