"""The scheduler: cron schedules (UTC), each tick run once across all containers.

Exactly once: a tick is claimed by inserting `(name, tick)` into `schedule_runs`; the primary
key makes one claimer win, the others skip the tick. Missed ticks (the scheduler was down) are
not replayed: the next tick runs.

Owners: before inserting, the claimer takes a session advisory lock keyed by (name, tick) on a
connection of its own, and holds it until the run's row is closed. So a `running` row whose lock
is free has no living owner (its process or its connection died). `reconcile_runs`, at start and
at least every RECONCILE_EVERY seconds, closes such rows as failed ("owner gone"), holding the
lock itself while it does, so it never closes a run that is still going. An owner that lost only
its connection and still finishes records its real outcome over that verdict.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import psycopg
import structlog
from croniter import croniter
from psycopg import Error as PgError
from psycopg.types.json import Jsonb

from appliance import metrics
from appliance.db.pool import connect
from appliance.resources import Resources
from appliance.schedules import SCHEDULES, Entry, Run

log = structlog.get_logger()
Conn = psycopg.AsyncConnection[Any]
Source = Literal["scheduler", "cli"]

RECONCILE_EVERY = 60.0  # seconds between looks for runs whose owner is gone, while waiting
OWNER_GONE = "owner gone"
# The run's advisory lock key, computed by PostgreSQL for owners and reconcilers alike (one
# text form of the tick, whatever the session's time zone).
_LOCK_KEY = (
    "hashtextextended(%s || '@' || floor(extract(epoch FROM %s::timestamptz) * 1000000)::text, 0)"
)


@dataclass
class Outcome:
    status: str  # ok | failed
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


def next_tick(cron: str, after: datetime) -> datetime:
    tick: datetime = croniter(cron, after).get_next(datetime)
    return tick


async def claim(
    res: Resources, name: str, tick: datetime, source: Source = "scheduler"
) -> Conn | None:
    """The owner's connection (holding the run's lock) when this caller won the tick, else
    None. The caller closes the connection once the run's row is closed."""
    conn = await connect(res.config.postgres, "schedule")
    try:
        cur = await conn.execute(f"SELECT pg_try_advisory_lock({_LOCK_KEY})", (name, tick))
        row = await cur.fetchone()
        if row is not None and row[0]:
            cur = await conn.execute(
                "INSERT INTO schedule_runs (name, tick, instance, source) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (name, tick) DO NOTHING",
                (name, tick, res.config.appliance.instance, source),
            )
            if cur.rowcount == 1:
                return conn
    except BaseException:
        await conn.close()
        raise
    await conn.close()
    return None


async def execute(
    res: Resources, entry: Entry, tick: datetime, run: Run, source: Source = "scheduler"
) -> Outcome | None:
    """Claim `tick` and run `entry`, recording the run; None when another claimer has it."""
    owner = await claim(res, entry.name, tick, source)
    if owner is None:
        log.debug("schedule_tick_taken", schedule=entry.name, tick=tick.isoformat())
        return None
    try:
        return await _run_owned(res, entry, tick, run)
    finally:
        # Closing the session releases the run's lock (after its row is closed).
        await owner.close()


async def _run_owned(res: Resources, entry: Entry, tick: datetime, run: Run) -> Outcome:
    started = time.perf_counter()
    outcome = Outcome("ok")
    try:
        outcome.counts = await entry.run(res, run)
    except Exception as exc:
        # A failed run is recorded and logged; the scheduler itself keeps running.
        outcome.status, outcome.error = "failed", f"{type(exc).__name__}: {exc}"
        log.exception("schedule_failed", schedule=entry.name)
    outcome.seconds = time.perf_counter() - started
    async with res.connection() as conn:
        await conn.execute(
            "UPDATE schedule_runs SET finished_at = now(), status = %s, counts = %s, error = %s"
            " WHERE name = %s AND tick = %s",
            (outcome.status, Jsonb(outcome.counts), outcome.error, entry.name, tick),
        )
    metrics.SCHEDULE_RUNS.labels(entry.name, outcome.status).inc()
    metrics.SCHEDULE_DURATION.labels(entry.name).observe(outcome.seconds)
    if outcome.status == "ok":
        metrics.SCHEDULE_LAST_SUCCESS.labels(entry.name).set(time.time())
    log.info(
        "schedule_run",
        schedule=entry.name,
        tick=tick.isoformat(),
        status=outcome.status,
        duration_ms=round(outcome.seconds * 1000, 2),
        **outcome.counts,
    )
    return outcome


