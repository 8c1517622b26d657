"""The scheduler: cron schedules (UTC), each tick run once across all containers.

A tick is claimed by inserting `(name, tick)` into `schedule_runs`; the primary key makes exactly
one container win. Missed ticks (the scheduler was down) are not replayed: the next tick runs.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import structlog
from croniter import croniter
from psycopg import Error as PgError
from psycopg.types.json import Jsonb

from appliance import metrics
from appliance.resources import Resources
from appliance.schedules import SCHEDULES, Entry, Run

log = structlog.get_logger()


def next_tick(cron: str, after: datetime) -> datetime:
    tick: datetime = croniter(cron, after).get_next(datetime)
    return tick


async def claim(res: Resources, name: str, tick: datetime) -> bool:
    async with res.connection() as conn:
        cur = await conn.execute(
            "INSERT INTO schedule_runs (name, tick, instance) VALUES (%s, %s, %s)"
            " ON CONFLICT (name, tick) DO NOTHING",
            (name, tick, res.config.appliance.instance),
        )
        return cur.rowcount == 1


async def run_entry(res: Resources, entry: Entry, tick: datetime) -> None:
    if not await claim(res, entry.name, tick):
        log.debug("schedule_tick_taken", schedule=entry.name, tick=tick.isoformat())
        return
    started = time.perf_counter()
    status, counts, error = "ok", {}, None
    try:
        counts = await entry.run(res, Run())
    except Exception as exc:
        # A failed run is recorded and logged; the scheduler itself keeps running.
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        log.exception("schedule_failed", schedule=entry.name)
    elapsed = time.perf_counter() - started
    async with res.connection() as conn:
        await conn.execute(
            "UPDATE schedule_runs SET finished_at = now(), status = %s, counts = %s, error = %s"
            " WHERE name = %s AND tick = %s",
            (status, Jsonb(counts), error, entry.name, tick),
        )
    metrics.SCHEDULE_RUNS.labels(entry.name, status).inc()
    metrics.SCHEDULE_DURATION.labels(entry.name).observe(elapsed)
    log.info(
        "schedule_run",
        schedule=entry.name,
        tick=tick.isoformat(),
        status=status,
        duration_ms=round(elapsed * 1000, 2),
        **counts,
    )


async def run_tick(res: Resources, entry: Entry, tick: datetime) -> None:
    """One tick; PostgreSQL being unreachable loses this tick, not the scheduler."""
    try:
        await run_entry(res, entry, tick)
    except (PgError, OSError) as exc:
        log.error(
            "schedule_tick_failed", schedule=entry.name, tick=tick.isoformat(), error=str(exc)
        )


async def run_scheduler(res: Resources, stop: asyncio.Event) -> None:
    enabled = [e for e in SCHEDULES if e.settings(res.config).enabled]
    now = datetime.now(UTC)
    due = {e.name: next_tick(e.settings(res.config).cron, now) for e in enabled}
    log.info("scheduler_ready", schedules={name: tick.isoformat() for name, tick in due.items()})
    while enabled and not stop.is_set():
        entry = min(enabled, key=lambda e: due[e.name])
        wait = (due[entry.name] - datetime.now(UTC)).total_seconds()
        if wait > 0:
            try:
                await asyncio.wait_for(stop.wait(), timeout=wait)
                break
            except TimeoutError:
                pass
        tick = due[entry.name]
        # From now, not from the tick: a run longer than the period (or a suspended host)
        # skips the ticks it missed instead of replaying them back to back.
        due[entry.name] = next_tick(entry.settings(res.config).cron, max(tick, datetime.now(UTC)))
        await run_tick(res, entry, tick)
    await stop.wait()
