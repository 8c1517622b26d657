"""Compaction: a finished UTC day of flush segments becomes one history object.

`compact_day(res, day)` rewrites every flush row of `day` into `store.history_key(day)`, one
block per conversation (split when a conversation's day passes `MAX_HISTORY_BLOCK_RAW` raw
bytes, so a reader's ranged GET stays bounded), one history row per block, then drops the day's
flush partition whole. It streams:

1. List the day's flush objects; read their rows a few objects at a time (short queries),
   GET each object once, in turn, and append each indexed block's bytes (still compressed,
   after its row's fields) to a local spool file (`tempfile`, so `TMPDIR` decides where),
   keeping in memory only, per conversation, two arrays (first seqs, places in the file).
2. For each conversation in code-point order, read back its spooled blocks in seq order, decode
   and check each against its row (`decode_block(..., expect=row.entry)`: a damaged object
   raises `SegmentCorrupt`, the upload is aborted and the day stays as it was), and write the
   records through `store.StreamedSegment` (multipart parts of `store.PART_BYTES`).
3. One transaction (the swap), with a short `lock_timeout`: lock the day's flush rows against
   writers (readers go on) and check they are exactly those compacted (count, records, object
   keys; a late flush makes the whole day be redone), insert the history rows, drop the day's
   partition (this takes an ACCESS EXCLUSIVE lock: readers wait for the commit, a few
   milliseconds, or for at most LOCK_TIMEOUT while the swap waits on a long reader before it
   gives up and tries again), delete the day's rows of the default partition, record
   `segment_compactions` and put the flush objects' keys in `segment_garbage`.
4. After the commit, delete the garbage objects (`Storage.delete_many`), then their rows.

Bounds: memory is about one flush object (the flusher's `[segments] max_bytes`, compressed),
one multipart part (PART_BYTES plus the block that filled it), one history block with its
decoded records (`MAX_HISTORY_BLOCK_RAW` plus one flush block), the rows of OBJECTS_PER_QUERY
flush objects, 16 bytes per flush row and a directory entry per history block (the footer
needs them); local disk is the day's compressed block bytes
(plus 52 bytes a block), freed at the end.

Crash safety: the history key is fixed by the day, so a rerun after a crash at any point redoes
the work and overwrites the same object, which no row references before the swap commits. A day
with a `segment_compactions` row is never rewritten (its rows point into that object); its
leftover garbage is still deleted. One compaction of a day at a time: a session advisory lock
on a dedicated connection, taken with `pg_try_advisory_lock`; a second caller skips the day.

Test-only fault injection: the environment variable COMPACT_CRASH_AT, set to `after_upload`
or `after_swap`, kills this process with SIGKILL at that step. Production never sets it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import struct
import tempfile
import time
from array import array
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import date
from typing import IO, Any

import psycopg
import structlog
from psycopg import sql
from psycopg.rows import class_row

from appliance import metrics
from appliance.db.pool import connect
from appliance.resources import Resources
from appliance.segments import index, store
from appliance.segments.format import RECORD_HEAD, BlockEntry, Record, decode_block
from appliance.segments.index import BlockRow
from appliance.storage import Storage, StorageError

log = structlog.get_logger()
Conn = psycopg.AsyncConnection[Any]
Counts = dict[str, int]
BeforeSwap = Callable[[int], Awaitable[None]]

# A history block holds at most this many raw bytes (records with their 20-byte heads); a
# conversation's busier day is split into several blocks, so one read never fetches more.
MAX_HISTORY_BLOCK_RAW = 4 * 1024 * 1024
# The swap waits this long for its locks at most: while DROP TABLE waits, every reader and the
# flushers' inserts queue behind it, so it gives up soon and tries again a little later.
LOCK_TIMEOUT = "200ms"
SWAP_ATTEMPTS = 8  # lock timeouts in a row before the day is left for the next run
SWAP_PAUSE = 1.0  # seconds before the second swap attempt (then twice that, and so on)
REDO_ATTEMPTS = 3  # late flushes in a row before the day is left for the next run
LOCK_NAMESPACE = 0x5E6C0  # first key of the advisory lock; the second is the day's ordinal
CRASH_ENV = "COMPACT_CRASH_AT"  # test-only (see the module docstring)


class _Changed(Exception):
    """The day's flush rows differ from those compacted (a late flush): redo the day."""


