"""Partition maintenance: monthly tables get their months ahead and lose the months past their
retention; the flush tier's daily partitions are made ahead.

- Monthly tables (MONTHLY, each with its retention from the config; a table that does not exist
  yet is skipped): the current month and the `months_ahead - 1` after it are created
  (`appliance_ensure_month_partition`); a month whose whole range ended `keep_days` ago or more
  is dropped, and rows of such months that sit in the DEFAULT partition are deleted.
- `segment_blocks_flush`: today's and tomorrow's partitions.

PostgreSQL refuses to create a partition while the DEFAULT partition holds rows of its range (a
late maintenance run lets rows land there). Those rows are moved in the same transaction: deleted
from the default into a temporary table, the partition created, then inserted through the parent
(so into the new partition). Readers of the table wait for the commit, writers too.

Idempotent under a race: a partition another session creates meanwhile (the flusher makes its
own days' partitions) makes ours roll back (DuplicateTable), counted as nothing; a month another
session drops meanwhile is dropped with IF EXISTS. Two runs of the schedule never overlap (the
scheduler's per-schedule lock), so this is the exception, not the rule.

`today` is a parameter (PostgreSQL's UTC date in production), so a test can cross a month.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import structlog
from psycopg import sql

from appliance import metrics
from appliance.config import Config

log = structlog.get_logger()
Conn = psycopg.AsyncConnection[Any]
Counts = dict[str, int]

# Monthly-partitioned tables and the days each keeps.
MONTHLY: tuple[tuple[str, Callable[[Config], int]], ...] = (
    ("api_activity", lambda c: c.activity.keep_days),
    ("webhook_deliveries", lambda c: c.schedules.prune_webhook_deliveries.keep_days),
)
FLUSH_PARENT = "segment_blocks_flush"
FLUSH_DAYS_AHEAD = 1  # today and tomorrow, as the flusher itself makes them
# A DROP or CREATE waits this long for its locks at most; a busy table is done next run.
LOCK_TIMEOUT = "2s"
_MONTH_NAME = re.compile(r"_y(\d{4})m(\d{2})$")


def counts() -> Counts:
    return dict.fromkeys(
        ("created", "dropped", "rows_moved", "default_rows_deleted", "deferred"), 0
    )


def month_start(day: date) -> datetime:
    return datetime(day.year, day.month, 1, tzinfo=UTC)


def add_months(start: datetime, months: int) -> datetime:
    index = start.year * 12 + start.month - 1 + months
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


async def _exists(conn: Conn, name: str) -> bool:
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))
    row = await cur.fetchone()
    return bool(row and row[0])


async def _children(conn: Conn, parent: str) -> list[tuple[str, bool]]:
    """(name, is the DEFAULT partition) of each partition of `parent`."""
    cur = await conn.execute(
        """SELECT c.relname::text, pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT'
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = %s::regclass ORDER BY 1""",
        (parent,),
    )
    return [(str(n), bool(d)) for n, d in await cur.fetchall()]


async def _key_column(conn: Conn, parent: str) -> str:
    """The column `parent` is partitioned by (a plain column: ours all are)."""
    cur = await conn.execute(
        """SELECT a.attname::text FROM pg_partitioned_table p
             JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]
            WHERE p.partrelid = %s::regclass""",
        (parent,),
    )
    row = await cur.fetchone()
    assert row is not None, f"{parent} is not partitioned by a column"
    return str(row[0])


class Table:
    """One partitioned table: its default partition and key column, looked up once."""

    def __init__(self, parent: str, default: str | None, column: str) -> None:
        self.parent = parent
        self.default = default
        self.column = column

    @classmethod
    async def load(cls, conn: Conn, parent: str) -> Table:
        defaults = [n for n, is_default in await _children(conn, parent) if is_default]
        return cls(parent, defaults[0] if defaults else None, await _key_column(conn, parent))

    def _in_default(self, verb: str) -> sql.Composed:
        assert self.default is not None
        return sql.SQL("{verb} FROM {default} WHERE {col} >= %s AND {col} < %s").format(
            verb=sql.SQL(verb),
            default=sql.Identifier(self.default),
            col=sql.Identifier(self.column),
        )

    async def waiting(self, conn: Conn, lo: object, hi: object) -> int:
        """Rows of [lo, hi) in the default partition."""
        if self.default is None:
            return 0
        cur = await conn.execute(self._in_default("SELECT count(*)"), (lo, hi))
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def create(
        self, conn: Conn, name: str, lo: object, hi: object, make: sql.Composed
    ) -> int | None:
        """Create partition `name` of [lo, hi) with `make`, moving the default's rows of that
        range into it (one transaction); the rows moved, None when another session created
        it meanwhile (the transaction rolls back: the rows stay in the default)."""
        try:
            return await self._create(conn, name, lo, hi, make)
        except psycopg.errors.DuplicateTable:
            log.info("partition_exists", partition=name, reason="created concurrently")
            return None

    async def _create(
        self, conn: Conn, name: str, lo: object, hi: object, make: sql.Composed
    ) -> int:
        moved = 0
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            if self.default is not None:
                await conn.execute(
                    sql.SQL("CREATE TEMP TABLE partition_move (LIKE {}) ON COMMIT DROP").format(
                        sql.Identifier(self.parent)
                    )
                )
                cur = await conn.execute(
                    sql.SQL(
                        "WITH moved AS ({} RETURNING *)"
                        " INSERT INTO partition_move SELECT * FROM moved"
                    ).format(self._in_default("DELETE")),
                    (lo, hi),
                )
                moved = cur.rowcount
            await conn.execute(make)
            if moved:
                await conn.execute(
                    sql.SQL("INSERT INTO {} SELECT * FROM partition_move").format(
                        sql.Identifier(self.parent)
                    )
                )
        log.info("partition_created", partition=name, rows_moved=moved)
        return moved


async def _month_partitions(conn: Conn, parent: str) -> list[tuple[str, datetime]]:
    """(name, first day) of each monthly partition of `parent`."""
    out = []
    for name, is_default in await _children(conn, parent):
        match = _MONTH_NAME.search(name)
        if not is_default and match and name == f"{parent}{match[0]}":
            out.append((name, datetime(int(match[1]), int(match[2]), 1, tzinfo=UTC)))
    return out


async def maintain(
    conn: Conn,
    config: Config,
    today: date,
    dry_run: bool = False,
    monthly: tuple[tuple[str, Callable[[Config], int]], ...] = MONTHLY,
) -> Counts:
    """Maintain every partitioned table as of `today` (see the module docstring); counts:
    created, dropped, rows_moved, default_rows_deleted, deferred (lock timeouts: next run).
    A dry run counts what would be done and changes nothing."""
    totals = counts()
    ahead = config.schedules.maintain_partitions.months_ahead
    for parent, keep_days in monthly:
        if not await _exists(conn, parent):
            continue  # its feature's migration has not made it (yet)
        table = await Table.load(conn, parent)
        for n in range(ahead):
            lo = add_months(month_start(today), n)
            hi = add_months(lo, 1)
            name = f"{parent}_y{lo:%Y}m{lo:%m}"
            make = sql.SQL("SELECT appliance_ensure_month_partition({}, {})").format(
                sql.Literal(parent), sql.Literal(lo.date())
            )
            await _create(conn, table, name, lo, hi, make, dry_run, totals)
        cutoff = datetime(today.year, today.month, today.day, tzinfo=UTC) - timedelta(
            days=keep_days(config)
        )
        await _drop_past(conn, table, cutoff, dry_run, totals)
    flush = await Table.load(conn, FLUSH_PARENT)
    for n in range(FLUSH_DAYS_AHEAD + 1):
        day = today + timedelta(days=n)
        name = f"{FLUSH_PARENT}_d{day:%Y%m%d}"
        make = sql.SQL("SELECT appliance_ensure_flush_partition({})").format(sql.Literal(day))
        await _create(conn, flush, name, day, day + timedelta(days=1), make, dry_run, totals)
    return totals


async def _create(
    conn: Conn,
    table: Table,
    name: str,
    lo: object,
    hi: object,
    make: sql.Composed,
    dry_run: bool,
    totals: Counts,
) -> None:
    if await _exists(conn, name):
        return
    if dry_run:
        totals["created"] += 1
        totals["rows_moved"] += await table.waiting(conn, lo, hi)
        return
    try:
        moved = await table.create(conn, name, lo, hi, make)
    except psycopg.errors.LockNotAvailable:
        log.warning("partition_deferred", partition=name, reason="lock timeout")
        totals["deferred"] += 1
        return
    if moved is None:
        return  # another session made it
    totals["rows_moved"] += moved
    totals["created"] += 1


async def _drop_past(
    conn: Conn, table: Table, cutoff: datetime, dry_run: bool, totals: Counts
) -> None:
    """Drop the months that ended at or before `cutoff`; delete the default's rows of them."""
    for name, first in await _month_partitions(conn, table.parent):
        if add_months(first, 1) > cutoff:
            continue
        totals["dropped"] += 1
        if dry_run:
            continue
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                # IF EXISTS: a session that dropped it meanwhile did this run's work.
                await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
        except psycopg.errors.LockNotAvailable:
            totals["dropped"] -= 1
            totals["deferred"] += 1
            log.warning("partition_deferred", partition=name, reason="lock timeout")
            continue
        metrics.RETENTION_DELETED.labels("partitions").inc()
        log.info("partition_dropped", partition=name)
    if table.default is None:
        return
    before = month_start(cutoff.date())  # the months before cutoff's own ended before it
    query = sql.SQL("{verb} FROM {default} WHERE {col} < %s")
    verb = "SELECT count(*)" if dry_run else "DELETE"
    cur = await conn.execute(
        query.format(
            verb=sql.SQL(verb),
            default=sql.Identifier(table.default),
            col=sql.Identifier(table.column),
        ),
        (before,),
    )
    if dry_run:
        row = await cur.fetchone()
        totals["default_rows_deleted"] += int(row[0]) if row else 0
    else:
        totals["default_rows_deleted"] += cur.rowcount
        metrics.RETENTION_DELETED.labels(f"{table.parent}_rows").inc(cur.rowcount)
