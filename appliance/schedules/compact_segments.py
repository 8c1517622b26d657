"""Compact every finished UTC day of flush segments (appliance/segments/compact.py), delete
leftover garbage and sweep orphaned flush objects.

A day past `[schedules.compact_segments] grace_minutes` is compacted at the first run that
finds flush rows for it, so a missed run catches up at the next. A day that fails (a damaged
flush object, S3 refusing) stays as it was and the others go on; the run then fails naming it.
"""

from __future__ import annotations

import structlog
from psycopg import Error as PgError

from appliance.errors import ApplianceError
from appliance.resources import Resources
from appliance.schedules.entry import Run
from appliance.segments import compact

log = structlog.get_logger()


class CompactionFailed(ApplianceError):
    """Some days could not be compacted (each logged as `compaction_failed`)."""


async def run(res: Resources, run: Run) -> dict[str, int]:
    grace = res.config.schedules.compact_segments.grace_minutes
    totals = dict.fromkeys(
        ("days", "blocks", "records", "bytes", "flush_objects_deleted", "orphans_deleted"), 0
    )
    totals.update(busy=0, deferred=0, failed=0)
    async with res.connection() as conn:
        days = await compact.days_due(conn, grace)
    failures: list[str] = []
    for day in days:
        try:
            counts = await compact.compact_day(res, day)
        except (ApplianceError, PgError, OSError) as exc:
            # One day failing (a damaged object, S3 or PostgreSQL away) leaves that day as it
            # was; the others, the garbage and the sweep still run.
            log.error("compaction_failed", day=day.isoformat(), error=str(exc))
            failures.append(f"{day.isoformat()}: {exc}")
            totals["failed"] += 1
            continue
        for name in totals.keys() & counts.keys():
            totals[name] += counts[name]
    async with res.connection() as conn:
        totals["flush_objects_deleted"] += await compact.collect_garbage(conn, res.storage)
        totals["orphans_deleted"] = await compact.sweep_orphans(conn, res.storage)
    if failures:
        log.error("compaction_run_failed", **totals)
        raise CompactionFailed(f"{len(failures)} days not compacted; " + "; ".join(failures))
    return totals
