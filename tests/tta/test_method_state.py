"""Method state, over every registered method (issue 24): declared once and guarded by
construction.

For every method on a BatchNorm model and, where it runs there, on a GroupNorm model, and for
compositions of every statistics method and every other method:

* a step that raises at any of its forward passes, a batch with a NaN and a batch with an Inf
  (also as the very first batch) leave ``state_dict()`` bit-identical, and the next outputs
  equal those of a wrapper that never saw the bad batch;
* a step changes no attribute of the method that is not declared state;
* a state dict saved in another process loads with the default ``torch.load``
  (``weights_only=True``) and continues with identical outputs.

The cases come from the registry, so a new method is covered without editing this file.
"""

from __future__ import annotations

import contextlib
import copy
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from torch import nn

import tta
from tests.conftest import batches, small_bcn_cnn, small_bn_cnn, small_gn_cnn
from tta.methods.base import OBJECTIVE, OUTPUT, STATISTICS
from tta.registry import method_class
from tta.spec import split_name

ROOT = Path(__file__).resolve().parents[2]
#: small enough that a step is milliseconds, large enough that every part of a method runs:
#: RoTTA updates twice per batch (a failure can strike after an update); the entropy
#: thresholds let the untrained test models' samples count as reliable
HPARAMS: dict[str, dict[str, Any]] = {
    "rotta": {"memory_size": 6, "update_frequency": 3},
    "sar": {"e0": 2.0},
    "eta": {"e0": 2.0},
    "eata": {"e0": 2.0},
    "tribe": {"h0": 1.0},
    "petta": {"memory_size": 6},
    "deyo": {"ent_threshold": 2.0, "plpd_threshold": -1.0},
}


def _cases() -> list[tuple[str, str]]:
    """(method, model kind) for every registered method and the compositions."""
    cases = []
    statistics = [n for n in tta.registered_methods() if method_class(n).role == STATISTICS]
    others = [n for n in tta.registered_methods() if method_class(n).role in (OBJECTIVE, OUTPUT)]
    for name in tta.registered_methods():
        cls = method_class(name)
        if name == "bcn":
            cases.append((name, "bcn"))
            continue
        cases.append((name, "bn"))
        if cls.role != STATISTICS:
            cases.append((name, "gn"))
    cases += [(f"{name}+tent", "bcn" if name == "bcn" else "bn") for name in statistics]
    cases += [(f"unmix_tns+{name}", "bn") for name in others if name != "tent"]
    return cases


pytestmark = pytest.mark.usefixtures("one_thread")
CASES = _cases()
IDS = [f"{method}-{kind}" for method, kind in CASES]


def data(n: int = 6, seed: int = 1) -> list[torch.Tensor]:
    return batches(n, batch_size=6, shape=(3, 6, 6), seed=seed)


def make(method: str, kind: str) -> tta.Adapted:
    torch.manual_seed(0)  # the convolutions' initial weights
    model = {"bn": small_bn_cnn, "gn": small_gn_cnn, "bcn": small_bcn_cnn}[kind](width=8)
    last = split_name(method)[-1]
    hparams = dict(HPARAMS.get(last, {}))
    if last == "eata":
        hparams["fisher_loader"] = data(2, seed=7)
    if last == "adanpc":  # labelled source data for the kNN memory (required)
        hparams["source_loader"] = [(x, torch.arange(x.shape[0]) % 4) for x in data(2, seed=7)]
    if last == "petta":
        hparams["source_loader"] = data(2, seed=7)
    return tta.adapt(model, method, **hparams)


def saved(adapted: tta.Adapted) -> dict[str, Any]:
    return copy.deepcopy(adapted.state_dict())


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Equal to the bit (NaN equal to NaN), with the same types, keys and shapes."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or (
            a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        ), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


def assert_continues_alike(adapted: tta.Adapted, twin: tta.Adapted, xs: list[torch.Tensor]) -> None:
    assert_same(saved(adapted), saved(twin))
    for x in xs:
        assert torch.equal(adapted(x), twin(x))
    assert_same(saved(adapted), saved(twin))


class Injected(RuntimeError):
    pass


@contextlib.contextmanager
def failing_forward(model: nn.Module, at: int) -> Iterator[list[int]]:
    """Raise :class:`Injected` at the ``at``-th call of any ``nn.Linear`` of ``model`` (every
    forward of every network ends in one); yields the running call count."""
    calls = [0]

    def hook(module: nn.Module, inputs: Any) -> None:
        calls[0] += 1
        if calls[0] == at:
            raise Injected(f"forward {at}")

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def forwards_per_step(adapted: tta.Adapted, x: torch.Tensor) -> int:
    probe = copy.deepcopy(adapted)
    with failing_forward(probe.model, at=0) as calls:
        probe(x)
    return calls[0]


