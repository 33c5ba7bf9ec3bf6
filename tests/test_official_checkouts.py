"""The registry of official checkouts behind the differential tests (tests/official.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import official

ROOT = Path(__file__).resolve().parents[1]


def test_every_registered_checkout_is_documented_and_used() -> None:
    docs = (ROOT / "docs" / "DIFFERENTIAL_TESTS.md").read_text()
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    for checkout in official.CHECKOUTS:
        assert f"`{checkout.variable}`" in docs, checkout.variable
        assert f'"{checkout.variable}"' in sources, f"no test uses {checkout.variable}"


def test_no_test_reads_a_checkout_variable_directly() -> None:
    pattern = re.compile("|".join(re.escape(c.variable) for c in official.CHECKOUTS))
    for path in (ROOT / "tests").rglob("*.py"):
        if path.name in ("official.py", Path(__file__).name):
            continue
        for line in path.read_text().splitlines():
            if pattern.search(line) and "environ" in line:
                pytest.fail(f"{path.relative_to(ROOT)} reads a checkout variable itself: {line.strip()}")


def test_resolve_accepts_a_root_or_the_probe_file(tmp_path: Path) -> None:
    probe = tmp_path / "AdaB2N" / "models" / "utils" / "adab2n.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("")
    assert official.resolve("ADAB2N_OFFICIAL_SRC", str(tmp_path / "AdaB2N")) == tmp_path / "AdaB2N"
    assert official.resolve("ADAB2N_OFFICIAL_SRC", str(probe)) == tmp_path / "AdaB2N"
    assert official.resolve("ADAB2N_OFFICIAL_SRC", str(tmp_path)) is None  # not a checkout
    assert official.resolve("ADAB2N_OFFICIAL_SRC", "") is None
    with pytest.raises(KeyError):
        official.resolve("NOT_A_CHECKOUT", str(tmp_path))


def test_an_unmarked_caller_fails_even_without_checkouts() -> None:
    with pytest.raises(pytest.fail.Exception, match="lacks @pytest.mark.official"):
        official.checkout_root("SAR_OFFICIAL_SRC")


def test_a_missing_checkout_skips_or_fails_when_required(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(official, "current_item", None)  # as if called from a marked test
    monkeypatch.setenv("SAR_OFFICIAL_SRC", str(tmp_path))  # no sar.py there
    monkeypatch.delenv(official.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception):
        official.checkout_root("SAR_OFFICIAL_SRC")
    monkeypatch.setenv(official.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="SAR_OFFICIAL_SRC"):
        official.checkout_root("SAR_OFFICIAL_SRC")
    (tmp_path / "sar.py").write_text("")
    assert official.checkout_root("SAR_OFFICIAL_SRC") == tmp_path
