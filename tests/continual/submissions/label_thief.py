"""Tries every way it can think of to get the test labels, reports what happened on stdout
(one ``THIEF <json>`` line), then predicts the stolen labels if it found any."""

import gc
import glob
import json
import os
import subprocess
import warnings

import numpy as np
import torch
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin

from continual.models import small_cnn

REPORT = {}
STOLEN = {}


def _attempt(name, action):
    try:
        result = action()
        REPORT[name] = f"succeeded: {str(result)[:80]}"
        return result
    except BaseException as error:  # noqa: BLE001 - the point is to survive every refusal
        REPORT[name] = f"blocked: {type(error).__name__}"
        return None


def _steal():
    import sklearn.datasets

    data_dir = os.path.join(os.path.dirname(sklearn.datasets.__file__), "data")
    _attempt("read sklearn digits file", lambda: open(os.path.join(data_dir, "digits.csv.gz"), "rb").read(10))
    _attempt("sklearn load_digits", lambda: sklearn.datasets.load_digits().target[:5])

    def project_loader():
        from benchmarks.data import load_digits

        return load_digits("test").labels[:5]

    _attempt("project load_digits", project_loader)
    parent = os.getppid()
    _attempt("parent memory", lambda: open(f"/proc/{parent}/mem", "rb").read(1))
    _attempt("parent environ", lambda: open(f"/proc/{parent}/environ", "rb").read(10))
    _attempt("parent cmdline", lambda: open(f"/proc/{parent}/cmdline", "rb").read(10))
    _attempt("shell", lambda: subprocess.run(["cat", "/etc/hostname"], capture_output=True).stdout)
    _attempt("os.system", lambda: os.system("true"))
    _attempt("fork", lambda: os.fork())
    _attempt("ctypes", lambda: __import__("ctypes").CDLL(None).getpid())
    _attempt("raise memory limit", lambda: __import__("resource").setrlimit(
        __import__("resource").RLIMIT_AS, (-1, -1)))
    _attempt("kill parent", lambda: os.kill(parent, 0))
    _attempt("write outside scratch", lambda: open("/tmp/thief-was-here", "w").write("x"))
    def decoy():
        # The test leaves a labels file in the harness's results folder; listing folders is
        # allowed, so the thief can find it, but not open it.
        paths = glob.glob("/tmp/pytest-of-*/**/decoy_labels.npy", recursive=True)
        if not paths:
            raise LookupError("decoy not found")
        return np.load(paths[0])[:5]

    _attempt("read labels left in the results folder", decoy)
    _attempt("files in working folder", lambda: sorted(os.listdir(".")))
    # Label-like arrays anywhere in this process's memory (the harness sent none).
    def scan():
        found = [o for o in gc.get_objects() if isinstance(o, (np.ndarray, torch.Tensor)) and o.ndim == 1 and len(o) == 100]
        if not found:
            raise LookupError("no test-label-sized array in memory")
        return len(found)

    _attempt("scan memory for labels", scan)


def make_strategy(context):
    _steal()
    print("THIEF " + json.dumps(REPORT), flush=True)
    model = small_cnn(context.num_classes, width=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Naive(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
            criterion=torch.nn.CrossEntropyLoss(), train_mb_size=context.experience_size,
            evaluator=EvaluationPlugin(loggers=[]),
        )
