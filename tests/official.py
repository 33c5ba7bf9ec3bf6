"""The official implementations that the differential tests compare against.

Each differential test is marked ``@pytest.mark.official`` and finds its checkout through
:func:`checkout_root`, the one place that decides what happens without one: the test skips,
or fails when ``TTA_REQUIRE_OFFICIAL=1`` (set by ``scripts/run_differential_tests.py``, so
that a missing checkout can never pass as a skip there). The variables, repositories and the
commits last checked are listed for users in docs/DIFFERENTIAL_TESTS.md.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

#: set to 1 to turn a missing checkout into a failure instead of a skip
REQUIRE_ENV = "TTA_REQUIRE_OFFICIAL"


@dataclasses.dataclass(frozen=True)
class Checkout:
    #: environment variable that names the checkout root
    variable: str
    #: GitHub owner/name of the official repository
    repository: str
    #: file inside the checkout that proves the variable points at the right tree
    probe: str

    @property
    def folder(self) -> str:
        """The folder name under a directory of checkouts (the repository's name)."""
        return self.repository.split("/", 1)[1]


CHECKOUTS: tuple[Checkout, ...] = (
    Checkout("TRIBE_OFFICIAL_SRC", "Gorilla-Lab-SCUT/TRIBE", "core/adapter/TRIBE.py"),
    Checkout("ROTTA_OFFICIAL_SRC", "BIT-DA/RoTTA", "core/adapter/rotta.py"),
    Checkout("ROID_OFFICIAL_SRC", "mariodoebler/test-time-adaptation", "classification/methods/roid.py"),
    Checkout("TTA_BENCHMARK_ROOT", "mariodoebler/test-time-adaptation", "classification/datasets/data_loading.py"),
    Checkout("SAR_OFFICIAL_SRC", "mr-eggplant/SAR", "sar.py"),
    Checkout("EATA_OFFICIAL_SRC", "mr-eggplant/EATA", "eata.py"),
    Checkout("SI_BLURRY_ROOT", "moonjunyyy/Si-Blurry", "utils/online_sampler.py"),
    Checkout("ADAB2N_OFFICIAL_SRC", "lvyilin/AdaB2N", "models/utils/adab2n.py"),
    Checkout("PETTA_OFFICIAL_SRC", "hthieu166/petta", "src/data/ttasampler.py"),
    Checkout("ADANPC_OFFICIAL_SRC", "yfzhang114/AdaNPC", "domainbed/algorithms.py"),
    Checkout("DEYO_OFFICIAL_SRC", "Jhyun17/DeYO", "methods/deyo.py"),
    Checkout("COME_OFFICIAL_SRC", "BlueWhaleLab/COME", "tent_come.py"),
    Checkout("COTTA_OFFICIAL_SRC", "qinenergy/cotta", "cifar/cotta.py"),
)
BY_VARIABLE: dict[str, Checkout] = {c.variable: c for c in CHECKOUTS}

#: the test item being run (set by tests/conftest.py), so that an unmarked caller is caught
current_item: pytest.Item | None = None


def resolve(variable: str, value: str | None) -> Path | None:
    """The checkout root that ``value`` names for ``variable``, or None if it is not one.
    A path to the probe file itself is accepted too (the older form of ADAB2N_OFFICIAL_SRC)."""
    checkout = BY_VARIABLE[variable]
    if not value:
        return None
    path = Path(value)
    if path.is_file() and path.as_posix().endswith(checkout.probe):
        path = Path(path.as_posix()[: -len(checkout.probe)] or ".")
    return path if (path / checkout.probe).is_file() else None


def checkout_root(variable: str) -> Path:
    """Root of the official checkout named by ``variable``; skips the calling test without one
    (fails under ``TTA_REQUIRE_OFFICIAL=1``)."""
    if variable not in BY_VARIABLE:
        raise KeyError(f"{variable} is not a registered official checkout (tests/official.py)")
    if current_item is not None and current_item.get_closest_marker("official") is None:
        pytest.fail(
            f"{current_item.nodeid} compares against an official checkout but lacks "
            "@pytest.mark.official, so scripts/run_differential_tests.py would not run it",
            pytrace=False,
        )
    root = resolve(variable, os.environ.get(variable))
    if root is None:
        checkout = BY_VARIABLE[variable]
        message = f"set {variable} to a checkout of {checkout.repository} (docs/DIFFERENTIAL_TESTS.md)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return root
