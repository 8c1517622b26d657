"""Compaction against real PostgreSQL and S3: a finished day of flush segments becomes one
history object, crash-safe, once at a time, redone after a late flush, never dropping data.

Each test has a fresh database (flush partitions are global per database) and its own bucket
(history keys are named by day). Flush segments are made the way the flusher makes them: an
encoded segment PUT under its digest, then indexed with index_cut (today's partition) and moved
to the day under test.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from appliance.config import Config
from appliance.resources import Resources, open_resources
from appliance.schedules import SCHEDULES, Run, compact_segments
from appliance.segments import compact, index, store
from appliance.segments.format import (
    MAX_BLOCK_RAW_BYTES,
    Block,
    Record,
    SegmentCorrupt,
    decode_segment,
    encode_segment,
)
from appliance.storage import StorageError
from tests.support import migrated_db, write_toml

Blocks = Sequence[tuple[str, Sequence[Record]]]


@pytest.fixture
async def res(settings: dict[str, Any], fresh_database: Any) -> AsyncIterator[Resources]:
    dsn = fresh_database()
    await migrated_db(dsn)
    settings["postgres"]["dsn"] = dsn
    settings["s3"]["bucket"] = f"compact-{uuid.uuid4().hex[:12]}"
    async with open_resources(Config.model_validate(settings), "test") as resources:
        await resources.storage.init()
        yield resources


def message(conversation: str, seq: int, size: int = 0) -> Record:
    body = {"conversation": conversation, "seq": seq, "text": "x" * size}
    return Record(seq, 1_700_000_000_000 + seq, json.dumps(body).encode())


async def today(res: Resources) -> date:
    async with res.connection() as conn:
        cur = await conn.execute("SELECT (now() AT TIME ZONE 'UTC')::date")
        row = await cur.fetchone()
    assert row is not None
    result: date = row[0]
    return result


async def flush(res: Resources, day: date | None, blocks: Blocks, *, partition: bool = True) -> str:
    """PUT one flush segment of `blocks` and index it as the flusher does; then move its rows to
    `day` (into the day's partition, or the default one when `partition` is false)."""
    data, digest = encode_segment(sorted(blocks, key=lambda b: (b[0], b[1][0].seq)))
    key = store.flush_key(day or await today(res), digest)
    await res.storage.put(key, data)
    async with res.connection() as conn:
        await index.ensure_shards(conn, 1)
        assert await index.claim_shards(conn, "test", 60, 1) == [0]
        entries = [b.entry for b in store_blocks(data, key)]
        assert await index.index_cut(conn, "test", [0], key, entries, 60) is None
        if day is not None:
            if partition:
                await conn.execute("SELECT appliance_ensure_flush_partition(%s)", (day,))
            await conn.execute(
                "UPDATE segment_blocks SET period = %s WHERE tier = 'flush' AND object_key = %s",
                (day, key),
            )
    return key


def store_blocks(data: bytes, key: str) -> list[Block]:
    return decode_segment(data, key)


async def scalar(res: Resources, query: str, *params: Any) -> Any:
    async with res.connection() as conn:
        cur = await conn.execute(query, params)
        row = await cur.fetchone()
    return None if row is None else row[0]


async def history(
    res: Resources, conversation: str, tiers: tuple[str, ...] = ("history",)
) -> tuple[list[index.BlockRow], list[Record]]:
    """The rows of `conversation` (all in `tiers`) and their records, read as the read path
    reads."""
    async with res.connection() as conn:
        rows = await index.blocks_after(conn, conversation, 0, 1000)
    assert all(r.tier in tiers for r in rows)
    records = []
    for row in rows:
        records += (await store.read_block(res.storage, row.object_key, row.entry)).records
    return rows, records


async def flush_row_count(res: Resources, day: date) -> int:
    return int(
        await scalar(
            res, "SELECT count(*) FROM segment_blocks WHERE tier = 'flush' AND period = %s", day
        )
    )


async def flush_objects(res: Resources) -> list[str]:
    return sorted(k for k, _ in await res.storage.list_keys(store.FLUSH_PREFIX))


def sample(name: str) -> float:
    return REGISTRY.get_sample_value(name, {"tier": "history"}) or 0.0


async def spread(res: Resources, day: date, conversations: list[str], cuts: int) -> dict[str, Any]:
    """`cuts` flush segments of `day`, each holding the next seqs of every conversation."""
    sent: dict[str, list[Record]] = {c: [] for c in conversations}
    for cut in range(cuts):
        blocks = []
        for n, conversation in enumerate(conversations):
            records = [message(conversation, cut * 10 + i + 1, n) for i in range(1 + cut % 3)]
            sent[conversation] += records
            blocks.append((conversation, records))
        await flush(res, day, blocks)
    return sent


async def test_a_day_becomes_one_history_object(
    res: Resources, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compact, "OBJECTS_PER_QUERY", 4)  # rows read in two batches
    day = await today(res) - timedelta(days=3)
    conversations = [f"c-{uuid.uuid4().hex[:6]}-{i}" for i in range(5)] + ["zé", "z€", "Z"]
    sent = await spread(res, day, conversations, cuts=6)
    keys = await flush_objects(res)
    assert len(keys) == 6
    before = (sample("appliance_segments_total"), sample("appliance_segment_records_total"))

    with capture_logs() as logs:
        counts = await compact.compact_day(res, day)

    total = sum(len(r) for r in sent.values())
    assert counts["days"] == 1 and counts["blocks"] == len(conversations)
    assert counts["records"] == total and counts["flush_objects_deleted"] == 6
    done = [e for e in logs if e["event"] == "compaction_done"]
    assert done and done[0]["records"] == total and "duration_ms" in done[0]
    assert sample("appliance_segments_total") == before[0] + 1
    assert sample("appliance_segment_records_total") == before[1] + total
    for conversation, records in sent.items():
        rows, read = await history(res, conversation)
        assert len(rows) == 1 and rows[0].period == day
        assert rows[0].object_key == store.history_key(day)
        assert read == records  # byte-identical payloads, in seq order
    # The object is a valid segment whose blocks ascend by code point.
    blocks = await store.read_segment(res.storage, store.history_key(day))
    assert [b.entry.conversation for b in blocks] == sorted(conversations)
    assert (
        await scalar(res, "SELECT to_regclass(%s)", f"segment_blocks_flush_d{day:%Y%m%d}") is None
    )
    assert await flush_row_count(res, day) == 0
    assert await flush_objects(res) == []
    assert await scalar(res, "SELECT count(*) FROM segment_garbage") == 0
    async with res.connection() as conn:
        cur = await conn.execute(
            "SELECT object_key, blocks, records, bytes, flush_objects FROM segment_compactions"
            " WHERE period = %s",
            (day,),
        )
        recorded = await cur.fetchone()
    size = await res.storage.size(store.history_key(day))
    assert recorded == (store.history_key(day), len(conversations), total, size, 6)

    again = await compact.compact_day(res, day)
    assert again["skipped"] == 1 and again["days"] == 0
    assert (await compact.compact_day(res, day - timedelta(days=1)))["skipped"] == 1
    assert await scalar(res, "SELECT count(*) FROM segment_blocks") == len(conversations)


async def test_day_in_the_default_partition_and_split_blocks(res: Resources) -> None:
    """Rows of a day with no partition of its own sit in the default partition; a busy
    conversation's day is cut into blocks of at most max_block_raw raw bytes."""
    day = await today(res) - timedelta(days=4)
    busy, quiet = f"busy-{uuid.uuid4().hex[:6]}", f"quiet-{uuid.uuid4().hex[:6]}"
    sent = {busy: [message(busy, s, 100) for s in range(1, 41)], quiet: [message(quiet, 1)]}
    for start in range(0, 40, 10):
        blocks = [(busy, sent[busy][start : start + 10])]
        await flush(
            res, day, blocks + ([(quiet, sent[quiet])] if start == 0 else []), partition=False
        )
    assert await scalar(res, "SELECT count(*) FROM segment_blocks_flush_default") == 5

    counts = await compact.compact_day(res, day, max_block_raw=1000)

    rows, read = await history(res, busy)
    assert read == sent[busy] and len(rows) == counts["blocks"] - 1 > 4
    assert all(a.last_seq < b.first_seq for a, b in itertools.pairwise(rows))
    assert all(r.records * 20 <= 1000 for r in rows)
    assert (await history(res, quiet))[1] == sent[quiet]
    assert await scalar(res, "SELECT count(*) FROM segment_blocks_flush_default") == 0


async def test_schedule_skips_today_and_days_inside_the_grace(
    res: Resources, settings: dict[str, Any]
) -> None:
    """With a grace of a whole day, yesterday (ended less than a day ago) waits; the day
    before is compacted; today is never touched."""
    settings["schedules"] = {"compact_segments": {"grace_minutes": 1440}}
    res.config = Config.model_validate(settings)
    now = await today(res)
    names = {d: f"c-{uuid.uuid4().hex[:6]}" for d in (0, 1, 2)}
    await flush(res, None, [(names[0], [message(names[0], 1)])])
    await flush(res, now - timedelta(days=1), [(names[1], [message(names[1], 1)])])
    await flush(res, now - timedelta(days=2), [(names[2], [message(names[2], 1)])])

    entry = next(e for e in SCHEDULES if e.name == "compact_segments")
    assert entry.settings(res.config) is res.config.schedules.compact_segments
    assert res.config.schedules.compact_segments.grace_minutes == 1440
    counts = await entry.run(res, Run())

    assert counts["days"] == 1 and counts["records"] == 1 and counts["failed"] == 0
    assert counts["flush_objects_deleted"] == 1 and counts["orphans_deleted"] == 0
    assert await flush_row_count(res, now) == 1
    assert await flush_row_count(res, now - timedelta(days=1)) == 1
    assert await flush_row_count(res, now - timedelta(days=2)) == 0
    assert (await compact_segments.run(res, Run()))["days"] == 0


CRASH_SCRIPT = """
import asyncio, datetime, sys
from pathlib import Path
from appliance.config import load_config
from appliance.resources import open_resources
from appliance.segments.compact import compact_day

async def main() -> None:
    async with open_resources(load_config(Path(sys.argv[1]), {}), "compact-crash") as res:
        await compact_day(res, datetime.date.fromisoformat(sys.argv[2]))

asyncio.run(main())
"""


@pytest.mark.process
@pytest.mark.parametrize("step", ["after_upload", "after_swap"])
async def test_crash_then_rerun_ends_compacted_once(
    res: Resources, settings: dict[str, Any], tmp_path: Path, step: str
) -> None:
    day = await today(res) - timedelta(days=2)
    conversations = [f"c-{uuid.uuid4().hex[:6]}-{i}" for i in range(4)]
    sent = await spread(res, day, conversations, cuts=3)
    keys = await flush_objects(res)
    path = write_toml(tmp_path / "config.toml", settings)

    done = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(path), day.isoformat()],
        env={**os.environ, compact.CRASH_ENV: step},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == -9, done.stderr

    compacted = await scalar(res, "SELECT count(*) FROM segment_compactions")
    assert await res.storage.size(store.history_key(day)) is not None
    assert await flush_objects(res) == keys  # nothing deleted before the crash
    if step == "after_upload":
        assert compacted == 0 and await flush_row_count(res, day) > 0
        assert await scalar(res, "SELECT count(*) FROM segment_blocks_history") == 0
    else:
        assert compacted == 1 and await flush_row_count(res, day) == 0
        assert await scalar(res, "SELECT count(*) FROM segment_garbage") == len(keys)

    # After the swap the day is done: the schedule's run only deletes the leftover garbage.
    rerun = (
        compact.compact_day(res, day)
        if step == "after_upload"
        else compact_segments.run(res, Run())
    )
    counts = await rerun

    assert counts["days"] == (1 if step == "after_upload" else 0)
    assert counts["flush_objects_deleted"] == len(keys)
    assert await scalar(res, "SELECT count(*) FROM segment_blocks") == len(conversations)
    assert await scalar(res, "SELECT count(*) FROM segment_compactions") == 1
    assert await scalar(res, "SELECT count(*) FROM segment_garbage") == 0
    assert await flush_objects(res) == []
    for conversation, records in sent.items():
        assert (await history(res, conversation))[1] == records