def _crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _partition(day: date) -> str:
    # The name appliance_ensure_flush_partition gives the day's partition (migration 0004).
    return f"segment_blocks_flush_d{day:%Y%m%d}"


def _counts() -> Counts:
    return dict.fromkeys(
        (
            "days",
            "blocks",
            "records",
            "bytes",
            "flush_objects_deleted",
            "skipped",
            "busy",
            "deferred",
            "redone",
        ),
        0,
    )


async def compact_day(
    res: Resources,
    day: date,
    *,
    max_block_raw: int = MAX_HISTORY_BLOCK_RAW,
    before_swap: BeforeSwap | None = None,
) -> Counts:
    """Compact `day` (see the module docstring). Counts: days (1 when this call compacted it),
    blocks, records and bytes of the history object, flush_objects_deleted, skipped (already
    compacted, or no flush rows), busy (another caller holds the day), deferred (locks or late
    flushes kept the swap from committing: the next run redoes the day), redone (late flushes
    met). A damaged flush object raises SegmentCorrupt and leaves the day untouched.
    `before_swap` is a test seam, awaited with the attempt number before each swap."""
    counts = _counts()
    conn = await connect(res.config.postgres, "compact")
    try:
        cur = await conn.execute(
            "SELECT pg_try_advisory_lock(%s, %s)", (LOCK_NAMESPACE, day.toordinal())
        )
        row = await cur.fetchone()
        if row is None or not row[0]:
            counts["busy"] = 1
            return counts
        await _compact_locked(res, conn, day, max_block_raw, before_swap, counts)
    finally:
        # The lock belongs to this session: closing it releases the lock whatever happened
        # (an explicit unlock on a broken connection would only hide the first error).
        await conn.close()
    return counts


async def _compact_locked(
    res: Resources,
    conn: Conn,
    day: date,
    max_block_raw: int,
    before_swap: BeforeSwap | None,
    counts: Counts,
) -> None:
    started = time.perf_counter()
    cur = await conn.execute("SELECT 1 FROM segment_compactions WHERE period = %s", (day,))
    if await cur.fetchone() is not None:
        counts["skipped"] = 1
        late = await _flush_keys(conn, day)
        if late:
            # Never rewritten: the day's history rows point into its object. Readers still
            # find these rows; an operator has to look (a flush indexed long past its day).
            log.warning("compaction_late_rows", day=day.isoformat(), objects=len(late))
        counts["flush_objects_deleted"] = await collect_garbage(conn, res.storage)
        return
    for attempt in range(1, REDO_ATTEMPTS + 1):
        keys = await _flush_keys(conn, day)
        if not keys:
            counts["skipped"] = 1
            await _drop_empty(conn, day)
            return
        key = store.history_key(day)
        with tempfile.TemporaryFile(prefix="compact-") as file:
            spool = Spool(file, keys)
            await _spool(conn, res.storage, day, spool)
            entries, size = await _write_history(res.storage, key, spool, max_block_raw)
        _crash_point("after_upload")
        expected = (spool.rows, spool.records, keys)
        try:
            flush_keys = await _swap(conn, day, key, expected, entries, size, before_swap, attempt)
        except _Changed:
            counts["redone"] += 1
            log.info("compaction_redo", day=day.isoformat(), attempt=attempt)
            continue
        if flush_keys is None:
            counts["deferred"] = 1
            return
        _crash_point("after_swap")
        records = sum(e.count for e in entries)
        counts.update(days=1, blocks=len(entries), records=records, bytes=size)
        metrics.SEGMENT_BYTES.labels("history").inc(size)
        metrics.SEGMENT_RECORDS.labels("history").inc(records)
        metrics.SEGMENTS.labels("history").inc()
        try:
            counts["flush_objects_deleted"] = await collect_garbage(conn, res.storage, flush_keys)
        except StorageError as exc:
            # The day is compacted; its old objects stay listed as garbage for the next run.
            log.warning("compaction_garbage_left", day=day.isoformat(), error=exc.message)
        log.info(
            "compaction_done",
            day=day.isoformat(),
            object_key=key,
            flush_objects=len(flush_keys),
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
            **{k: v for k, v in counts.items() if v},
        )
        return
    counts["deferred"] = 1
    log.warning("compaction_deferred", day=day.isoformat(), reason="flush rows kept changing")


