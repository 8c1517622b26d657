"""Retention of history against real PostgreSQL, Redis and S3: real history built by the real
flusher and compaction (tests/tiers.py), aged by moving its days into the past; exactly what is
past retention goes (S3 objects and index rows counted before and after), a dry run changes
nothing, and conversations deleted past the grace are purged whole while others stay, once
nothing the flusher may still index is left of them (unflushed messages, entries a killed
flusher read before the deletion)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from datetime import date, datetime, timedelta
from typing import Any

import pytest
import structlog
from pydantic import ValidationError

from appliance.auth.principal import Principal
from appliance.config import Config
from appliance.conversations import retention as conversation_retention
from appliance.conversations import service
from appliance.messages.publish import Publisher
from appliance.realtime.presence import Presence
from appliance.resources import Resources
from appliance.schedules import SCHEDULES, Run, expire_segments
from appliance.segments import compact, flush, store
from appliance.segments.compact import compact_day
from appliance.storage import StorageError
from tests import tiers
from tests.support import migrated_db
from tests.test_history_tiers import isolate, opened

PUBLISHER = Principal("key:retention", frozenset({"publish"}))


@pytest.fixture
async def res(
    settings: dict[str, Any], fresh_database: Callable[[], str]
) -> AsyncIterator[Resources]:
    """A database, Redis key prefix and bucket of this test's own."""
    dsn = fresh_database()
    await migrated_db(dsn)
    isolate(settings, dsn)
    settings["s3"]["bucket"] = f"retention-{uuid.uuid4().hex[:12]}"
    async with opened(settings) as resources:
        yield resources


async def publish(res: Resources, conversation: str, count: int) -> None:
    publisher = Publisher(res.redis, res.keys, res.config.messages, res.connection)
    await publisher.publish(
        conversation, PUBLISHER, [tiers.text(i) for i in range(count)], None, b"", True
    )


async def today(res: Resources) -> date:
    async with res.connection() as conn:
        cur = await conn.execute("SELECT (now() AT TIME ZONE 'UTC')::date")
        row = await cur.fetchone()
    assert row is not None
    day: date = row[0]
    return day


async def flushed_on(res: Resources, day: date) -> None:
    """Flush what Redis holds (the real flusher) and move the new rows (today's) to `day`."""
    assert await tiers.flush(res) is not None
    async with res.connection() as conn:
        await conn.execute("SELECT appliance_ensure_flush_partition(%s)", (day,))
        await conn.execute(
            "UPDATE segment_blocks SET period = %s WHERE tier = 'flush' AND period = %s",
            (day, await today(res)),
        )


async def compacted_on(res: Resources, day: date) -> None:
    await flushed_on(res, day)
    assert (await compact_day(res, day))["days"] == 1


async def objects(res: Resources) -> dict[str, int]:
    return dict(await res.storage.list_keys("segments/"))


async def rows_by_day(res: Resources) -> dict[tuple[str, date], int]:
    async with res.connection() as conn:
        cur = await conn.execute(
            "SELECT tier, period, count(*) FROM segment_blocks GROUP BY 1, 2 ORDER BY 1, 2"
        )
        return {(tier, period): int(n) for tier, period, n in await cur.fetchall()}


async def scalar(res: Resources, query: str, *params: Any) -> Any:
    async with res.connection() as conn:
        cur = await conn.execute(query, params)
        row = await cur.fetchone()
    return None if row is None else row[0]


async def aged_history(res: Resources) -> dict[str, date]:
    """Two conversations' history on four days: compacted 40 and 10 days ago, flushed (not
    compacted) 35 days ago, and flushed today. Retention is 30 days."""
    now = await today(res)
    days = {
        "history_old": now - timedelta(days=40),
        "history_kept": now - timedelta(days=10),
        "flush_old": now - timedelta(days=35),
        "flush_today": now,
    }
    for name in ("history_old", "history_kept"):
        await publish(res, "team-a", 3)
        await publish(res, "team-b", 2)
        await compacted_on(res, days[name])
    await publish(res, "team-a", 2)
    await flushed_on(res, days["flush_old"])
    await publish(res, "team-b", 2)
    await flushed_on(res, days["flush_today"])
    return days


