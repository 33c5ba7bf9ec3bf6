"""Reads the hidden test labels, by every route that once worked: first it switches the
audit-hook policy off from Python (it is an ordinary object in this process), then it tries
the dataset files directly, through ``dir_fd`` and relative paths, through a symlink made in
its scratch, from native code (``torch.from_file``, ``mmap`` of a descriptor, ``ctypes``),
the project's own loader, the labels file a careless organiser left in the results folder,
and the memory and environment of the harness through ``/proc``. If the digits data can be
read, it predicts by matching image bytes (a perfect score); the test asserts it cannot."""

import gc
import glob
import json
import mmap
import os

import numpy as np
import torch

REPORT = {}
LOOKUP = {}


def _attempt(name, action):
    try:
        result = action()
        REPORT[name] = f"succeeded: {str(result)[:60]}"
        return result
    except BaseException as error:  # noqa: BLE001 - the point is to survive every refusal
        REPORT[name] = f"blocked: {type(error).__name__}"
        return None


def _policy_off():
    switched = 0
    for obj in gc.get_objects():
        if type(obj).__name__ == "Policy" and hasattr(obj, "check"):
            obj.protected.clear()
            obj.readable.append("/")
            type(obj).check = lambda self, event, args: None
            switched += 1
    if not switched:
        raise LookupError("no policy object")
    return switched


def _digits_dir():
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    return os.path.join(os.path.dirname(spec.origin), "datasets", "data")


def _read_native_from_file(path):
    return torch.from_file(path, size=16, dtype=torch.uint8)[:4].tolist()


def _read_mmap(path):
    fd = os.open(path, os.O_RDONLY)
    return mmap.mmap(fd, 0, prot=mmap.PROT_READ)[:4]


def _read_ctypes(path):
    import ctypes

    libc = ctypes.CDLL(None)
    fd = libc.open(path.encode(), 0)
    if fd < 0:
        raise FileNotFoundError(path)
    buffer = ctypes.create_string_buffer(4)
    libc.read(fd, buffer, 4)
    return buffer.raw


def _read_dir_fd(path):
    directory = os.open(os.path.dirname(path), os.O_RDONLY)
    fd = os.open(os.path.basename(path), os.O_RDONLY, dir_fd=directory)
    return os.read(fd, 4)


def _read_relative(path):
    here = os.getcwd()
    os.chdir(os.path.dirname(path))
    try:
        return open(os.path.basename(path), "rb").read(4)
    finally:
        os.chdir(here)


def _read_symlink(path, scratch):
    link = os.path.join(scratch, "innocent.txt")
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(path, link)
    return open(link, "rb").read(4)


def _project_loader():
    from benchmarks.data import load_digits

    data = load_digits("test", size=32)
    for image, label in zip(data.images, data.labels):
        LOOKUP[np.ascontiguousarray(image).tobytes()] = int(label)
    return len(LOOKUP)


def _left_behind_labels():
    found = glob.glob("/tmp/**/decoy_labels.npy", recursive=True)
    if not found:
        raise LookupError("no decoy file visible")
    return np.load(found[0])[:5]


def _proc_secrets():
    hits = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        for name in ("environ", "cmdline"):
            try:
                data = open(f"/proc/{entry}/{name}", "rb").read()
            except OSError:
                continue
            if b"TTA_HARNESS_TEST_SECRET" in data or b"pytest" in data:
                hits.append(f"{entry}/{name}")
        try:
            with open(f"/proc/{entry}/mem", "rb") as memory:
                memory.read(1)
            hits.append(f"{entry}/mem")
        except OSError:
            pass
    if not hits:
        raise LookupError("nothing of the harness in /proc")
    return hits


def make_strategy(context):
    _attempt("switch the audit policy off", _policy_off)
    digits = os.path.join(_digits_dir(), "digits.csv.gz")
    _attempt("open the digits file", lambda: open(digits, "rb").read(4))
    _attempt("dir_fd open", lambda: _read_dir_fd(digits))
    _attempt("relative path", lambda: _read_relative(digits))
    _attempt("symlink from scratch", lambda: _read_symlink(digits, context.scratch_dir))
    _attempt("torch.from_file", lambda: _read_native_from_file(digits))
    _attempt("mmap of a descriptor", lambda: _read_mmap(digits))
    _attempt("ctypes open/read", lambda: _read_ctypes(digits))
    _attempt("project loader", _project_loader)
    _attempt("labels left in the results folder", _left_behind_labels)
    _attempt("harness memory and environment via /proc", _proc_secrets)
    print("REPORT " + json.dumps(REPORT), flush=True)
    return Idle(context.num_classes)


class Idle:
    def __init__(self, num_classes):
        self.num_classes = num_classes

    def train(self, experience):
        pass


def predict(strategy, images):
    scores = torch.zeros(images.shape[0], strategy.num_classes)
    if LOOKUP:
        raw = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        for row, image in enumerate(raw):
            label = LOOKUP.get(image.tobytes())
            if label is not None:
                scores[row, label] = 1.0
    return scores