async def test_one_compaction_of_a_day_at_a_time(res: Resources) -> None:
    day = await today(res) - timedelta(days=2)
    conversation = f"c-{uuid.uuid4().hex[:6]}"
    await flush(res, day, [(conversation, [message(conversation, 1)])])
    await flush(res, day, [(conversation, [message(conversation, 2)])])
    seen: list[dict[str, int]] = []

    async def meanwhile(attempt: int) -> None:
        # While this call holds the day, another one skips it.
        seen.append(await compact.compact_day(res, day))

    counts = await compact.compact_day(res, day, before_swap=meanwhile)
    assert counts["days"] == 1 and counts["records"] == 2
    assert len(seen) == 1 and seen[0]["busy"] == 1 and seen[0]["days"] == 0
    assert await scalar(res, "SELECT count(*) FROM segment_blocks") == 1

    # Two at once, whichever wins: one compacts, the other is busy or finds it done.
    other = day - timedelta(days=1)
    await flush(res, other, [(conversation, [message(conversation, 3)])])
    results = await asyncio.gather(compact.compact_day(res, other), compact.compact_day(res, other))
    assert sorted(r["days"] for r in results) == [0, 1]
    assert sum(r["busy"] + r["skipped"] for r in results) == 1
    assert await scalar(res, "SELECT count(*) FROM segment_blocks") == 2