async def _drop_empty(conn: Conn, day: date) -> None:
    """Drop the partition of a finished `day` that never got a row (made ahead, the appliance
    idle that day), so `days_due` stops listing it; a lock held by a reader defers it."""
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            await conn.execute(
                sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(_partition(day)))
            )
    except psycopg.errors.LockNotAvailable:
        log.info("compaction_empty_partition_kept", day=day.isoformat())


async def _flush_keys(conn: Conn, day: date) -> list[str]:
    """The flush objects the day's rows point into."""
    cur = await conn.execute(
        "SELECT DISTINCT object_key FROM segment_blocks"
        " WHERE tier = 'flush' AND period = %s ORDER BY object_key",
        (day,),
    )
    return [str(r[0]) for r in await cur.fetchall()]


class Spool:
    """The day's indexed blocks, still compressed, in a local temporary file, each after a
    SPOOL_HEAD giving its object (an index into `keys`) and its index row's fields. In memory
    per block: two array slots (its first seq, its place in the file), so a day of a million
    flush rows needs about 16 MB besides the conversations' names."""

    def __init__(self, file: IO[bytes], keys: list[str]) -> None:
        self.file = file
        self.keys = keys
        self.plan: dict[str, tuple[array[int], array[int]]] = {}  # conversation -> firsts, at
        self.rows = 0
        self.records = 0

    def add(self, key_index: int, rows: Sequence[BlockRow], data: bytes) -> None:
        """Spool the blocks of one flush object (`data`) that `rows` index."""
        for row in rows:
            e = row.entry
            at = self.file.tell()
            fields = (e.offset, e.length, e.count, e.first_seq, e.last_seq, e.min_ts, e.max_ts)
            self.file.write(SPOOL_HEAD.pack(key_index, *fields))
            # A short slice (object truncated) is caught when the block is decoded.
            self.file.write(data[e.offset : e.offset + e.length])
            firsts, places = self.plan.setdefault(e.conversation, (array("q"), array("q")))
            firsts.append(e.first_seq)
            places.append(at)
            self.rows += 1
            self.records += e.count

    def blocks(self, conversation: str, max_raw: int) -> Iterator[list[Record]]:
        """The conversation's records in seq order, in runs of at most `max_raw` raw bytes
        (a record larger than that alone), each spooled block decoded and checked against
        its index row (a damaged flush object raises SegmentCorrupt naming it)."""
        firsts, places = self.plan[conversation]
        pending: list[Record] = []
        raw = 0
        for i in sorted(range(len(firsts)), key=firsts.__getitem__):
            self.file.seek(places[i])
            key_index, *fields = SPOOL_HEAD.unpack(self.file.read(SPOOL_HEAD.size))
            entry = BlockEntry(conversation, *fields)
            data = self.file.read(entry.length)
            block = decode_block(data, self.keys[key_index], entry.offset, expect=entry)
            for record in block.records:
                size = RECORD_HEAD.size + len(record.payload)
                if pending and raw + size > max_raw:
                    yield pending
                    pending, raw = [], 0
                pending.append(record)
                raw += size
        if pending:
            yield pending


SPOOL_HEAD = struct.Struct("<IQIIQQQQ")  # object, then offset, length, count, seqs, tss
OBJECTS_PER_QUERY = 64  # flush objects whose rows one query reads (the rows are held at once)