async def test_expire_segments_deletes_exactly_the_days_past_retention(res: Resources) -> None:
    days = await aged_history(res)
    entry = next(e for e in SCHEDULES if e.name == "expire_segments")
    assert entry.retention
    before_objects, before_rows = await objects(res), await rows_by_day(res)
    old_history = store.history_key(days["history_old"])
    assert old_history in before_objects and store.history_key(days["history_kept"]) in (
        before_objects
    )
    old_flush = [
        k
        for k in before_objects
        if k.startswith(store.FLUSH_PREFIX)
        and await scalar(res, "SELECT period FROM segment_blocks WHERE object_key = %s LIMIT 1", k)
        == days["flush_old"]
    ]
    assert len(old_flush) == 1
    doomed_rows = (
        before_rows[("history", days["history_old"])] + before_rows[("flush", days["flush_old"])]
    )
    doomed_bytes = before_objects[old_history] + before_objects[old_flush[0]]

    would = await entry.run(res, Run(dry_run=True))
    assert (would["days"], would["index_rows"], would["objects"], would["bytes"]) == (
        2,
        doomed_rows,
        2,
        doomed_bytes,
    )
    assert would["objects_deleted"] == 0
    assert await objects(res) == before_objects, "a dry run deletes nothing"
    assert await rows_by_day(res) == before_rows

    progress: list[tuple[int, int | None]] = []
    done = await entry.run(res, Run(progress=lambda d, t: progress.append((d, t))))
    assert (done["days"], done["index_rows"], done["objects_deleted"], done["bytes"]) == (
        2,
        doomed_rows,
        2,
        doomed_bytes,
    )
    assert progress[-1] == (2, 2)
    after_objects = await objects(res)
    assert set(after_objects) == set(before_objects) - {old_history, old_flush[0]}
    expected_rows = dict(before_rows)
    del expected_rows[("history", days["history_old"])], expected_rows[("flush", days["flush_old"])]
    assert await rows_by_day(res) == expected_rows
    assert await scalar(res, "SELECT count(*) FROM segment_garbage") == 0
    assert await scalar(
        res, "SELECT array_agg(period ORDER BY period) FROM segment_compactions"
    ) == [days["history_kept"]]
    # Nothing is left past retention: the next run finds nothing.
    again = await entry.run(res, Run())
    assert again["days"] == 0 and again["objects_deleted"] == 0


async def test_a_day_being_compacted_is_left_and_objects_s3_refused_go_next_run(
    res: Resources, monkeypatch: pytest.MonkeyPatch
) -> None:
    days = await aged_history(res)
    entry = next(e for e in SCHEDULES if e.name == "expire_segments")
    # A compaction holds the old flush day: retention leaves that day alone.
    holder = await res.pool.getconn()
    try:
        await holder.execute(
            "SELECT pg_advisory_lock(%s, %s)",
            (compact.LOCK_NAMESPACE, days["flush_old"].toordinal()),
        )

        async def refused(keys: list[str]) -> int:
            raise StorageError("delete_objects", "1 keys not deleted: AccessDenied", "AccessDenied")

        monkeypatch.setattr(res.storage, "delete_many", refused)
        with pytest.raises(expire_segments.RetentionFailed):
            await entry.run(res, Run())
        await holder.execute("SELECT pg_advisory_unlock_all()")
    finally:
        await res.pool.putconn(holder)
    old_history = store.history_key(days["history_old"])
    # The rows went, the object is listed as garbage and still there.
    assert await scalar(res, "SELECT array_agg(object_key) FROM segment_garbage") == [old_history]
    assert await res.storage.size(old_history) is not None
    assert (
        await scalar(
            res, "SELECT count(*) FROM segment_blocks WHERE period = %s", days["flush_old"]
        )
        > 0
    )
    monkeypatch.undo()
    done = await entry.run(res, Run())
    assert done["days"] == 1 and done["failed"] == 0  # the flush day, now free
    assert await res.storage.size(old_history) is None  # the garbage went too
    assert await scalar(res, "SELECT count(*) FROM segment_garbage") == 0


async def conversation(res: Resources, name: str, deleted_days_ago: float | None) -> None:
    async with res.connection() as conn:
        await service.create(
            conn,
            service.ConversationCreate(
                conversation=name, members=[service.MemberIn("user:ann", "member")]
            ),
            "key:admin",
        )
    await publish(res, name, 3)
    presence = Presence(res.redis, res.keys, 60.0, 3600.0)
    await presence.join(name, "user:ann", "sock1")
    await presence.receipt(name, "user:ann", "read", 2)
    if deleted_days_ago is not None:
        async with res.connection() as conn:
            await service.delete(conn, name)
            await conn.execute(
                "UPDATE conversations SET deleted_at = now() - make_interval(secs => %s)"
                " WHERE id = %s",
                (deleted_days_ago * 86400, name),
            )


def redis_keys(res: Resources, name: str) -> list[str]:
    k = res.keys
    return [
        k.seq(name),
        k.tail(name),
        k.presence(name),
        k.receipts(name, "delivered"),
        k.receipts(name, "read"),
    ]


async def existing(res: Resources, name: str) -> int:
    return int(await res.redis.exists(*redis_keys(res, name)))


