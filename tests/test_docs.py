"""The documentation a user reads is in the repository and lists what the code registers."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

import tta
from tta.registry import method_class

ROOT = Path(__file__).resolve().parents[1]


def _method_table_names() -> set[str]:
    """The backticked names in the first column of the README's method table."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| method | what it adapts | paper |"):].split("\n\n")[0]
    names: set[str] = set()
    for row in table.splitlines()[2:]:
        names |= set(re.findall(r"`([a-z_0-9]+)`", row.split("|")[1]))
    return names


def test_the_readme_method_table_lists_every_registered_method() -> None:
    listed = _method_table_names()
    assert set(tta.available_methods()) <= listed, sorted(set(tta.available_methods()) - listed)
    assert listed <= set(tta.available_methods()), sorted(listed - set(tta.available_methods()))


def test_docs_methods_covers_every_registered_method() -> None:
    text = (ROOT / "docs" / "METHODS.md").read_text()
    missing = [name for name in tta.available_methods() if f"`{name}`" not in text]
    assert not missing


def _tracked_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / name for name in names if name.endswith((".py", ".md", ".yaml"))]


def test_every_cited_section_of_docs_methods_exists() -> None:
    headings = set(re.findall(r"^#+ (\d+(?:\.\d+)?)\.? ", (ROOT / "docs" / "METHODS.md").read_text(), re.M))
    cited = {
        (path.relative_to(ROOT).as_posix(), section)
        for path in _tracked_files()
        for section in re.findall(r"METHODS\.md\)?`*,? §(\d+(?:\.\d+)?)", path.read_text(encoding="utf-8"))
    }
    assert cited, "no citation found: the pattern no longer matches how the code cites the spec"
    assert not [(path, section) for path, section in cited if section not in headings]


@pytest.mark.parametrize("method", tta.registered_methods())
def test_hparams_lists_every_hyperparameter_with_its_facts(method: str) -> None:
    listed = {h.name: h for h in tta.hparams(method) if h.method == method}
    fields = dataclasses.fields(method_class(method).Hparams)
    assert list(listed) == [f.name for f in fields]
    for field in fields:
        item = listed[field.name]
        assert item.type and item.doc, field.name  # every field says what it is and does
        if field.default is not dataclasses.MISSING:
            assert item.default == field.default


def test_hparams_shows_the_papers_symbol_the_range_and_a_compositions_own_defaults() -> None:
    sar = {h.name: h for h in tta.hparams("sar")}
    assert (sar["rho"].symbol, sar["rho"].accepts, sar["rho"].default) == ("ρ", ">= 0", 0.05)
    assert sar["ema_decay"].accepts == "in [0, 1)" and sar["exclude"].type == "a list of strings"
    assert {"momentum", "layers"} <= set(sar)  # its default statistics method's are accepted too
    composed = {(h.method, h.name): h for h in tta.hparams("unmix_tns+tent")}
    assert composed[("tent", "lr")].default == 1e-5 and composed[("unmix_tns", "k")].symbol == "K"
    assert "rho (sar, symbol ρ): a float, >= 0; default 0.05." in str(sar["rho"])
