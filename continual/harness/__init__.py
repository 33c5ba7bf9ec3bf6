"""Competition harness: run a submitted strategy factory on a stream whose test labels it
never sees, under a time and memory budget, and keep a leaderboard (docs/COMPETITION.md)."""

from continual.harness.config import HarnessConfig, parse_overrides
from continual.harness.contract import SubmissionContext

__all__ = ["HarnessConfig", "SubmissionContext", "parse_overrides", "run_competition"]


def __getattr__(name: str):
    # run_competition pulls in the data loaders; import it on first use only.
    if name == "run_competition":
        from continual.harness.app import run_competition

        return run_competition
    raise AttributeError(name)
