"""Schedules the scheduler runs: each a name, its config section and an async run function."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from appliance.config import Config
from appliance.config.model import Schedule
from appliance.resources import Resources
from appliance.schedules import compact_segments, prune_job_log

Counts = dict[str, int]


@dataclass(frozen=True)
class Entry:
    name: str
    settings: Callable[[Config], Schedule]
    run: Callable[[Resources], Awaitable[Counts]]


SCHEDULES: tuple[Entry, ...] = (
    Entry("prune_job_log", lambda c: c.schedules.prune_job_log, prune_job_log.run),
    Entry("compact_segments", lambda c: c.schedules.compact_segments, compact_segments.run),
)