# -- guarded by construction -----------------------------------------------------------------
@pytest.mark.parametrize("method, kind", CASES, ids=IDS)
def test_a_step_failing_at_any_forward_changes_nothing(method: str, kind: str) -> None:
    adapted, twin = make(method, kind), make(method, kind)
    xs = data()
    for x in xs[:2]:
        adapted(x)
        twin(x)
    count = forwards_per_step(adapted, xs[2])
    assert count >= 1
    for at in range(1, count + 1):
        before = saved(adapted)
        with failing_forward(adapted.model, at), pytest.raises(Injected):
            adapted(xs[2])
        assert_same(saved(adapted), before, f"state after a failure at forward {at}")
    assert_continues_alike(adapted, twin, xs[2:])


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("first", [True, False], ids=["first-batch", "later-batch"])
@pytest.mark.parametrize("method, kind", CASES, ids=IDS)
def test_a_nonfinite_batch_changes_nothing(method: str, kind: str, first: bool, bad_value: float) -> None:
    adapted, twin = make(method, kind), make(method, kind)
    xs = data()
    if not first:
        adapted(xs[0])
        twin(xs[0])
    before = saved(adapted)
    bad = xs[1].clone()
    bad[1, 0, 0, 0] = bad_value
    adapted(bad)
    assert_same(saved(adapted), before)
    assert_continues_alike(adapted, twin, xs[2:])


def _undeclared(method: Any) -> dict[str, tuple[int, Any]]:
    """Identity (and, for lists and dicts, the identities of the items) of every attribute
    that is not declared state or monitoring."""
    skip = {"_state", "_generator", "_device_generators", *method.monitoring}
    found = {}
    for name, value in vars(method).items():
        if name in skip:
            continue
        items = [id(v) for v in (value.values() if isinstance(value, dict) else value)] if isinstance(value, (list, dict)) else None
        found[name] = (id(value), items)
    return found


@pytest.mark.parametrize("method, kind", CASES, ids=IDS)
def test_a_step_changes_no_undeclared_attribute(method: str, kind: str) -> None:
    adapted = make(method, kind)
    parts = adapted.method.parts()
    xs = data(3)
    adapted(xs[0])
    before = [_undeclared(part) for part in parts]
    for x in xs[1:]:
        adapted(x)
    assert [_undeclared(part) for part in parts] == before


def test_rotta_counters_do_not_move_on_a_batch_of_another_shape() -> None:
    adapted = tta.adapt(small_bn_cnn(width=8), "rotta", memory_size=6, update_frequency=3)
    adapted(data(1)[0])
    rotta = adapted.method.method
    seen, inserted, before = rotta.seen, rotta.memory.inserted, saved(adapted)
    with pytest.raises(ValueError, match="reset\\(\\) before changing the input shape"):
        adapted(batches(1, batch_size=6, shape=(3, 8, 8), seed=2)[0])
    assert (rotta.seen, rotta.memory.inserted) == (seen, inserted)
    assert_same(saved(adapted), before)


def test_sar_on_groupnorm_recovers_only_as_a_clean_run_after_a_nan_first_batch() -> None:
    """The EMA's "is set" flag is guarded with its value: a NaN first batch used to leave the
    flag set over an EMA of 0, and the next step recovered where a clean run did not."""
    adapted, twin = make("sar", "gn"), make("sar", "gn")
    xs = data()
    bad = xs[0].clone()
    bad[0, 0, 0, 0] = float("nan")
    adapted(bad)
    assert not bool(adapted.method.method._ema_set)
    assert_continues_alike(adapted, twin, xs[1:])
    assert adapted.method.method.num_recoveries == twin.method.method.num_recoveries


# -- saved in one process, loaded in another -------------------------------------------------
def save_all(folder: str) -> None:
    """Run in a separate process: every case after two batches, its state dict and the next
    outputs (``torch.save``)."""
    xs = data()
    for index, (method, kind) in enumerate(CASES):
        adapted = make(method, kind)
        for x in xs[:2]:
            adapted(x)
        torch.save(adapted.state_dict(), Path(folder) / f"{index}.state.pt")
        torch.save([adapted(x) for x in xs[2:4]], Path(folder) / f"{index}.outputs.pt")


@pytest.fixture(scope="module")
def saved_elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("state_dicts")
    code = f"import torch; torch.set_num_threads(1); from tests.tta.test_method_state import save_all; save_all({str(folder)!r})"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=600)
    return folder


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_a_state_dict_saved_in_another_process_loads_safely_and_continues(saved_elsewhere: Path, index: int) -> None:
    method, kind = CASES[index]
    state = torch.load(saved_elsewhere / f"{index}.state.pt")  # the default: weights_only=True
    expected = torch.load(saved_elsewhere / f"{index}.outputs.pt", weights_only=True)
    restored = make(method, kind)
    restored.load_state_dict(state)
    xs = data()
    for x, out in zip(xs[2:4], expected):
        assert torch.equal(restored(x), out)