async def test_late_flush_makes_the_swap_redo(res: Resources) -> None:
    day = await today(res) - timedelta(days=2)
    early, late = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    await flush(res, day, [(early, [message(early, 1), message(early, 2)])])

    async def late_flush(attempt: int) -> None:
        if attempt == 1:
            await flush(res, day, [(early, [message(early, 3)]), (late, [message(late, 1)])])

    counts = await compact.compact_day(res, day, before_swap=late_flush)

    assert counts["redone"] == 1 and counts["days"] == 1 and counts["records"] == 4
    assert counts["flush_objects_deleted"] == 2
    assert [r.seq for r in (await history(res, early))[1]] == [1, 2, 3]
    assert [r.seq for r in (await history(res, late))[1]] == [1]
    assert await flush_row_count(res, day) == 0


async def test_a_flush_that_never_stops_changing_is_deferred(res: Resources) -> None:
    day = await today(res) - timedelta(days=2)
    conversation = f"c-{uuid.uuid4().hex[:6]}"
    await flush(res, day, [(conversation, [message(conversation, 1)])])
    seqs = iter(range(2, 100))

    async def always_late(attempt: int) -> None:
        seq = next(seqs)
        await flush(res, day, [(conversation, [message(conversation, seq)])])

    counts = await compact.compact_day(res, day, before_swap=always_late)
    assert counts["deferred"] == 1 and counts["days"] == 0
    assert counts["redone"] == compact.REDO_ATTEMPTS
    assert await scalar(res, "SELECT count(*) FROM segment_compactions") == 0
    assert await flush_row_count(res, day) == 1 + compact.REDO_ATTEMPTS
    assert (await compact.compact_day(res, day))["days"] == 1


