"""Partition maintenance against real PostgreSQL, with `today` given (never the clock patched):
months created ahead across a month boundary, rows that sat in a DEFAULT partition moved into
the partition made for them, months past retention dropped, a dry run that changes nothing, and
a partition another session creates or drops at the same moment (no error)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime
from typing import Any

import psycopg
import pytest
from psycopg import sql

from appliance.config import Config
from appliance.db import partitions
from appliance.resources import open_resources
from appliance.schedules import SCHEDULES, Run
from tests.support import migrated_db

# api_activity alone: other monthly tables come with other features' migrations.
ACTIVITY = partitions.MONTHLY[:1]


@pytest.fixture
async def conn(fresh_database: Callable[[], str]) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    dsn = fresh_database()
    await migrated_db(dsn)
    connection = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    try:
        yield connection
    finally:
        await connection.close()


async def children(conn: psycopg.AsyncConnection[Any], parent: str) -> dict[str, int]:
    """Each partition of `parent` with its row count."""
    out = {}
    for name, _ in await partitions._children(conn, parent):
        cur = await conn.execute(f'SELECT count(*) FROM "{name}"')
        row = await cur.fetchone()
        out[name] = int(row[0]) if row else 0
    return out


async def activity(conn: psycopg.AsyncConnection[Any], *at: datetime) -> None:
    await conn.execute(
        "INSERT INTO api_activity (at, principal, method, route, status, duration_ms, request_id)"
        " SELECT t, 'key:test', 'GET', '/v1/x', 200, 1, 'r' FROM unnest(%s::timestamptz[]) t",
        (list(at),),
    )


async def flush_row(conn: psycopg.AsyncConnection[Any], day: date) -> None:
    await conn.execute(
        "INSERT INTO segment_blocks (tier, period, conversation, first_seq, last_seq, object_key,"
        " byte_offset, byte_length, records, min_ts, max_ts)"
        " VALUES ('flush', %s, 'c', 1, 1, 'k', 0, 1, 1, now(), now())",
        (day,),
    )


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


async def test_partitions_across_a_month_boundary(
    conn: psycopg.AsyncConnection[Any], config: Config
) -> None:
    # Rows whose month has no partition yet land in the default one.
    await activity(conn, utc(2031, 2, 15), utc(2031, 3, 10), utc(2031, 3, 11))
    await activity(conn, utc(2030, 10, 5), utc(2030, 11, 20))  # 1 month past retention at most
    await flush_row(conn, date(2031, 2, 1))
    before = await children(conn, "api_activity")
    assert before["api_activity_default"] == 5
    migrated = {n for n in before if n != "api_activity_default"}  # this month and the next

    # The last day of January, months_ahead 2 (January and February); keep_days 90.
    done = await partitions.maintain(conn, config, date(2031, 1, 31), monthly=ACTIVITY)
    after = await children(conn, "api_activity")
    assert after["api_activity_y2031m01"] == 0
    assert after["api_activity_y2031m02"] == 1, "February's row was moved out of the default"
    assert "api_activity_y2031m03" not in after
    # Months that ended 90 days before 2031-01-31 (2030-11-02) went, and the default's rows of
    # months before November; the November row stays (its month is not wholly past).
    assert not migrated & set(after)
    assert after["api_activity_default"] == 3  # 2 of March, 1 of November
    flush = await children(conn, "segment_blocks_flush")
    assert flush["segment_blocks_flush_d20310131"] == 0
    assert flush["segment_blocks_flush_d20310201"] == 1
    assert flush["segment_blocks_flush_default"] == 0
    assert done == {
        "created": 4,
        "dropped": len(migrated),
        "rows_moved": 2,
        "default_rows_deleted": 1,
        "deferred": 0,
    }

    # A dry run a day later, across the boundary: it would make March (moving 2 rows) and the
    # flush days, and does nothing.
    would = await partitions.maintain(
        conn, config, date(2031, 2, 1), dry_run=True, monthly=ACTIVITY
    )
    assert (would["created"], would["rows_moved"], would["dropped"]) == (2, 2, 0)
    assert await children(conn, "api_activity") == after

    done = await partitions.maintain(conn, config, date(2031, 2, 1), monthly=ACTIVITY)
    assert (done["created"], done["rows_moved"], done["dropped"]) == (2, 2, 0)
    after = await children(conn, "api_activity")
    assert after["api_activity_y2031m03"] == 2
    assert after["api_activity_default"] == 1
    # Nothing left to do the same day.
    again = await partitions.maintain(conn, config, date(2031, 2, 1), monthly=ACTIVITY)
    assert (again["created"], again["dropped"], again["rows_moved"]) == (0, 0, 0)


async def test_the_schedule_makes_this_month_and_the_next(
    settings: dict[str, Any], fresh_database: Callable[[], str]
) -> None:
    dsn = fresh_database()
    await migrated_db(dsn)
    settings["postgres"]["dsn"] = dsn
    settings["schedules"] = {"maintain_partitions": {"months_ahead": 3}}
    entry = next(e for e in SCHEDULES if e.name == "maintain_partitions")
    async with open_resources(Config.model_validate(settings), "test") as res:
        async with res.connection() as conn:
            cur = await conn.execute("SELECT (now() AT TIME ZONE 'UTC')::date")
            row = await cur.fetchone()
            assert row is not None
            third = partitions.add_months(partitions.month_start(row[0]), 2)
        name = f"api_activity_y{third:%Y}m{third:%m}"  # the migration made two months
        would = await entry.run(res, Run(dry_run=True))
        assert would["created"] >= 1  # (other monthly tables may have their own third month)
        async with res.connection() as conn:
            assert name not in await children(conn, "api_activity")
        done = await entry.run(res, Run())
        assert done["created"] == would["created"]
        async with res.connection() as conn:
            assert name in await children(conn, "api_activity")


async def blocked(watcher: psycopg.AsyncConnection[Any], pid: int, what: str) -> None:
    """Wait until session `pid` waits for a lock (it reached the statement under test)."""
    deadline = time.monotonic() + 30
    while True:
        cur = await watcher.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
        )
        row = await cur.fetchone()
        if row is not None and row[0] == "Lock":
            return
        if time.monotonic() > deadline:
            pytest.fail(f"maintenance never waited for {what}'s lock")
        await asyncio.sleep(0.05)


async def test_a_partition_made_or_dropped_meanwhile_by_another_session(
    conn: psycopg.AsyncConnection[Any], config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another session (the flusher making its day, an operator) creates a partition while
    maintenance creates it too, or drops one between maintenance listing it and dropping it:
    maintenance goes on, without an error or a deferral."""
    monkeypatch.setattr(partitions, "LOCK_TIMEOUT", "60s")  # it waits for the other session
    # A monthly table without a DEFAULT partition: nothing there serialises the two creators
    # before both reach CREATE TABLE.
    await conn.execute("CREATE TABLE race_log (at timestamptz NOT NULL) PARTITION BY RANGE (at)")
    race: tuple[tuple[str, Callable[[Config], int]], ...] = (("race_log", lambda c: 90),)
    other = await psycopg.AsyncConnection.connect(conn.info.dsn)
    watcher = await psycopg.AsyncConnection.connect(conn.info.dsn, autocommit=True)
    try:
        # March's partition, made by the other session and not yet committed.
        await other.execute("SELECT appliance_ensure_month_partition('race_log', '2031-03-01')")
        task = asyncio.create_task(
            partitions.maintain(conn, config, date(2031, 3, 1), monthly=race)
        )
        await blocked(watcher, conn.info.backend_pid, "March's creation")
        await other.commit()
        done = await task
        # April and the two flush days are its own; March is the other session's.
        assert (done["created"], done["deferred"]) == (3, 0)
        assert set(await children(conn, "race_log")) == {"race_log_y2031m03", "race_log_y2031m04"}

        # Two months past retention; the other session drops the first right after maintenance
        # listed them.
        for month in ("2030-06-01", "2030-07-01"):
            await conn.execute("SELECT appliance_ensure_month_partition('race_log', %s)", (month,))
        listed = partitions._month_partitions

        async def listed_then_dropped(
            c: psycopg.AsyncConnection[Any], parent: str
        ) -> list[tuple[str, datetime]]:
            months = await listed(c, parent)
            await other.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(months[0][0])))
            await other.commit()
            return months

        monkeypatch.setattr(partitions, "_month_partitions", listed_then_dropped)
        done = await partitions.maintain(conn, config, date(2031, 3, 2), monthly=race)
        assert done["deferred"] == 0 and done["dropped"] == 2  # gone, as the run meant
        assert set(await children(conn, "race_log")) == {"race_log_y2031m03", "race_log_y2031m04"}
    finally:
        await other.close()
        await watcher.close()