async def _spool(conn: Conn, storage: Storage, day: date, spool: Spool) -> None:
    """GET each flush object once and spool its indexed blocks. Rows are read a few objects at
    a time (short queries, a bounded batch in memory), never the whole day at once."""
    for start in range(0, len(spool.keys), OBJECTS_PER_QUERY):
        group = spool.keys[start : start + OBJECTS_PER_QUERY]
        async with conn.cursor(row_factory=class_row(BlockRow)) as cur:
            await cur.execute(
                f"""SELECT {index.COLUMNS} FROM segment_blocks
                     WHERE tier = 'flush' AND period = %s AND object_key = ANY(%s)
                     ORDER BY object_key, byte_offset""",
                (day, group),
            )
            rows = await cur.fetchall()
        for key, mine in itertools.groupby(rows, key=lambda r: r.object_key):
            data = await storage.get(key)
            await asyncio.to_thread(spool.add, start + group.index(key), list(mine), data)


async def _write_history(
    storage: Storage, key: str, spool: Spool, max_block_raw: int
) -> tuple[list[BlockEntry], int]:
    """One history object from the spooled blocks: per conversation (code-point order) its
    records in seq order, cut into blocks of at most `max_block_raw` raw bytes. Its directory
    and size."""
    async with store.StreamedSegment(storage, key) as segment:
        for conversation in sorted(spool.plan):
            runs = spool.blocks(conversation, max_block_raw)
            # One thread hop per history block: decoding many small flush blocks one hop each
            # spent more time in hops than in zstd.
            while (records := await asyncio.to_thread(next, runs, None)) is not None:
                await segment.add_block(conversation, records)
        entries = await segment.finish()
        return entries, segment.size


async def _swap(
    conn: Conn,
    day: date,
    key: str,
    expected: tuple[int, int, list[str]],
    entries: Sequence[BlockEntry],
    size: int,
    before_swap: BeforeSwap | None,
    attempt: int,
) -> list[str] | None:
    """The swap transaction, retried on lock timeouts; the flush keys let go of, or None when
    locks kept it from committing SWAP_ATTEMPTS times. Raises _Changed on a late flush."""
    flush_keys = expected[2]
    for tries in range(1, SWAP_ATTEMPTS + 1):
        if before_swap is not None:
            await before_swap(attempt)
        try:
            async with conn.transaction():
                await _swap_once(conn, day, key, entries, size, expected)
            return flush_keys
        except psycopg.errors.LockNotAvailable:
            log.info("compaction_swap_lock_timeout", day=day.isoformat(), attempt=tries)
            if tries < SWAP_ATTEMPTS:
                await asyncio.sleep(SWAP_PAUSE * tries)
    log.warning("compaction_deferred", day=day.isoformat(), reason="lock timeouts")
    return None


async def _swap_once(
    conn: Conn,
    day: date,
    key: str,
    entries: Sequence[BlockEntry],
    size: int,
    expected: tuple[int, int, list[str]],
) -> None:
    await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
    # Writers of the day's rows are held off (EXCLUSIVE lets readers through) until the
    # commit, so what is checked is what is dropped. The default partition takes a day's rows
    # only while its own partition is missing.
    part = sql.Identifier(_partition(day))
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (_partition(day),))
    row = await cur.fetchone()
    exists = bool(row and row[0])
    if exists:
        await conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(part))
    await conn.execute("LOCK TABLE segment_blocks_flush_default IN EXCLUSIVE MODE")
    cur = await conn.execute(
        """SELECT count(*), coalesce(sum(records), 0),
                  coalesce(array_agg(DISTINCT object_key ORDER BY object_key), '{}')
             FROM segment_blocks WHERE tier = 'flush' AND period = %s""",
        (day,),
    )
    found = await cur.fetchone()
    # Keys compared as sets: their order is the database collation's.
    if found is None or (int(found[0]), int(found[1]), set(found[2])) != (
        expected[0],
        expected[1],
        set(expected[2]),
    ):
        raise _Changed
    # A flush object is indexed once, on one day; should rows of another day still point into
    # one of these objects, it is not garbage yet (it goes with that day).
    cur = await conn.execute(
        "SELECT DISTINCT object_key FROM segment_blocks"
        " WHERE tier = 'flush' AND period <> %s AND object_key = ANY(%s)",
        (day, expected[2]),
    )
    shared = {str(r[0]) for r in await cur.fetchall()}
    # Rows left by nothing we know of (the day has no compaction row), but never duplicated.
    await conn.execute("DELETE FROM segment_blocks WHERE tier = 'history' AND period = %s", (day,))
    await index.insert_blocks(conn, "history", day, key, entries)
    if exists:
        await conn.execute(sql.SQL("DROP TABLE {}").format(part))
    await conn.execute("DELETE FROM segment_blocks_flush_default WHERE period = %s", (day,))
    await conn.execute(
        """INSERT INTO segment_compactions
               (period, object_key, blocks, records, bytes, flush_objects)
           VALUES (%s, %s, %s, %s, %s, %s)""",
        (day, key, len(entries), sum(e.count for e in entries), size, len(expected[2])),
    )
    await conn.execute(
        "INSERT INTO segment_garbage (object_key) SELECT unnest(%s::text[])"
        " ON CONFLICT (object_key) DO NOTHING",
        ([k for k in expected[2] if k not in shared],),
    )


