"""The API activity log against the run's real PostgreSQL: batching, partitions, faults."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import structlog
from prometheus_client import REGISTRY
from psycopg_pool import AsyncConnectionPool

from appliance.activity import ActivityLog, ActivityRecord
from appliance.config import Config
from appliance.config.model import ActivitySection
from appliance.db.pool import open_pool

WAIT = 15.0  # generous upper bound for conditions; no test asserts on timing


def outcome(name: str) -> float:
    value = REGISTRY.get_sample_value("appliance_activity_records_total", {"outcome": name})
    return value or 0.0


def mid_month(year: int | None = None, month: int | None = None) -> datetime:
    """The 15th at noon UTC: inside the month's partition whatever the server's TimeZone."""
    now = datetime.now(UTC)
    return datetime(year or now.year, month or now.month, 15, 12, tzinfo=UTC)


@pytest.fixture
async def pool(config: Config, migrated: str) -> AsyncIterator[AsyncConnectionPool]:
    async with open_pool(config.postgres, "test-activity") as pool:
        yield pool


@pytest.fixture
async def principal(pool: AsyncConnectionPool) -> AsyncIterator[str]:
    """A principal of this test's own; its rows are deleted afterwards."""
    name = f"key:activity-{uuid.uuid4().hex[:8]}"
    yield name
    async with pool.connection() as conn:
        await conn.execute("DELETE FROM api_activity WHERE principal = %s", (name,))


@pytest.fixture
async def make_log(
    pool: AsyncConnectionPool,
) -> AsyncIterator[Callable[..., ActivityLog]]:
    """Factory of activity logs (flush_interval 0.05 unless given), closed after the test."""
    logs: list[ActivityLog] = []

    def make(**section: Any) -> ActivityLog:
        activity = ActivityLog(ActivitySection(**{"flush_interval": 0.05, **section}), pool)
        logs.append(activity)
        return activity

    yield make
    for activity in logs:
        await activity.aclose()


def rec(principal: str, n: int = 0, *, at: datetime | None = None, **fields: Any) -> ActivityRecord:
    values: dict[str, Any] = {
        "at": at or mid_month(),
        "principal": principal,
        "via": None,
        "method": "POST",
        "route": "/v1/conversations/{conversation}/messages",
        "status": 201,
        "duration_ms": 1.5,
        "ip": "203.0.113.7",
        "request_id": f"req-{n}",
    }
    return ActivityRecord(**{**values, **fields})


async def rows(pool: AsyncConnectionPool, principal: str, columns: str = "*") -> list[Any]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            f"SELECT {columns} FROM api_activity WHERE principal = %s ORDER BY request_id",
            (principal,),
        )
        return await cur.fetchall()


async def wait_rows(pool: AsyncConnectionPool, principal: str, count: int) -> None:
    async with asyncio.timeout(WAIT):
        while len(await rows(pool, principal, "1")) < count:
            await asyncio.sleep(0.05)


async def test_records_land_in_their_month_partition(
    pool: AsyncConnectionPool, principal: str, make_log: Callable[..., ActivityLog]
) -> None:
    activity = make_log()
    await activity.start()
    now = mid_month()
    activity.record(rec(principal, 1, at=now, ip="2001:db8::1", status=404, duration_ms=12.25))
    await wait_rows(pool, principal, 1)

    got = await rows(
        pool, principal, "tableoid::regclass::text, at, method, route, status, duration_ms, "
        "host(ip), request_id"
    )  # fmt: skip
    assert got == [
        (
            f"api_activity_y{now:%Y}m{now:%m}",
            now,
            "POST",
            "/v1/conversations/{conversation}/messages",
            404,
            12.25,
            "2001:db8::1",
            "req-1",
        )
    ]

    # A batch whose first record falls in a month without a partition creates it first.
    activity.record(rec(principal, 2, at=mid_month(2047, 3)))
    await wait_rows(pool, principal, 2)
    partitions = await rows(pool, principal, "tableoid::regclass::text")
    assert partitions[1] == ("api_activity_y2047m03",)


async def test_many_records_are_written_as_one_batch(
    pool: AsyncConnectionPool, principal: str, make_log: Callable[..., ActivityLog]
) -> None:
    activity = make_log()
    await activity.start()
    written = outcome("written")

    # Recorded without yielding to the loop, so the task finds all of them in one tick.
    for n in range(5000):
        activity.record(rec(principal, n))
    await wait_rows(pool, principal, 5000)

    # One COPY in one transaction: every row carries the same inserting transaction id.
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*), count(DISTINCT xmin::text) FROM api_activity WHERE principal = %s",
            (principal,),
        )
        assert await cur.fetchall() == [(5000, 1)]
    assert outcome("written") - written == 5000
    assert activity.pending == 0


