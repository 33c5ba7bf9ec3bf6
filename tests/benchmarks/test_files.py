"""The one atomic write and the one JSON conversion (benchmarks.files)."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.files import atomic_torch_save, atomic_write, atomic_write_text, json_ready


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = atomic_write_text(tmp_path / "sub" / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_write(path) as handle:
        handle.write("half")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old" and os.listdir(path.parent) == ["a.txt"]
    atomic_torch_save({"x": torch.ones(2)}, tmp_path / "t.pt")
    assert torch.equal(torch.load(tmp_path / "t.pt")["x"], torch.ones(2))


class Colour(str, enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: float
    y: tuple[int, int]


def test_json_ready_gives_plain_json_values() -> None:
    value = {
        1: (np.float32(0.5), np.int64(3), torch.tensor(2.0)),
        "nan": math.nan, "inf": [float("inf")], "colour": Colour.RED, "point": Point(1.0, (2, 3)),
        "version": torch.__version__,
    }
    plain = json_ready(value)
    assert plain == {
        "1": [0.5, 3, 2.0], "nan": None, "inf": [None], "colour": "red", "point": {"x": 1.0, "y": [2, 3]},
        "version": str(torch.__version__),
    }
    assert type(plain["version"]) is str
    json.dumps(plain, allow_nan=False)
