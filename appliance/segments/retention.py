"""Retention of the history tier: whole UTC days past `[schedules.expire_segments] days` go.

A day D is past retention once it ended `days` days ago: D < (now - days), UTC, PostgreSQL's
clock. A day's index rows all have `period` D (flush rows: the day they were indexed; history
rows: the day compacted), and its objects hold nothing else: `segments/history/<D>.seg` and the
flush objects indexed on D. For each such day, oldest first:

1. Take compaction's advisory lock of the day (compact.LOCK_NAMESPACE, the day's ordinal), so
   a compaction and a retention never work on one day at once; a day another session holds is
   counted `busy` and left for the next run.
2. One transaction deletes the day's rows (history and flush tiers) and its
   `segment_compactions` row, and lists the objects let go of in `segment_garbage` (an object
   a row of another day still names stays).
3. After the commit, the objects are deleted with S3 batch deletes (`compact.collect_garbage`).
   A crash or an S3 failure in between leaves them listed: the next run of this schedule (which
   starts with the leftover garbage) or of compaction deletes them.

Readers never see a dangling row: a page that read a row before the commit and finds its object
gone reads the index again (messages/history.py). A flush day's emptied partition is dropped by
compaction, which finds days by their partitions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

import psycopg
import structlog
from psycopg import sql
from redis.exceptions import ResponseError

from appliance import metrics
from appliance.db.pool import connect
from appliance.resources import Resources
from appliance.segments import compact, flush
from appliance.storage import StorageError

if TYPE_CHECKING:
    # Only a type here: importing appliance.schedules would import this module back.
    from appliance.schedules.entry import Run

Counts = dict[str, int]

log = structlog.get_logger()
Conn = psycopg.AsyncConnection[Any]


@dataclass
class DayPlan:
    """What expiring one day deletes."""

    day: date
    rows: int
    objects: list[str]
    bytes: int


def counts() -> Counts:
    return dict.fromkeys(
        ("days", "index_rows", "objects", "bytes", "objects_deleted", "busy", "failed"), 0
    )


async def days_past(conn: Conn, days: int) -> list[date]:
    """Days with rows, a compaction record or flush partition, wholly past retention."""
    cur = await conn.execute(
        r"""WITH cutoff AS (
                SELECT ((now() AT TIME ZONE 'UTC') - make_interval(days => %s))::date AS day)
            SELECT period FROM segment_compactions WHERE period < (SELECT day FROM cutoff)
            UNION SELECT DISTINCT period FROM segment_blocks_history
                   WHERE period < (SELECT day FROM cutoff)
            UNION SELECT DISTINCT period FROM segment_blocks_flush_default
                   WHERE period < (SELECT day FROM cutoff)
            UNION SELECT day FROM (
                    SELECT to_date(substring(c.relname FROM '_d(\d{8})$'), 'YYYYMMDD') AS day
                      FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                     WHERE i.inhparent = 'segment_blocks_flush'::regclass
                       AND c.relname ~ '_d\d{8}$') parts
                   WHERE day < (SELECT day FROM cutoff)
            ORDER BY 1""",
        (days,),
    )
    return [r[0] for r in await cur.fetchall()]


async def _objects(conn: Conn, day: date) -> list[str]:
    cur = await conn.execute(
        """SELECT DISTINCT object_key FROM segment_blocks WHERE period = %(d)s
           UNION SELECT object_key FROM segment_compactions WHERE period = %(d)s
           ORDER BY 1""",
        {"d": day},
    )
    return [str(r[0]) for r in await cur.fetchall()]


async def plan(res: Resources, conn: Conn, day: date) -> DayPlan:
    """What expiring `day` deletes, changing nothing. Bytes: the compaction's record of the
    history object, the size of each flush object (a HEAD each; normally none are left)."""
    cur = await conn.execute(
        "SELECT count(*) FROM segment_blocks WHERE period = %s AND tier IN ('flush', 'history')",
        (day,),
    )
    row = await cur.fetchone()
    rows = int(row[0]) if row else 0
    objects = await _objects(conn, day)
    cur = await conn.execute(
        "SELECT object_key, bytes FROM segment_compactions WHERE period = %s", (day,)
    )
    recorded = {str(k): int(b) for k, b in await cur.fetchall()}
    size = 0
    for key in objects:
        known = recorded.get(key)
        size += known if known is not None else (await res.storage.size(key) or 0)
    return DayPlan(day, rows, objects, size)


async def _delete_rows(conn: Conn, day: date) -> tuple[int, list[str]]:
    """Step 2 (one transaction): the rows deleted and the objects listed as garbage."""
    async with conn.transaction():
        objects = await _objects(conn, day)
        deleted = 0
        for tier in ("history", "flush"):
            # By tier and day: each statement reaches one partition (and the flush default).
            cur = await conn.execute(
                "DELETE FROM segment_blocks WHERE tier = %s AND period = %s", (tier, day)
            )
            deleted += cur.rowcount
        await conn.execute("DELETE FROM segment_compactions WHERE period = %s", (day,))
        cur = await conn.execute(
            "SELECT DISTINCT object_key FROM segment_blocks WHERE object_key = ANY(%s)",
            (objects,),
        )
        named = {str(r[0]) for r in await cur.fetchall()}
        garbage = [k for k in objects if k not in named]
        await conn.execute(
            "INSERT INTO segment_garbage (object_key) SELECT unnest(%s::text[])"
            " ON CONFLICT (object_key) DO NOTHING",
            (garbage,),
        )
    return deleted, garbage


async def expire(res: Resources, run: Run, totals: Counts | None = None) -> Counts:
    """Expire every day past retention (see the module docstring); counts: days, index_rows,
    objects and bytes (gone, or that would go in a dry run), objects_deleted, busy, failed.
    Failures are logged and counted; the caller decides whether the run failed."""
    totals = totals if totals is not None else counts()
    keep = res.config.schedules.expire_segments.days
    conn = await connect(res.config.postgres, "retention")
    try:
        days = await days_past(conn, keep)
        if not run.dry_run:
            # What an earlier run (or compaction) let go of but could not delete from S3.
            left = await compact.collect_garbage(conn, res.storage)
            totals["objects_deleted"] += left
            metrics.RETENTION_DELETED.labels("segment_objects").inc(left)
        for done, day in enumerate(days):
            run.progress(done, len(days))
            if run.dry_run:
                _add(totals, await plan(res, conn, day))
                continue
            await _expire_day(res, conn, day, totals)
        run.progress(len(days), len(days))
    finally:
        # The session's advisory locks go with it, whatever happened.
        await conn.close()
    return totals


def _add(totals: Counts, day: DayPlan) -> None:
    totals["days"] += 1
    totals["index_rows"] += day.rows
    totals["objects"] += len(day.objects)
    totals["bytes"] += day.bytes


async def _expire_day(res: Resources, conn: Conn, day: date, totals: Counts) -> None:
    cur = await conn.execute(
        "SELECT pg_try_advisory_lock(%s, %s)", (compact.LOCK_NAMESPACE, day.toordinal())
    )
    row = await cur.fetchone()
    if row is None or not row[0]:
        totals["busy"] += 1  # a compaction (or another retention) works on this day
        return
    try:
        before = await plan(res, conn, day)
        rows, garbage = await _delete_rows(conn, day)
        await _drop_partition(conn, day)
        if not rows and not garbage:
            return  # only an empty partition was left of the day
        _add(totals, DayPlan(day, rows, garbage, before.bytes))
        metrics.RETENTION_DELETED.labels("segment_index_rows").inc(rows)
        try:
            deleted = await compact.collect_garbage(conn, res.storage, garbage)
        except StorageError as exc:
            # The rows are gone; the objects stay listed as garbage for the next run.
            log.error("retention_objects_left", day=day.isoformat(), error=exc.message)
            totals["failed"] += 1
            return
        totals["objects_deleted"] += deleted
        metrics.RETENTION_DELETED.labels("segment_objects").inc(deleted)
        log.info(
            "retention_day_expired",
            day=day.isoformat(),
            index_rows=rows,
            objects=deleted,
            bytes=before.bytes,
        )
    finally:
        await conn.execute(
            "SELECT pg_advisory_unlock(%s, %s)", (compact.LOCK_NAMESPACE, day.toordinal())
        )


async def _drop_partition(conn: Conn, day: date) -> None:
    """Drop the day's emptied flush partition, as compaction does with an empty day's (so
    neither lists the day again); a reader holding a lock on it defers that to the next run."""
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{compact.LOCK_TIMEOUT}'")
            await conn.execute(
                sql.SQL("DROP TABLE IF EXISTS {}").format(
                    sql.Identifier(f"segment_blocks_flush_d{day:%Y%m%d}")
                )
            )
    except psycopg.errors.LockNotAvailable:
        log.info("retention_partition_kept", day=day.isoformat())


async def oldest_pending(res: Resources, conversation: str) -> datetime | None:
    """When the oldest entry the flusher read from the conversation's shard stream but has not
    acknowledged was added (Redis's clock, from its id); None when none is pending. A flusher
    killed after indexing but before XACK replays these, below a high-water mark a purge may
    have deleted meanwhile."""
    try:
        summary = await res.redis.xpending(res.keys.ingest_of(conversation), flush.GROUP)
    except ResponseError as exc:
        if "NOGROUP" in str(exc):
            return None  # no flusher ever read the stream
        raise
    if not summary["pending"]:
        return None
    oldest = summary["min"]
    ms = int((oldest.decode() if isinstance(oldest, bytes) else str(oldest)).split("-")[0])
    return datetime.fromtimestamp(ms / 1000, UTC)


async def forget_conversation(conn: Conn, conversation: str) -> int:
    """Delete a purged conversation's index rows and high-water mark (in the caller's
    transaction); the rows deleted. Its blocks stay in the shared objects until their day
    expires: no row names them any more."""
    cur = await conn.execute("DELETE FROM segment_blocks WHERE conversation = %s", (conversation,))
    await conn.execute("DELETE FROM segment_heads WHERE conversation = %s", (conversation,))
    return cur.rowcount