async def test_a_full_buffer_drops_and_counts_new_records(
    pool: AsyncConnectionPool, principal: str, make_log: Callable[..., ActivityLog]
) -> None:
    activity = make_log(queue_max=100)
    dropped = outcome("dropped")

    for n in range(150):  # not started: nothing is written meanwhile
        activity.record(rec(principal, n, request_id=f"req-{n:03}"))
    assert activity.pending == 100
    assert outcome("dropped") - dropped == 50

    await activity.start()
    await wait_rows(pool, principal, 100)
    ids = [row[0] for row in await rows(pool, principal, "request_id")]
    assert ids == [f"req-{n:03}" for n in range(100)]  # the oldest are kept, the newest dropped


async def test_aclose_writes_what_is_pending(
    pool: AsyncConnectionPool, principal: str, make_log: Callable[..., ActivityLog]
) -> None:
    activity = make_log(flush_interval=3600)
    await activity.start()
    for n in range(10):
        activity.record(rec(principal, n))

    await activity.aclose()

    assert len(await rows(pool, principal)) == 10
    assert activity.pending == 0


async def test_records_after_aclose_are_dropped_and_counted(
    pool: AsyncConnectionPool, principal: str, make_log: Callable[..., ActivityLog]
) -> None:
    activity = make_log()
    await activity.start()
    await activity.aclose()
    dropped = outcome("dropped")

    activity.record(rec(principal))

    assert activity.pending == 0
    assert outcome("dropped") - dropped == 1


async def test_an_invalid_ip_is_stored_as_null(
    pool: AsyncConnectionPool, principal: str, make_log: Callable[..., ActivityLog]
) -> None:
    activity = make_log(flush_interval=3600)
    await activity.start()
    ips = [None, "not-an-ip", "", "300.1.1.1", "10.0.0.0/8", "::1", "fe80::1%eth0", "192.0.2.1"]
    for n, ip in enumerate(ips):
        activity.record(rec(principal, n, ip=ip))
    await activity.aclose()

    stored = [row[0] for row in await rows(pool, principal, "host(ip)")]
    assert stored == [None, None, None, None, None, "::1", "fe80::1", "192.0.2.1"]


async def test_records_survive_a_failed_write_and_arrive_later(
    pool: AsyncConnectionPool, principal: str, make_log: Callable[..., ActivityLog]
) -> None:
    activity = make_log()
    await activity.start()
    written = outcome("written")
    async with pool.connection() as conn:
        await conn.execute("ALTER TABLE api_activity RENAME TO api_activity_away")
        try:
            with structlog.testing.capture_logs() as logs:
                for n in range(20):
                    activity.record(rec(principal, n))
                async with asyncio.timeout(WAIT):
                    while not any(e["event"] == "activity_write_failed" for e in logs):
                        await asyncio.sleep(0.02)
            failure = next(e for e in logs if e["event"] == "activity_write_failed")
            assert failure["log_level"] == "warning"
            assert "api_activity" in failure["error"]
        finally:
            await conn.execute("ALTER TABLE api_activity_away RENAME TO api_activity")

    await wait_rows(pool, principal, 20)
    assert outcome("written") - written == 20
    assert activity.pending == 0


async def test_a_failed_batch_goes_back_before_newer_records_oldest_dropped_beyond_max(
    pool: AsyncConnectionPool, principal: str, make_log: Callable[..., ActivityLog]
) -> None:
    activity = make_log(queue_max=100)
    await activity.start()
    dropped = outcome("dropped")
    async with pool.connection() as conn:
        with structlog.testing.capture_logs() as logs:
            async with conn.transaction():
                # The uncommitted rename holds the table's lock: the task's COPY waits on it.
                await conn.execute("ALTER TABLE api_activity RENAME TO api_activity_away")
                for n in range(50):
                    activity.record(rec(principal, n, request_id=f"req-{n:03}"))
                async with asyncio.timeout(WAIT):
                    while activity.pending:  # the task has taken the batch
                        await asyncio.sleep(0.01)
                for n in range(50, 130):
                    activity.record(rec(principal, n, request_id=f"req-{n:03}"))
            # Committed: the waiting COPY finds no api_activity any more and fails.
            try:
                async with asyncio.timeout(WAIT):
                    while not any(e["event"] == "activity_write_failed" for e in logs):
                        await asyncio.sleep(0.01)
                assert outcome("dropped") - dropped == 30  # 50 back + 80 newer, max 100
            finally:
                await conn.execute("ALTER TABLE api_activity_away RENAME TO api_activity")

    await wait_rows(pool, principal, 100)
    ids = [row[0] for row in await rows(pool, principal, "request_id")]
    assert ids == [f"req-{n:03}" for n in range(30, 130)]