async def run_entry(res: Resources, entry: Entry, tick: datetime) -> None:
    await execute(res, entry, tick, Run())


async def reconcile_runs(res: Resources) -> int:
    """Close every `running` row whose owner is gone (its lock is free) as failed; how many."""
    async with res.connection() as conn:
        cur = await conn.execute(
            "SELECT name, tick FROM schedule_runs WHERE status = 'running' ORDER BY tick"
        )
        running = await cur.fetchall()
    if not running:
        return 0
    closed = 0
    conn = await connect(res.config.postgres, "schedule-reconcile")
    try:
        for name, tick in running:
            cur = await conn.execute(f"SELECT pg_try_advisory_lock({_LOCK_KEY})", (name, tick))
            row = await cur.fetchone()
            if row is None or not row[0]:
                continue  # its owner holds the lock: the run is still going
            cur = await conn.execute(
                "UPDATE schedule_runs SET status = 'failed', finished_at = now(), error = %s"
                " WHERE name = %s AND tick = %s AND status = 'running'",
                (OWNER_GONE, name, tick),
            )
            await conn.execute(f"SELECT pg_advisory_unlock({_LOCK_KEY})", (name, tick))
            if cur.rowcount == 1:
                closed += 1
                metrics.SCHEDULE_RUNS.labels(name, "failed").inc()
                log.warning("schedule_run_owner_gone", schedule=name, tick=tick.isoformat())
    finally:
        await conn.close()
    return closed


async def load_last_success(res: Resources, names: Sequence[str]) -> None:
    """Set each schedule's last-success gauge from `schedule_runs` (every container's runs),
    so a restarted scheduler reports the truth, not 0."""
    async with res.connection() as conn:
        cur = await conn.execute(
            "SELECT name, max(finished_at) FROM schedule_runs"
            " WHERE status = 'ok' AND name = ANY(%s) GROUP BY name",
            (list(names),),
        )
        for name, finished in await cur.fetchall():
            metrics.SCHEDULE_LAST_SUCCESS.labels(name).set(finished.timestamp())


async def housekeeping(res: Resources, names: Sequence[str]) -> None:
    """Reconcile runs and refresh the gauges; PostgreSQL away only postpones it."""
    try:
        await reconcile_runs(res)
        await load_last_success(res, names)
    except (PgError, OSError) as exc:
        log.error("schedule_reconcile_failed", error=str(exc))


async def run_tick(res: Resources, entry: Entry, tick: datetime) -> None:
    """One tick; PostgreSQL being unreachable loses this tick, not the scheduler."""
    try:
        await run_entry(res, entry, tick)
    except (PgError, OSError) as exc:
        log.error(
            "schedule_tick_failed", schedule=entry.name, tick=tick.isoformat(), error=str(exc)
        )


async def run_scheduler(
    res: Resources, stop: asyncio.Event, schedules: Sequence[Entry] = SCHEDULES
) -> None:
    enabled = [e for e in schedules if e.settings(res.config).enabled]
    names = [e.name for e in schedules]
    await housekeeping(res, names)
    now = datetime.now(UTC)
    due = {e.name: next_tick(e.settings(res.config).cron, now) for e in enabled}
    log.info("scheduler_ready", schedules={name: tick.isoformat() for name, tick in due.items()})
    kept = time.monotonic()
    while enabled and not stop.is_set():
        if time.monotonic() - kept >= RECONCILE_EVERY:
            # Between runs, however close together the ticks are.
            await housekeeping(res, names)
            kept = time.monotonic()
        entry = min(enabled, key=lambda e: due[e.name])
        wait = (due[entry.name] - datetime.now(UTC)).total_seconds()
        if wait > 0:
            try:
                await asyncio.wait_for(stop.wait(), timeout=min(wait, RECONCILE_EVERY))
                break
            except TimeoutError:
                pass
            if wait > RECONCILE_EVERY:
                continue  # not due yet: housekeeping, then wait again
        tick = due[entry.name]
        # From now, not from the tick: a run longer than the period (or a suspended host)
        # skips the ticks it missed instead of replaying them back to back.
        due[entry.name] = next_tick(entry.settings(res.config).cron, max(tick, datetime.now(UTC)))
        await run_tick(res, entry, tick)
    await stop.wait()
