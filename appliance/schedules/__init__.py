"""The schedules the scheduler runs (see entry.py for what a schedule is). Schedules marked
`retention` are also the ones `appliance retention run` runs."""

from __future__ import annotations

from appliance.messages import reconcile
from appliance.schedules import (
    compact_segments,
    expire_segments,
    maintain_partitions,
    prune_job_log,
)
from appliance.schedules.entry import Counts, Entry, Progress, Run

__all__ = ["SCHEDULES", "Counts", "Entry", "Progress", "Run"]

SCHEDULES: tuple[Entry, ...] = (
    Entry("prune_job_log", lambda c: c.schedules.prune_job_log, prune_job_log.run, retention=True),
    Entry("compact_segments", lambda c: c.schedules.compact_segments, compact_segments.run),
    Entry(
        "expire_segments",
        lambda c: c.schedules.expire_segments,
        expire_segments.run,
        retention=True,
    ),
    Entry(
        "maintain_partitions",
        lambda c: c.schedules.maintain_partitions,
        maintain_partitions.run,
        retention=True,
    ),
    Entry("reconcile", lambda c: c.schedules.reconcile, reconcile.run),
)