async def test_conversations_deleted_past_the_grace_are_purged_whole(res: Resources) -> None:
    await conversation(res, "gone", deleted_days_ago=3)
    await conversation(res, "recently-gone", deleted_days_ago=0.5)  # grace is 1 day
    await conversation(res, "alive", deleted_days_ago=None)
    await tiers.flush(res)
    rows = {
        c: await scalar(res, "SELECT count(*) FROM segment_blocks WHERE conversation = %s", c)
        for c in ("gone", "recently-gone", "alive")
    }
    assert all(n > 0 for n in rows.values())
    assert await existing(res, "gone") == 5

    would = await conversation_retention.purge(res, Run(dry_run=True))
    expected = {"conversations": 1, "conversation_rows": rows["gone"], "deferred": 0}
    assert would == {**expected, "redis_keys": 0}
    assert await existing(res, "gone") == 5, "a dry run deletes nothing"
    assert await scalar(res, "SELECT count(*) FROM conversations") == 3

    done = await conversation_retention.purge(res, Run())
    assert done == {**expected, "redis_keys": 5}
    assert await existing(res, "gone") == 0
    for table, column in (
        ("conversations", "id"),
        ("conversation_members", "conversation"),
        ("segment_blocks", "conversation"),
        ("segment_heads", "conversation"),
    ):
        assert await scalar(res, f"SELECT count(*) FROM {table} WHERE {column} = 'gone'") == 0, (
            table
        )
    for kept in ("recently-gone", "alive"):
        assert await existing(res, kept) == 5
        assert (
            await scalar(res, "SELECT count(*) FROM segment_blocks WHERE conversation = %s", kept)
            == rows[kept]
        )
        assert await scalar(res, "SELECT count(*) FROM segment_heads WHERE conversation = %s", kept)
    assert await scalar(res, "SELECT count(*) FROM conversation_members") == 1  # alive's
    # The id may be created again, starting afresh.
    async with res.connection() as conn:
        await service.create(conn, service.ConversationCreate(conversation="gone"), "key:admin")


async def test_a_purge_waits_for_messages_not_yet_flushed(res: Resources) -> None:
    await conversation(res, "late", deleted_days_ago=3)  # published, never flushed
    done = await conversation_retention.purge(res, Run())
    assert (done["conversations"], done["deferred"]) == (0, 1)
    assert await existing(res, "late") == 5
    assert await scalar(res, "SELECT count(*) FROM conversations WHERE id = 'late'") == 1
    await tiers.flush(res)
    done = await conversation_retention.purge(res, Run())
    assert (done["conversations"], done["deferred"]) == (1, 0)
    assert await existing(res, "late") == 0
    assert await scalar(res, "SELECT count(*) FROM segment_heads WHERE conversation = 'late'") == 0


async def deleted_long_ago(res: Resources, name: str) -> datetime:
    """A conversation with no message, deleted 3 days ago (past the grace); when."""
    async with res.connection() as conn:
        await service.create(conn, service.ConversationCreate(conversation=name), "key:admin")
        await service.delete(conn, name)
        cur = await conn.execute(
            "UPDATE conversations SET deleted_at = now() - interval '3 days' WHERE id = %s"
            " RETURNING deleted_at",
            (name,),
        )
        row = await cur.fetchone()
    assert row is not None
    when: datetime = row[0]
    return when


async def test_a_purge_waits_for_flusher_entries_read_before_the_deletion(
    res: Resources,
) -> None:
    """A flusher killed after indexing but before XACK leaves its entries pending; whoever owns
    the shard next replays them. Purged before that, the replay would index them under an id
    that may have been created again (over old messages). Newer pending entries (a busy shard)
    hold nothing up."""
    deleted_at = await deleted_long_ago(res, "replayed")
    stream = res.keys.ingest_of("replayed")
    await res.redis.xgroup_create(stream, flush.GROUP, id="0", mkstream=True)
    old = f"{int((deleted_at - timedelta(minutes=5)).timestamp() * 1000)}-0"
    await res.redis.xadd(stream, {"c": "replayed", "s": 1, "m": b"old"}, id=old)
    # A flusher read it and was killed before acknowledging it.
    assert await res.redis.xreadgroup(flush.GROUP, flush.CONSUMER, {stream: ">"})
    with structlog.testing.capture_logs() as logs:
        done = await conversation_retention.purge(res, Run())
    assert (done["conversations"], done["deferred"]) == (0, 1)
    deferred = [e for e in logs if e["event"] == "purge_deferred"]
    assert [(e["conversation"], e["reason"]) for e in deferred] == [("replayed", "pending")]
    assert await scalar(res, "SELECT count(*) FROM conversations WHERE id = 'replayed'") == 1

    # Replayed and acknowledged; meanwhile the shard is busy with newer entries.
    await res.redis.xack(stream, flush.GROUP, old)
    await res.redis.xadd(stream, {"c": "replayed-not", "s": 1, "m": b"new"})
    assert await res.redis.xreadgroup(flush.GROUP, flush.CONSUMER, {stream: ">"})
    assert (await res.redis.xpending(stream, flush.GROUP))["pending"] == 1
    done = await conversation_retention.purge(res, Run())
    assert (done["conversations"], done["deferred"]) == (1, 0)
    assert await scalar(res, "SELECT count(*) FROM conversations WHERE id = 'replayed'") == 0


def test_the_grace_is_at_least_a_day(settings: dict[str, Any]) -> None:
    settings["schedules"] = {"expire_segments": {"grace_days": 0}}
    with pytest.raises(ValidationError, match="grace_days"):
        Config.model_validate(settings)
    settings["schedules"]["expire_segments"]["grace_days"] = 1
    assert Config.model_validate(settings).schedules.expire_segments.grace_days == 1
