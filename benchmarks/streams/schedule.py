"""Domain schedules: which (domain, severity) blocks a stream visits, and where it resets (§9.3).

A stream is a sequence of *segments*. A segment is one pass over a domain's samples at one
severity (or, for the mixed schedule, over all domains' samples together). Segments are the
units the official code builds one data loader for, so batches never straddle them and the
last batch of a segment may be smaller.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.streams.ccc import WalkStep, load_table, walk_schedule
from benchmarks.streams.config import StreamConfig

MIXED = "mixed"


@dataclass(frozen=True)
class Segment:
    """One contiguous block of a stream.

    Attributes:
        domains: the domain(s) whose samples the segment holds (all domains when mixed).
        severity: the severity of every sample in the segment.
        reset: whether the method is reset before the segment's first batch.
        recurrence: which visit of the schedule it belongs to (0 unless ``recurrences > 1``).
    """

    domains: tuple[str, ...]
    severity: int
    reset: bool
    recurrence: int = 0

    @property
    def name(self) -> str:
        """The domain name, or ``"mixed"`` for a segment holding several domains."""
        return self.domains[0] if len(self.domains) == 1 else MIXED


def build_segments(config: StreamConfig) -> list[Segment]:
    """The segments of ``config``'s schedule, in stream order.

    * ``reset_each_shift``: domain by domain, severities inner; reset at every new domain.
    * ``continual``: the same order; reset only before the first batch.
    * ``gradual``: each domain at severities 1,2,3,4,5,4,3,2,1 (when one severity is
      configured, otherwise the configured list); reset only before the first batch.
    * ``mixed``: one segment per severity holding all domains' samples shuffled together;
      reset only before the first batch.

    * ``ccc``: one segment per step of the calibrated walk (:mod:`benchmarks.streams.ccc`),
      holding the step's current and following state; reset only before the first batch.

    With ``recurrences = R`` the whole sequence is visited R times in a row (the resets of
    the schedule repeat with it: continual streams still reset only before the first batch).
    """
    if config.schedule == "ccc":
        return [
            Segment(tuple(dict.fromkeys((step.current[0], step.following[0]))), step.current[1], reset=i == 0 and r == 0,
                    recurrence=r)
            for r in range(config.recurrences)
            for i, step in enumerate(walk_steps(config))
        ]
    severities = config.severity_sequence()
    segments: list[Segment] = []
    for recurrence in range(config.recurrences):
        if config.schedule == "mixed":
            for severity in severities:
                segments.append(Segment(config.domains, severity, reset=not segments, recurrence=recurrence))
            continue
        for domain in config.domains:
            for i, severity in enumerate(severities):
                reset = not segments or (config.schedule == "reset_each_shift" and i == 0)
                segments.append(Segment((domain,), severity, reset=reset, recurrence=recurrence))
    return segments


def walk_steps(config: StreamConfig) -> list[WalkStep]:
    """The steps of a ``ccc`` stream's walk (over ``config.domains``), drawn from its seed."""
    import numpy as np

    table = {state: acc for state, acc in load_table(config.walk_table or "").items() if state[0] in config.domains}
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 2]))
    return walk_schedule(
        table, config.walk_target, config.walk_steps, rng, band=config.walk_band,
        transition=config.walk_transition, dwell=config.walk_dwell,
    )