async def test_a_batch_postgresql_rejects_is_counted_failed_and_not_retried(
    pool: AsyncConnectionPool, principal: str, make_log: Callable[..., ActivityLog]
) -> None:
    activity = make_log()
    await activity.start()
    failed, written = outcome("failed"), outcome("written")

    activity.record(rec(principal, 1, status=70_000))  # out of smallint range
    async with asyncio.timeout(WAIT):
        while outcome("failed") == failed:
            await asyncio.sleep(0.02)
    assert activity.pending == 0  # dropped, not kept to block every later batch

    activity.record(rec(principal, 2))
    await wait_rows(pool, principal, 1)
    assert await rows(pool, principal, "request_id") == [("req-2",)]
    assert outcome("failed") - failed == 1
    assert outcome("written") - written == 1


async def test_a_month_whose_rows_sit_in_default_is_logged_and_written_there(
    pool: AsyncConnectionPool, principal: str, make_log: Callable[..., ActivityLog]
) -> None:
    at = mid_month(2046, 5)
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO api_activity VALUES (%s, %s, 'GET', '/x', 200, 1, NULL, 'req-0')",
            (at, principal),
        )
    activity = make_log()
    await activity.start()

    with structlog.testing.capture_logs() as logs:
        activity.record(rec(principal, 1, at=at))
        await wait_rows(pool, principal, 2)

    assert await rows(pool, principal, "tableoid::regclass::text") == [
        ("api_activity_default",),
        ("api_activity_default",),
    ]
    assert [e["month"] for e in logs if e["event"] == "activity_partition_failed"] == ["2046-05-01"]


async def test_disabled_records_nothing(
    pool: AsyncConnectionPool, principal: str, make_log: Callable[..., ActivityLog]
) -> None:
    activity = make_log(enabled=False)
    await activity.start()
    dropped = outcome("dropped")

    for n in range(200):
        activity.record(rec(principal, n))
    assert activity.pending == 0
    await activity.aclose()

    assert await rows(pool, principal) == []
    assert outcome("dropped") == dropped


async def test_postgresql_down_at_start_and_close_loses_nothing_silently() -> None:
    async with AsyncConnectionPool(
        "postgresql://postgres@127.0.0.1:1/none", min_size=0, max_size=1, timeout=0.5, open=False
    ) as down:
        activity = ActivityLog(ActivitySection(flush_interval=0.05, queue_max=100), down)
        with structlog.testing.capture_logs() as logs:
            await activity.start()  # logs the partition failure, does not raise
            dropped = outcome("dropped")
            activity.record(rec("key:nobody"))
            await activity.aclose()  # cannot write: what is left is counted as dropped
    events = [e["event"] for e in logs]
    assert "activity_partition_failed" in events
    assert "activity_records_lost" in events
    assert activity.pending == 0
    assert outcome("dropped") - dropped == 1


async def test_partitions_are_utc_months_whatever_the_session_time_zone(migrated: str) -> None:
    conn = await psycopg.AsyncConnection.connect(migrated, autocommit=True)
    try:
        await conn.execute("SET TIME ZONE 'America/New_York'")
        cur = await conn.execute(
            "SELECT appliance_ensure_month_partition('api_activity', '2049-02-10')"
        )
        row = await cur.fetchone()
        assert row == ("api_activity_y2049m02",)
        await conn.execute("SET TIME ZONE 'UTC'")
        cur = await conn.execute(
            "SELECT pg_get_expr(relpartbound, oid) FROM pg_class"
            " WHERE relname = 'api_activity_y2049m02'"
        )
        bound = await cur.fetchone()
    finally:
        await conn.close()
    assert bound is not None
    assert "'2049-02-01 00:00:00+00'" in bound[0] and "'2049-03-01 00:00:00+00'" in bound[0]
