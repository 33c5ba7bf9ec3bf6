"""Tries to kill the harness: a pidfd signal to its parent (no audit event), SIGKILL to the
parent and to every process it can see in /proc, and ``kill(-1)``. Then it behaves, so that
a surviving harness scores it."""

import json
import os
import signal

import torch

REPORT = {}


def _attempt(name, action):
    try:
        REPORT[name] = f"succeeded: {action()}"
    except BaseException as error:  # noqa: BLE001
        REPORT[name] = f"blocked: {type(error).__name__}"


def _kill_visible():
    killed = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in (os.getpid(),):
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
            except OSError:
                pass
    return killed


class Idle:
    def __init__(self, num_classes):
        self.num_classes = num_classes

    def train(self, experience):
        pass


def make_strategy(context):
    parent = os.getppid()
    REPORT["parent pid"] = parent
    _attempt("pidfd signal to the parent", lambda: signal.pidfd_send_signal(os.pidfd_open(parent), signal.SIGKILL))
    _attempt("SIGKILL the parent", lambda: os.kill(parent, signal.SIGKILL))
    _attempt("SIGKILL every visible process", _kill_visible)
    print("REPORT " + json.dumps(REPORT), flush=True)
    return Idle(context.num_classes)


def predict(strategy, images):
    return torch.zeros(images.shape[0], strategy.num_classes)
