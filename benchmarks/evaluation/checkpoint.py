"""Mid-stream checkpoints: continue a killed online run where it stopped, bit for bit.

A :class:`StreamCheckpoint` is written every ``every`` batches (atomically,
:func:`benchmarks.files.atomic_write`), so a process killed at any point, even during a
write, leaves either no checkpoint or a complete one. It holds

* the adapted model's ``state_dict`` (statistics, parameters and, through the ``Adapted``
  wrapper's extra state, the method's optimizer state),
* every random number generator: Python's ``random``, NumPy's global generator, torch's CPU
  generator and every CUDA device's, plus any generator objects the caller registers,
* the position in the stream (the next batch to run) and the partial metrics (every
  prediction recorded so far), and the loop's elapsed time,
* the protocol fingerprint of the run. A checkpoint of another fingerprint is refused with
  a message that lists what differs.

Streams of this project build batch ``i`` from the config alone (:meth:`Stream.batch`), so
the stream itself needs no state beyond the position.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.files import atomic_torch_save

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "tta-stream-checkpoint"
CHECKPOINT_VERSION = 1

Generators = Mapping[str, "torch.Generator | np.random.Generator"]


class CheckpointMismatch(ValueError):
    """A checkpoint written under another protocol (or by other code) than this run's."""


# -- random number generators ---------------------------------------------------------------------
def _numpy_state_to_plain(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_state_from_plain(state: Mapping[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"])


def rng_state(generators: Generators | None = None) -> dict[str, Any]:
    """The state of every RNG a run may draw from (see the module docstring)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {},
    }
    for name, generator in (generators or {}).items():
        if isinstance(generator, torch.Generator):
            state["generators"][name] = {"kind": "torch", "state": generator.get_state()}
        elif isinstance(generator, np.random.Generator):
            state["generators"][name] = {"kind": "numpy", "state": _plain_bit_generator(generator.bit_generator.state)}
        else:
            raise TypeError(f"generator {name!r} is a {type(generator).__name__}, not a torch or NumPy generator")
    return state


def _plain_bit_generator(state: Any) -> Any:
    """NumPy bit-generator states hold Python ints beyond 64 bits; keep them as strings."""
    if isinstance(state, dict):
        return {k: _plain_bit_generator(v) for k, v in state.items()}
    if isinstance(state, int) and not isinstance(state, bool):
        return {"int": str(state)}
    if isinstance(state, np.ndarray):
        return {"array": state.tolist(), "dtype": str(state.dtype)}
    return state


def _restore_bit_generator(state: Any) -> Any:
    if isinstance(state, dict) and set(state) == {"int"}:
        return int(state["int"])
    if isinstance(state, dict) and set(state) == {"array", "dtype"}:
        return np.asarray(state["array"], dtype=state["dtype"])
    if isinstance(state, dict):
        return {k: _restore_bit_generator(v) for k, v in state.items()}
    return state


def set_rng_state(state: Mapping[str, Any], generators: Generators | None = None) -> None:
    """Restore what :func:`rng_state` saved (generator objects are restored in place)."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state.get("generators", {})
    for name, generator in (generators or {}).items():
        if name not in saved:
            raise CheckpointMismatch(f"the checkpoint holds no state for generator {name!r}")
        if isinstance(generator, torch.Generator):
            generator.set_state(saved[name]["state"])
        else:
            generator.bit_generator.state = _restore_bit_generator(saved[name]["state"])


class StreamCheckpoint:
    """Where and how often an online run checkpoints, and under which fingerprint.

    Args:
        path: the checkpoint file (``<run folder>/checkpoint.pt`` in the app).
        every: write after every ``every``-th batch (>= 1).
        fingerprint: the run's :meth:`benchmarks.protocol.Protocol.fingerprint`.
        protocol: the protocol block, stored so a refused checkpoint can say what differs.
        resume: continue from an existing checkpoint; False ignores it (and overwrites it).
        generators: extra generator objects to save and restore with the global RNGs.
        weights_only: read the file with ``torch.load(weights_only=True)`` (tensors and plain
            containers only, which is all the benchmark app stores); a caller that stores
            arbitrary Python objects in ``extra`` sets it to False for files it wrote itself.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        every: int,
        fingerprint: str,
        *,
        protocol: Mapping[str, Any] | None = None,
        resume: bool = True,
        generators: Generators | None = None,
        weights_only: bool = True,
    ) -> None:
        if int(every) < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.path = Path(path)
        self.every = int(every)
        self.fingerprint = str(fingerprint)
        self.protocol = dict(protocol) if protocol is not None else None
        self.resume = resume
        self.generators = dict(generators or {})
        self.weights_only = weights_only
        self.saves = 0
        self.save_seconds = 0.0
        #: batches already evaluated by the run this one continues (None: started afresh)
        self.resumed_at: int | None = None

    def due(self, done: int, total: int | None) -> bool:
        """Whether to write after ``done`` batches (never after the last one)."""
        return done % self.every == 0 and (total is None or done < total)

    def save(self, *, model: torch.nn.Module, position: int, recorders: list[dict[str, Any]], extra: Mapping[str, Any]) -> None:
        """Write the checkpoint after ``position`` batches (atomically)."""
        tick = time.perf_counter()
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "fingerprint": self.fingerprint,
            "protocol": self.protocol,
            "position": int(position),
            "model": model.state_dict(),
            "rng": rng_state(self.generators),
            "recorders": recorders,
            "extra": dict(extra),
        }
        atomic_torch_save(payload, self.path)
        self.saves += 1
        self.save_seconds += time.perf_counter() - tick

    def load(self) -> dict[str, Any] | None:
        """The checkpoint to continue from, or None (no file, or ``resume`` is off).

        Raises :class:`CheckpointMismatch` for a checkpoint of another fingerprint.
        """
        if not self.resume or not self.path.is_file():
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=self.weights_only)
        except Exception as error:  # noqa: BLE001 - atomic writes make this a foreign file
            raise CheckpointMismatch(f"{self.path} is not a readable checkpoint ({error}); delete it to start over") from None
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointMismatch(f"{self.path} is not a stream checkpoint of this project; delete it to start over")
        if int(payload.get("version", 0)) != CHECKPOINT_VERSION:
            raise CheckpointMismatch(
                f"{self.path} has checkpoint version {payload.get('version')}, this code reads {CHECKPOINT_VERSION}; "
                "delete it (or set runtime.resume=false) to start over"
            )
        if payload.get("fingerprint") != self.fingerprint:
            raise CheckpointMismatch(self._mismatch_message(payload))
        self.resumed_at = int(payload["position"])
        return payload

    def restore(self, payload: Mapping[str, Any], model: torch.nn.Module) -> None:
        """Load the model state and every RNG of a checkpoint returned by :meth:`load`."""
        model.load_state_dict(payload["model"])
        set_rng_state(payload["rng"], self.generators)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def _mismatch_message(self, payload: Mapping[str, Any]) -> str:
        from benchmarks.protocol import differences, format_differences

        head = (
            f"refusing to resume from {self.path}: it was written under protocol {str(payload.get('fingerprint'))[:12]}, "
            f"this run's protocol is {self.fingerprint[:12]}"
        )
        detail = ""
        if isinstance(payload.get("protocol"), Mapping) and self.protocol is not None:
            diffs = differences(payload["protocol"], self.protocol)
            if diffs:
                detail = "\n" + format_differences(diffs, ("checkpoint", "this run"))
        return head + detail + "\nDelete the checkpoint, or set runtime.resume=false, to start the run over."