async def collect_garbage(conn: Conn, storage: Storage, keys: Sequence[str] | None = None) -> int:
    """Delete the objects `segment_garbage` lists (only `keys` among them, when given), then
    their rows; the number of objects deleted. Deleting twice is harmless (a missing object
    counts as deleted), so a crash between the two steps only repeats the first."""
    if keys is None:
        cur = await conn.execute("SELECT object_key FROM segment_garbage ORDER BY object_key")
    else:
        cur = await conn.execute(
            "SELECT object_key FROM segment_garbage WHERE object_key = ANY(%s)", (list(keys),)
        )
    found = [str(r[0]) for r in await cur.fetchall()]
    if not found:
        return 0
    deleted = await storage.delete_many(found)
    await conn.execute("DELETE FROM segment_garbage WHERE object_key = ANY(%s)", (found,))
    return deleted


async def days_due(conn: Conn, grace_minutes: int) -> list[date]:
    """Days with flush rows whose end (UTC, PostgreSQL's clock) is `grace_minutes` past, so
    today is never among them; oldest first."""
    # The days are the flush partitions' own (by name: no scan of their rows) and the days
    # of rows in the default partition (rows of a day whose partition was missing).
    cur = await conn.execute(
        r"""SELECT day FROM (
                SELECT to_date(substring(c.relname FROM '_d(\d{8})$'), 'YYYYMMDD') AS day
                  FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                 WHERE i.inhparent = 'segment_blocks_flush'::regclass
                   AND c.relname ~ '_d\d{8}$'
                UNION
                SELECT DISTINCT period FROM segment_blocks_flush_default) days
             WHERE (day + 1)::timestamp + make_interval(mins => %s) <= now() AT TIME ZONE 'UTC'
             ORDER BY day""",
        (grace_minutes,),
    )
    return [r[0] for r in await cur.fetchall()]


ORPHAN_DAYS = 7  # a flush object this many days old that no row references is an orphan


async def sweep_orphans(conn: Conn, storage: Storage, min_age_days: int = ORPHAN_DAYS) -> int:
    """Delete flush objects under `segments/flush/<day>/` with `day` at least `min_age_days`
    before today (PostgreSQL's clock) that no index row references: a flusher crashed between
    its PUT and its index transaction (or its cut was refused). The number deleted."""
    cur = await conn.execute("SELECT (now() AT TIME ZONE 'UTC')::date - %s", (min_age_days,))
    row = await cur.fetchone()
    assert row is not None
    cutoff: date = row[0]
    old = []
    for key, _size in await storage.list_keys(store.FLUSH_PREFIX):
        hint = key[len(store.FLUSH_PREFIX) :].split("/", 1)[0]
        try:
            made = date.fromisoformat(hint)
        except ValueError:
            continue  # not a name the flusher gives: not ours to delete
        if made <= cutoff:
            old.append(key)
    if not old:
        return 0
    cur = await conn.execute(
        "SELECT DISTINCT object_key FROM segment_blocks"
        " WHERE tier = 'flush' AND object_key = ANY(%s)",
        (old,),
    )
    referenced = {str(r[0]) for r in await cur.fetchall()}
    orphans = [k for k in old if k not in referenced]
    if orphans:
        await storage.delete_many(orphans)
        log.info("compaction_orphans_deleted", objects=len(orphans))
    return len(orphans)
