"""The scheduler: cron schedules (UTC), each tick run once across all containers, and never
two runs of one schedule at once.

Exactly once: a tick is claimed by inserting `(name, tick)` into `schedule_runs`; the primary
key makes one claimer win, the others skip the tick. Missed ticks (the scheduler was down) are
not replayed: the next tick runs.

One at a time: the claimer also takes a session advisory lock on the schedule's name (the
two-key form, a key space apart from the run's lock) and holds it for the whole run. A tick
whose schedule is still running an earlier tick (a run longer than its period, or an
operator's `appliance retention run`) is skipped: no row, a `schedule_busy` log line and
`appliance_schedule_runs_total{status="skipped"}`. Order: the tick's lock, then the schedule's,
then the row; so a claimer that finds the schedule busy while another container runs this very
tick sees that tick taken (its lock or its row), not skipped.

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
BUSY = "already running"  # the error of a skipped tick's outcome (no row is written)
# First key of a schedule's own lock (the second is hashtext of its name); compaction's days
# use another namespace, and the one-key form of the run's lock is a key space of its own.
SCHEDULE_LOCK_NAMESPACE = 0x5C4ED
# The run's advisory lock key, computed by PostgreSQL for owners and reconcilers alike (one
# text form of the tick, whatever the session's time zone).
_LOCK_KEY = (
    "hashtextextended(%s || '@' || floor(extract(epoch FROM %s::timestamptz) * 1000000)::text, 0)"
)


@dataclass
class Outcome:
    status: str  # ok | failed | skipped (another run of the schedule was going)
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


def next_tick(cron: str, after: datetime) -> datetime:
    tick: datetime = croniter(cron, after).get_next(datetime)
    return tick


@dataclass
class Claim:
    """A claim's result: the owner's connection (holding the run's and the schedule's locks)
    when this caller won the tick; `busy` when the tick was free but the schedule is still
    running an earlier one (the tick is skipped)."""

    owner: Conn | None = None
    busy: bool = False


async def try_claim(
    res: Resources, name: str, tick: datetime, source: Source = "scheduler"
) -> Claim:
    """Claim `tick` of schedule `name` (see the module docstring for the locks' order). The
    caller closes the owner's connection once the run's row is closed."""
    conn = await connect(res.config.postgres, "schedule")
    try:
        cur = await conn.execute(f"SELECT pg_try_advisory_lock({_LOCK_KEY})", (name, tick))
        row = await cur.fetchone()
        if row is None or not row[0]:
            await conn.close()
            return Claim()  # another claimer is on this tick
        cur = await conn.execute(
            "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (SCHEDULE_LOCK_NAMESPACE, name)
        )
        row = await cur.fetchone()
        if row is None or not row[0]:
            cur = await conn.execute(
                "SELECT 1 FROM schedule_runs WHERE name = %s AND tick = %s", (name, tick)
            )
            taken = await cur.fetchone() is not None  # ran already; the busy run is another
            await conn.close()
            return Claim(busy=not taken)
        cur = await conn.execute(
            "INSERT INTO schedule_runs (name, tick, instance, source) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (name, tick) DO NOTHING",
            (name, tick, res.config.appliance.instance, source),
        )
        if cur.rowcount == 1:
            return Claim(owner=conn)
    except BaseException:
        await conn.close()
        raise
    await conn.close()
    return Claim()


async def claim(
    res: Resources, name: str, tick: datetime, source: Source = "scheduler"
) -> Conn | None:
    """The owner's connection when this caller won the tick, else None (taken or busy)."""
    return (await try_claim(res, name, tick, source)).owner


async def execute(
    res: Resources, entry: Entry, tick: datetime, run: Run, source: Source = "scheduler"
) -> Outcome | None:
    """Claim `tick` and run `entry`, recording the run; None when another claimer has the
    tick; a `skipped` outcome (nothing recorded) when another run of `entry` is going."""
    claimed = await try_claim(res, entry.name, tick, source)
    if claimed.busy:
        metrics.SCHEDULE_RUNS.labels(entry.name, "skipped").inc()
        log.warning("schedule_busy", schedule=entry.name, tick=tick.isoformat(), source=source)
        return Outcome("skipped", error=BUSY)
    if claimed.owner is None:
        log.debug("schedule_tick_taken", schedule=entry.name, tick=tick.isoformat())
        return None
    try:
        return await _run_owned(res, entry, tick, run)
    finally:
        # Closing the session releases the run's and the schedule's locks (after its row is
        # closed).
        await claimed.owner.close()


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
