"""Run one benchmark config, or a sweep of them, with Hydra.

    python -m benchmarks.run experiment=digits_quick method=unmix_tns
    python -m benchmarks.run -m experiment=digits_quick launcher=joblib method=source,norm,unmix_tns
    tta-bench --help                      # config groups, presets and examples

Configs live in the ``conf`` package (``pkg://conf``), so the same commands work from a
checkout and from an installed project. See docs/BENCHMARKS.md.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

import benchmarks.app  # noqa: F401  (registers the schema and the tta.* resolvers)

CONFIG_PATH = "pkg://conf"
CONFIG_NAME = "config"
VERSION_BASE = "1.3"


def task(cfg: DictConfig) -> dict[str, Any]:
    """The Hydra task function: one run (see :func:`benchmarks.app.runner.run`)."""
    from benchmarks.app.runner import run

    return run(cfg)


def main() -> None:
    """Entry point of ``python -m benchmarks.run`` and the ``tta-bench`` console script."""
    hydra.main(config_path=CONFIG_PATH, config_name=CONFIG_NAME, version_base=VERSION_BASE)(task)()


if __name__ == "__main__":
    # Launchers pickle the task function for their workers; importing it from its module
    # (not from __main__) makes it a reference to benchmarks.run.task they can import.
    from benchmarks.run import main as _main

    _main()