async def test_swap_lock_timeout_leaves_the_day_for_later(
    res: Resources, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer holding the day's partition makes the swap give up after short waits, changing
    nothing; the next call compacts."""
    monkeypatch.setattr(compact, "LOCK_TIMEOUT", "100ms")
    monkeypatch.setattr(compact, "SWAP_PAUSE", 0.01)
    day = await today(res) - timedelta(days=2)
    conversation = f"c-{uuid.uuid4().hex[:6]}"
    await flush(res, day, [(conversation, [message(conversation, 1)])])
    async with res.connection() as holder, holder.transaction():
        await holder.execute(f"LOCK TABLE segment_blocks_flush_d{day:%Y%m%d} IN ROW EXCLUSIVE MODE")
        counts = await compact.compact_day(res, day)
        assert counts["deferred"] == 1 and counts["days"] == 0
    assert await flush_row_count(res, day) == 1
    assert await scalar(res, "SELECT count(*) FROM segment_blocks_history") == 0
    assert (await compact.compact_day(res, day))["days"] == 1


async def test_multipart_history_object_round_trips(res: Resources) -> None:
    """More than one multipart part (incompressible payloads past PART_BYTES)."""
    day = await today(res) - timedelta(days=2)
    rng = random.Random(7)
    big, small = f"big-{uuid.uuid4().hex[:6]}", f"small-{uuid.uuid4().hex[:6]}"
    sent: dict[str, list[Record]] = {big: [], small: []}
    seq = 0
    for _cut in range(4):  # 4 cuts of 2.5 MiB of random bytes for `big`
        records = []
        for _ in range(5):
            seq += 1
            records.append(Record(seq, seq, rng.randbytes(512 * 1024)))
        sent[big] += records
        sent[small].append(message(small, len(sent[small]) + 1))
        await flush(res, day, [(big, records), (small, sent[small][-1:])])

    counts = await compact.compact_day(res, day)

    # `big` (10 MiB raw) is split into blocks of at most MAX_HISTORY_BLOCK_RAW (4 MiB): 3.
    assert counts["bytes"] > store.PART_BYTES and counts["blocks"] == 3 + 1
    assert counts["bytes"] == await res.storage.size(store.history_key(day))
    for conversation, records in sent.items():
        assert (await history(res, conversation))[1] == records
    assert compact.MAX_HISTORY_BLOCK_RAW < MAX_BLOCK_RAW_BYTES


async def test_orphan_sweep_deletes_only_old_unreferenced_objects(res: Resources) -> None:
    now = await today(res)
    old = now - timedelta(days=compact.ORPHAN_DAYS)
    orphan = store.flush_key(old, "a" * 64)
    young = store.flush_key(now - timedelta(days=compact.ORPHAN_DAYS - 1), "b" * 64)
    foreign = f"{store.FLUSH_PREFIX}not-a-day/c.seg"
    for key in (orphan, young, foreign):
        await res.storage.put(key, b"whatever")
    conversation = f"c-{uuid.uuid4().hex[:6]}"
    # Indexed under an old day's name: referenced, so kept (a flush row of today).
    data, digest = encode_segment([(conversation, [message(conversation, 1)])])
    referenced = store.flush_key(old, digest)
    await res.storage.put(referenced, data)
    async with res.connection() as conn:
        await index.ensure_shards(conn, 1)
        await index.claim_shards(conn, "test", 60, 1)
        entries = [b.entry for b in store_blocks(data, referenced)]
        assert await index.index_cut(conn, "test", [0], referenced, entries, 60) is None
        assert await compact.sweep_orphans(conn, res.storage) == 1
    assert await flush_objects(res) == sorted([young, foreign, referenced])
    assert (await compact_segments.run(res, Run()))["orphans_deleted"] == 0


async def test_corrupt_or_missing_flush_object_is_reported_and_the_day_kept(
    res: Resources,
) -> None:
    day = await today(res) - timedelta(days=3)
    conversation = f"c-{uuid.uuid4().hex[:6]}"
    good = await flush(res, day, [(conversation, [message(conversation, 1, 50)])])
    bad = await flush(res, day, [(conversation, [message(conversation, 2, 50)])])
    data = bytearray(await res.storage.get(bad))
    data[70] ^= 0xFF  # inside the first block's compressed records
    await res.storage.put(bad, bytes(data))

    def intact() -> Any:
        return flush_row_count(res, day)

    with pytest.raises(SegmentCorrupt) as caught:
        await compact.compact_day(res, day)
    assert caught.value.name == bad
    assert await intact() == 2
    assert await scalar(res, "SELECT count(*) FROM segment_blocks_history") == 0
    assert await scalar(res, "SELECT count(*) FROM segment_compactions") == 0
    assert await flush_objects(res) == sorted([good, bad])

    with capture_logs() as logs, pytest.raises(compact_segments.CompactionFailed) as failed:
        await compact_segments.run(res, Run())
    assert day.isoformat() in failed.value.message
    assert [e["day"] for e in logs if e["event"] == "compaction_failed"] == [day.isoformat()]
    assert await intact() == 2

    await res.storage.delete(bad)
    with pytest.raises(StorageError):
        await compact.compact_day(res, day)
    assert await intact() == 2
    assert await scalar(res, "SELECT count(*) FROM segment_compactions") == 0


async def test_rows_indexed_into_a_compacted_day_are_left_and_reported(res: Resources) -> None:
    """A compacted day's object is never rewritten (its rows point into it): rows that reach
    the day afterwards stay readable as flush rows and are logged."""
    day = await today(res) - timedelta(days=2)
    conversation = f"c-{uuid.uuid4().hex[:6]}"
    await flush(res, day, [(conversation, [message(conversation, 1)])])
    assert (await compact.compact_day(res, day))["days"] == 1
    size = await res.storage.size(store.history_key(day))
    await flush(res, day, [(conversation, [message(conversation, 2)])])  # default partition

    with capture_logs() as logs:
        counts = await compact.compact_day(res, day)

    assert counts["skipped"] == 1 and counts["days"] == 0
    assert [e["objects"] for e in logs if e["event"] == "compaction_late_rows"] == [1]
    assert await flush_row_count(res, day) == 1
    assert await res.storage.size(store.history_key(day)) == size
    rows, records = await history(res, conversation, ("history", "flush"))
    assert [r.tier for r in rows] == ["history", "flush"] and [r.seq for r in records] == [1, 2]


async def test_an_object_shared_with_another_day_is_kept_until_that_day(res: Resources) -> None:
    day = await today(res) - timedelta(days=3)
    first, second = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    key = await flush(res, day, [(first, [message(first, 1)]), (second, [message(second, 1)])])
    async with res.connection() as conn:
        await conn.execute("SELECT appliance_ensure_flush_partition(%s)", (day + timedelta(1),))
        await conn.execute(
            "UPDATE segment_blocks SET period = period + 1 WHERE conversation = %s", (second,)
        )

    assert (await compact.compact_day(res, day))["flush_objects_deleted"] == 0
    assert await flush_objects(res) == [key]
    assert await scalar(res, "SELECT count(*) FROM segment_garbage") == 0
    assert (await compact.compact_day(res, day + timedelta(1)))["flush_objects_deleted"] == 1
    assert await flush_objects(res) == []
    assert [r.seq for r in (await history(res, first))[1]] == [1]
    assert [r.seq for r in (await history(res, second))[1]] == [1]


async def test_days_due_come_from_partition_names_and_the_default_partition(
    res: Resources,
) -> None:
    """A finished day's partition that never got a row is listed once, then dropped; a day
    whose rows went to the default partition is listed too."""
    now = await today(res)
    empty, stray = now - timedelta(days=5), now - timedelta(days=6)
    async with res.connection() as conn:
        await conn.execute("SELECT appliance_ensure_flush_partition(%s)", (empty,))
        await conn.execute(
            """INSERT INTO segment_blocks_flush_default (tier, period, conversation, first_seq,
                      last_seq, object_key, byte_offset, byte_length, records, min_ts, max_ts)
               VALUES ('flush', %s, 'x', 1, 1, 'segments/flush/none.seg', 8, 60, 1, now(),
                       now())""",
            (stray,),
        )
        due = await compact.days_due(conn, 10)
        assert stray in due and empty in due and now not in due
        await conn.execute("DELETE FROM segment_blocks_flush_default WHERE period = %s", (stray,))
    assert (await compact.compact_day(res, empty))["skipped"] == 1
    async with res.connection() as conn:
        assert empty not in await compact.days_due(conn, 10)
        cur = await conn.execute(
            "SELECT to_regclass(%s)", (f"segment_blocks_flush_d{empty:%Y%m%d}",)
        )
        assert (await cur.fetchone()) == (None,)
