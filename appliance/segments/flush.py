"""The flusher: the shards' ingest streams become segment objects in S3, indexed in PostgreSQL.

A `Flusher` holds leases on a fair share of the shards (`index.claim_shards`, renewed every
`lease_ttl / 3`) and reads their ingest streams through the consumer group `flusher` with one
fixed consumer name, so a new owner first re-reads what a previous owner read but never
acknowledged (its pending entries), then new entries. It buffers records per shard, deduplicated
by (conversation, seq), and cuts when the buffered payload bytes reach `max_bytes` or the oldest
entry (by its ingest id's time) is `max_age` old, and at a clean stop. One cut is one segment
object holding every owned shard's buffered conversations, written in this order:

    PUT the object -> index its blocks (one fenced transaction) -> XACK -> XTRIM the ingest
    stream -> trim each conversation's tail

A kill between any two steps leaves entries pending in Redis; whoever owns the shard next reads
them again, the records at or below a conversation's indexed high-water mark are dropped (they
were indexed), and the object key is the digest of its bytes, so a replayed PUT overwrites.
Ingest streams are trimmed only below what is acknowledged and no longer pending, by us and by
every other consumer group of the stream (the webhooks dispatcher's): below each group's oldest
pending entry and its last delivered one. A group whose oldest unacknowledged entry is more than
`[webhooks] max_lag` old is passed over, so that a dead reader cannot pin Redis memory; what is
trimmed before it read it is counted (INGEST_TRIMMED_UNREAD) and logged. A tail keeps its newest
`[messages] tail_max` messages and never anything above the indexed high-water mark.

S3, PostgreSQL and Redis failures are retried with jittered exponential back-off, in place:
nothing is skipped or reordered, and reading stops once `max_bytes` are buffered, so memory stays
bounded during an outage while the entries wait in Redis. Publishing never waits on the flusher.

Test-only: the environment variable `FLUSHER_CRASH_AT` (one of `after_put`, `after_index`,
`before_ack`, `after_trim`) makes the process SIGKILL itself at that step of every cut; the crash
tests use it. It is not configuration and is never set in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, TypeVar

import psycopg
import structlog
from redis.exceptions import ResponseError

from appliance import metrics
from appliance.errors import OUTAGES
from appliance.redis_keys import raise_outage
from appliance.resources import Conn, Resources
from appliance.segments import index, store
from appliance.segments.format import BlockEntry, Record, SegmentWriter
from appliance.storage import StorageError

log = structlog.get_logger()
T = TypeVar("T")

CRASH_ENV = "FLUSHER_CRASH_AT"
CRASH_STEPS = ("after_put", "after_index", "before_ack", "after_trim")
GROUP = "flusher"
CONSUMER = "flusher"  # one name for every owner: a new owner reads its predecessor's pending
READ_COUNT = 1000  # entries per stream per read
READ_BLOCK = 0.5  # seconds a read waits for new entries at most
# While the streams keep up, a read at most about this often. A blocking read returns at the
# first entry, so at a low rate it would be one read per message (measured: 167 reads/s and 7 %
# of a core at 167 messages/s, slowing publishes on the same Redis). Entries wait in Redis as
# safely as in the buffer: pausing costs no durability, only up to this much more age.
READ_INTERVAL = 1.0
BACKOFF_FIRST = 0.1
BACKOFF_CAP = 3.0
_FAILURES: tuple[type[Exception], ...] = (StorageError, *OUTAGES)
_RELEASE_FAILURES: tuple[type[Exception], ...] = (*_FAILURES, TimeoutError)

# Keeps the newest tail_max messages of a conversation, and everything above its indexed
# high-water mark. KEYS: tail, seq counter. ARGV: flushed seq, tail_max. A missing counter
# (Redis lost it) leaves the tail alone: the publish script re-seeds from the tail.
# A counter below the indexed head means Redis came back from an older snapshot (RDB, a restored
# backup): seqs above it were handed out and flushed already. Raise it, so that no more of them
# are handed out again, and say so (-1).
_TRIM_TAIL = """
local counter = redis.call("GET", KEYS[2])
if not counter then return 0 end
if tonumber(counter) < tonumber(ARGV[1]) then
  redis.call("SET", KEYS[2], ARGV[1])
  return -1
end
local keep = math.min(tonumber(ARGV[1]) + 1, tonumber(counter) - tonumber(ARGV[2]) + 1)
if keep <= 1 then return 0 end
return redis.call("XTRIM", KEYS[1], "MINID", keep .. "-0")
"""


def dependency(exc: BaseException) -> str:
    """The label of FLUSH_ERRORS for a failure in `_FAILURES`."""
    if isinstance(exc, StorageError):
        return "s3"
    return "postgres" if isinstance(exc, psycopg.Error) else "redis"


@dataclass
class _Item:
    seq: int
    ms: int  # the ingest entry id's time: the record's ts and its age
    payload: bytes


@dataclass
class _Buffer:
    """One shard's entries read but not yet cut. `ids` are the entries to acknowledge: every
    one read from the current stream, replays and duplicates included."""

    items: dict[str, dict[int, _Item]] = field(default_factory=dict)  # conversation -> seq ->
    ids: list[bytes] = field(default_factory=list)
    size: int = 0
    oldest_ms: int | None = None

    def add(self, entry_id: bytes, fields: dict[bytes, bytes] | None) -> None:
        self.ids.append(entry_id)
        if not fields or b"m" not in fields:  # a pending entry deleted from the stream
            return
        ms = int(entry_id.split(b"-", 1)[0])
        conversation, seq = fields[b"c"].decode(), int(fields[b"s"])
        records = self.items.setdefault(conversation, {})
        known = records.get(seq)
        if known is not None:
            if known.payload == fields[b"m"]:
                return  # read again (pending entries re-read): the same record
            # Another message under a seq already read: Redis lost its data in between and
            # the seq was handed out again. The later one is what the stream and tail hold.
            self.size -= len(known.payload)
        records[seq] = _Item(seq, ms, fields[b"m"])
        self.size += len(fields[b"m"])
        self.oldest_ms = ms if self.oldest_ms is None else min(self.oldest_ms, ms)


@dataclass
class FlushStats:
    """What a Flusher did since it was made."""

    cuts: int = 0
    records: int = 0  # records written to segments (replays not counted)
    bytes: int = 0  # object bytes
    keys: list[str] = field(default_factory=list)  # object keys, one per PUT


def _encode(blocks: Sequence[tuple[str, list[Record]]]) -> tuple[bytes, str, list[BlockEntry]]:
    writer = SegmentWriter()
    parts = [writer.add_block(conversation, records) for conversation, records in blocks]
    parts.append(writer.finish())
    assert writer.digest is not None
    return b"".join(parts), writer.digest, writer.entries


def _after(entry_id: bytes) -> str:
    """The smallest stream id above `entry_id`."""
    ms, _, seq = entry_id.decode().partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def _key_order(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def _id_order(entry_id: str) -> tuple[int, int]:
    return _key_order(entry_id.encode())


@dataclass(frozen=True)
class GroupFloor:
    """Another consumer group of an ingest stream: the lowest id it still needs (its oldest
    pending entry, or the one after its last delivered), and the time (ms) of the oldest
    entry it has not acknowledged that the stream holds (None: it has read all there is)."""

    group: str
    floor: str
    oldest_ms: int | None


def trim_plan(
    own: str, others: Sequence[GroupFloor], now_ms: int, max_lag_ms: float
) -> list[tuple[str, list[str]]]:
    """The XTRIM MINIDs for one ingest stream, in order, each with the groups that lose what
    it trims. The stream is kept from `own` (the flusher's floor) or the lowest floor of a
    group within `max_lag_ms`; groups lagging more are passed over one after the other, so
    each trim's count is what the groups named with it had not read."""
    kept = own
    for other in others:
        if other.oldest_ms is None or now_ms - other.oldest_ms <= max_lag_ms:
            kept = min(kept, other.floor, key=_id_order)
    passed = sorted(
        (o for o in others if _id_order(o.floor) < _id_order(kept)),
        key=lambda o: _id_order(o.floor),
    )
    plan: list[tuple[str, list[str]]] = []
    losers: list[str] = []
    for other in passed:
        plan.append((other.floor, list(losers)))
        losers.append(other.group)
    plan.append((kept, losers))
    return plan


class Flusher:
    """One flusher of one process. `run(stop)` is the program; `flush_pending(res)` drives the
    same steps once, in-process, for tests. `on_step` (tests) is called at every crash step."""

    def __init__(self, res: Resources) -> None:
        self.res = res
        self.config = res.config
        self.owner = f"{res.config.appliance.instance}:{uuid.uuid4().hex[:8]}"
        self.ttl = res.config.segments.lease_ttl
        self.owned: set[int] = set()
        self.stats = FlushStats()
        self.on_step: Callable[[str], None] | None = None
        self._crash_at = os.environ.get(CRASH_ENV)
        self._ready: set[int] = set()  # owned shards whose consumer group is known to exist
        self._cursor: dict[int, str] = {}  # "0-0"-style while re-reading pending, then ">"
        self._buffers: dict[int, _Buffer] = {}
        self._entry_bytes = 256.0  # moving average of an entry's payload size
        self._more = False  # the last read returned all it asked of a stream: more may wait
        self._valid_until = 0.0  # monotonic time the leases last to, as far as we know
        self._partitions: date | None = None
        self._trim_tail = res.redis.register_script(_TRIM_TAIL)

    # -- steps with retries ----------------------------------------------------------------

    async def _retry(self, step: str, call: Callable[[], Awaitable[T]]) -> T:
        """`call()` until it succeeds; each failure of a dependency is counted, logged once and
        waited out with jittered exponential back-off. Other exceptions propagate."""
        delay = BACKOFF_FIRST
        while True:
            try:
                return await call()
            except _FAILURES as exc:
                wait = delay * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not secrecy
                self._failed(step, exc, wait)
                await asyncio.sleep(wait)
                delay = min(BACKOFF_CAP, delay * 2)

    def _failed(self, step: str, exc: BaseException, wait: float | None = None) -> None:
        dep = dependency(exc)
        metrics.FLUSH_ERRORS.labels(dep).inc()
        # Clients name hosts and ports, never passwords; the detail is cut short anyway.
        log.warning(
            "flush_retry",
            dependency=dep,
            step=step,
            error=type(exc).__name__,
            detail=str(exc)[:200],
            retry_in=None if wait is None else round(wait, 3),
        )

    async def _sql(self, step: str, query: Callable[[Conn], Awaitable[T]]) -> T:
        async def once() -> T:
            async with self.res.connection() as conn:
                return await query(conn)

        return await self._retry(step, once)

    def _step(self, step: str) -> None:
        if self._crash_at == step:
            log.warning("flusher_crash_injected", step=step)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.on_step is not None:
            self.on_step(step)

    # -- start, leases, groups -------------------------------------------------------------

    async def start(self) -> None:
        """Shard rows (a ConfigError for a changed `segments.shards` propagates) and today's
        flush partitions."""
        shards = self.config.segments.shards
        await self._sql("ensure_shards", lambda conn: index.ensure_shards(conn, shards))
        today = datetime.now(UTC).date()
        await self._sql("partitions", lambda conn: index.ensure_flush_partitions(conn, today))
        self._partitions = today

    async def claim(self) -> None:
        """Renew and take leases once; apply what changed. A failure is logged and counted,
        and the leases then last what they last (the next claim tries again)."""
        started = time.monotonic()
        today = datetime.now(UTC).date()
        peers = await self._peers()
        try:
            async with self.res.connection() as conn:
                if today != self._partitions:
                    await index.ensure_flush_partitions(conn, today)
                    self._partitions = today
                mine = await index.claim_shards(
                    conn, self.owner, self.ttl, self.config.segments.shards, peers
                )
        except _FAILURES as exc:
            self._failed("claim", exc)
            return
        self._valid_until = started + self.ttl
        held = set(mine)
        for shard in sorted(self.owned - held):
            self._drop(shard)
        gained = held - self.owned
        for shard in gained:
            self._cursor[shard] = "0-0"
        self.owned = held
        metrics.SHARDS_OWNED.set(len(held))
        if gained:
            log.info("shards_claimed", owner=self.owner, shards=sorted(gained), owned=len(held))
        await self._ensure_groups()

    @property
    def _presence(self) -> str:
        return self.res.keys.flushers()

    async def _peers(self) -> int:
        """Other flushers alive, from a sorted set of owners scored by when they stop counting
        (each renews its own at every claim); 0 when Redis does not answer (the leases table
        still counts those that own shards)."""
        now = time.time()
        try:
            async with self.res.redis.pipeline(transaction=True) as pipe:
                pipe.zremrangebyscore(self._presence, "-inf", now)
                pipe.zadd(self._presence, {self.owner: now + self.ttl})
                pipe.zcard(self._presence)
                replies = await pipe.execute()
        except _FAILURES as exc:
            self._failed("presence", exc)
            return 0
        return max(0, int(replies[-1]) - 1)

    def _drop(self, shard: int) -> None:
        """Forget a shard another flusher owns now: its buffer is never cut, acknowledged or
        trimmed by us (its entries stay pending for the new owner)."""
        self._buffers.pop(shard, None)
        self._ready.discard(shard)
        self._cursor.pop(shard, None)
        self.owned.discard(shard)
        metrics.INGEST_BACKLOG.labels(str(shard)).set(0)
        metrics.OLDEST_UNFLUSHED.labels(str(shard)).set(0)
        metrics.SHARDS_OWNED.set(len(self.owned))
        log.info("shard_lost", owner=self.owner, shard=shard)

    async def _ensure_groups(self, shards: Sequence[int] | None = None) -> None:
        """The consumer group of each owned shard not known to have one, created at the stream's
        start (MKSTREAM: the stream may not exist yet). A shard whose group is new is re-read
        from its pending entries (none), i.e. from the start of the stream."""
        for shard in sorted(shards if shards is not None else self.owned - self._ready):
            try:
                await self.res.redis.xgroup_create(
                    self.res.keys.ingest(shard), GROUP, id="0", mkstream=True
                )
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            except _FAILURES as exc:
                self._failed("group", exc)
                return
            self._cursor[shard] = "0-0"
            if shard in self.owned:
                self._ready.add(shard)

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            await self.claim()

    # -- reading ---------------------------------------------------------------------------

    def _readable(self) -> list[int]:
        if time.monotonic() >= self._valid_until:
            return []  # our leases may have run out: someone else may read these streams now
        return sorted(self._ready & self.owned)

    async def read(self, block: float | None) -> int:
        """One XREADGROUP over the readable shards; the entries it returned (0 on a failure,
        which is counted, logged and waited out). `block` seconds is honoured only when
        every shard reads new entries (a pending read answers at once)."""
        shards = self._readable()
        if not shards:
            await asyncio.sleep(min(block or 0.05, 0.2))
            return 0
        keys = self.res.keys
        streams: dict[Any, Any] = {keys.ingest(s): self._cursor[s] for s in shards}
        waits = block is not None and all(self._cursor[s] == ">" for s in shards)
        try:
            reply: Any = await self.res.redis.xreadgroup(
                GROUP,
                CONSUMER,
                streams,
                count=self._count(len(shards)),
                block=max(1, int(block * 1000)) if waits and block is not None else None,
            )
        except ResponseError as exc:
            # NOGROUP; UNBLOCKED: the stream went away while the read waited.
            if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                raise
            # Redis lost the stream or the group (a restart without data, FLUSHALL): make it
            # again from the start. The ids buffered belong to the lost stream and are never
            # acknowledged or trimmed; the records are cut only where their tail still holds
            # them (`_keep_what_tails_hold`).
            log.warning("flush_group_recreated", shards=shards)
            for shard in shards:
                buffer = self._buffers.get(shard)
                if buffer is not None:
                    buffer.ids.clear()
            await self._ensure_groups(shards)
            return 0
        except _FAILURES as exc:
            self._failed("read", exc, READ_BLOCK)
            await asyncio.sleep(READ_BLOCK)
            return 0
        named = {keys.ingest(s).encode(): s for s in shards}
        got: dict[int, list[tuple[bytes, dict[bytes, bytes] | None]]] = {}
        for name, entries in reply or []:
            got[named[name]] = entries
        count = 0
        asked = self._count(len(shards))
        self._more = any(len(entries) >= asked for entries in got.values())
        for shard in shards:
            entries = got.get(shard, [])
            if shard not in self.owned or shard not in self._cursor:
                continue  # lost while the read was out (the lease task dropped it)
            if self._cursor[shard] != ">":
                # Re-reading pending entries: page on, or switch to new ones when done.
                self._cursor[shard] = entries[-1][0].decode() if entries else ">"
            buffer = self._buffers.setdefault(shard, _Buffer())
            before = buffer.size
            for entry_id, fields in entries:
                buffer.add(entry_id, fields)
            count += len(entries)
            if entries:  # a moving average of entry sizes: what the next reads ask for
                size = (buffer.size - before) / len(entries)
                self._entry_bytes = max(64.0, 0.7 * self._entry_bytes + 0.3 * size)
        return count

    async def read_available(self) -> int:
        """Read without waiting (pending entries first) until nothing more comes or max_bytes
        are buffered; the entries read."""
        total = 0
        while self.buffered < self.config.segments.max_bytes:
            new_only = all(self._cursor.get(s) == ">" for s in self._readable())
            got = await self.read(None)
            total += got
            if got == 0 and new_only:
                break
        return total

    def _count(self, streams: int) -> int:
        """Entries to ask of each stream: what fits in the room left below max_bytes at the
        average entry size seen so far, so a read overshoots max_bytes by little (memory stays
        near max_bytes however large the messages)."""
        room = max(0, self.config.segments.max_bytes - self.buffered)
        return max(1, min(READ_COUNT, int(room / (self._entry_bytes * streams))))

    @property
    def buffered(self) -> int:
        return sum(b.size for b in self._buffers.values())

    def _oldest_ms(self) -> int | None:
        ages = [b.oldest_ms for b in self._buffers.values() if b.oldest_ms is not None]
        return min(ages) if ages else None

    def due_in(self) -> float | None:
        """Seconds until the next cut is due (0: now), None when nothing is buffered."""
        if not any(b.ids or b.items for b in self._buffers.values()):
            return None
        if self.buffered >= self.config.segments.max_bytes:
            return 0.0
        oldest = self._oldest_ms()
        if oldest is None:
            return 0.0  # only deleted pending entries: acknowledge them
        return max(0.0, oldest / 1000 + self.config.segments.max_age - time.time())

    # -- cutting ---------------------------------------------------------------------------

    async def cut(self) -> None:
        """Write, index, acknowledge and trim everything buffered (one object; another one
        only when the index refused the first). Retries failures until done."""
        taken = {s: b for s, b in self._buffers.items() if b.ids or b.items}
        if not taken:
            return
        started = time.monotonic()
        items: dict[str, dict[int, _Item]] = {}
        for buffer in taken.values():
            items.update(buffer.items)  # a conversation is in one shard only
        conversations = sorted(items)
        heads = await self._sql("heads", lambda conn: index.flushed_heads(conn, conversations))
        for conversation, head in heads.items():
            _drop_upto(items, conversation, head)
        await self._retry("verify", lambda: self._keep_what_tails_hold(items))
        shards = sorted(taken)
        written: dict[str, int] = {}
        while True:
            blocks = [
                (c, [Record(i.seq, i.ms, i.payload) for _, i in sorted(items[c].items())])
                for c in sorted(items)
                if items[c]
            ]
            key, entries, size = await self._put(blocks)
            refused = await self._index(shards, key, entries)
            if refused is None:
                break
            log.info("flush_cut_refused", lost=refused.lost_shards, stale=len(refused.stale))
            for shard in refused.lost_shards:
                lost = taken.pop(shard)
                for conversation in lost.items:
                    items.pop(conversation, None)
                self._drop(shard)
            shards = sorted(taken)
            for conversation, head in refused.stale.items():
                heads[conversation] = max(head, heads.get(conversation, 0))
                _drop_upto(items, conversation, head)
            if not shards:
                return
        records = sum(e.count for e in entries)
        for e in entries:
            written[e.conversation] = max(e.last_seq, written.get(e.conversation, 0))
        self._step("after_index")
        self._step("before_ack")
        flushed = {c: max(heads.get(c, 0), written.get(c, 0)) for c in items}
        await self._retry("ack", lambda: self._acknowledge(taken, flushed))
        self._step("after_trim")
        for shard, buffer in taken.items():
            if self._buffers.get(shard) is buffer:
                del self._buffers[shard]
            if shard in self._cursor:
                # Look at the pending entries again: normally none are left, but a previous
                # owner that had not yet noticed losing the shard may have read some.
                self._cursor[shard] = "0-0"
        self.stats.cuts += 1
        self.stats.records += records
        duration = time.monotonic() - started
        metrics.FLUSH_DURATION.observe(duration)
        metrics.SEGMENT_RECORDS.labels("flush").inc(records)
        log.info(
            "flush_cut",
            shards=shards,
            conversations=len(entries),
            records=records,
            bytes=size,
            key=key or None,
            duration_ms=round(duration * 1000, 1),
        )

    async def _keep_what_tails_hold(self, items: dict[str, dict[int, _Item]]) -> None:
        """Drop the buffered records that their conversation's tail no longer holds as read.

        A tail keeps every record above the indexed head, so a buffered record missing from it,
        or held there with other bytes, means Redis lost its data after the record was read
        (a restart without persistence, FLUSHALL, a failover to a lagging replica): the publish
        script has since gone on from the indexed head and may have handed the same seq to a
        new message. Indexing the old copy would give that seq two messages; the records lost
        with Redis are the documented loss window instead (docs/operations.md)."""
        names = [c for c in sorted(items) if items[c]]
        async with self.res.redis.pipeline(transaction=False) as pipe:
            for c in names:
                seqs = items[c]
                pipe.xrange(self.res.keys.tail(c), f"{min(seqs)}-0", f"{max(seqs)}-0")
            tails = await pipe.execute()
        dropped = 0
        for c, entries in zip(names, tails, strict=True):
            held = {int(i.split(b"-", 1)[0]): f.get(b"m") for i, f in entries}
            records = items[c]
            for seq in [q for q, item in records.items() if held.get(q) != item.payload]:
                del records[seq]
                dropped += 1
        if dropped:
            log.error(
                "flush_dropped_lost_records",
                records=dropped,
                hint="Redis lost data these were read from; seqs went on from the indexed head",
            )

    async def _put(
        self, blocks: list[tuple[str, list[Record]]]
    ) -> tuple[str, list[BlockEntry], int]:
        """The object of `blocks` written to S3: its key, directory and size ("" when empty)."""
        if not blocks:
            return "", [], 0
        data, digest, entries = await asyncio.to_thread(_encode, blocks)
        key = store.flush_key(datetime.now(UTC).date(), digest)
        await self._retry("put", lambda: self.res.storage.put(key, data))
        self._step("after_put")
        self.stats.keys.append(key)
        self.stats.bytes += len(data)
        metrics.SEGMENTS.labels("flush").inc()
        metrics.SEGMENT_BYTES.labels("flush").inc(len(data))
        return key, entries, len(data)

    async def _index(
        self, shards: list[int], key: str, entries: list[BlockEntry]
    ) -> index.Refused | None:
        return await self._sql(
            "index", lambda conn: index.index_cut(conn, self.owner, shards, key, entries, self.ttl)
        )

    async def _acknowledge(self, taken: dict[int, _Buffer], flushed: dict[str, int]) -> None:
        """XACK what was cut, trim each ingest stream below what is still pending (ours or a
        previous owner's) or else just above the last acknowledged entry, and below what every
        other consumer group still needs unless it lags past `[webhooks] max_lag` (`trim_plan`),
        and trim the tails. Idempotent: a retry after a partial run does no harm."""
        redis, keys = self.res.redis, self.res.keys
        acked = {s: b.ids for s, b in taken.items() if b.ids}
        # Pipelines as context managers: one whose scripts could not be loaded (Redis away)
        # would otherwise keep its connection (redis-py resets it only after sending).
        async with redis.pipeline(transaction=False) as pipe:
            for shard, ids in acked.items():
                pipe.xack(keys.ingest(shard), GROUP, *ids)
                pipe.xpending(keys.ingest(shard), GROUP)
                pipe.xinfo_groups(keys.ingest(shard))
            replies = await pipe.execute(raise_on_error=False)
        raise_outage(replies)
        others = await self._other_groups(list(acked), replies[2::3])
        now_ms = int(time.time() * 1000)
        max_lag_ms = self.config.webhooks.max_lag * 1000
        plans: list[tuple[int, list[tuple[str, list[str]]]]] = []
        for (shard, ids), pending in zip(acked.items(), replies[1::3], strict=True):
            if isinstance(pending, ResponseError):
                continue  # the group is gone (Redis lost it): nothing of ours to trim
            floor = _after(max(ids, key=_key_order))
            if pending and pending.get("pending"):
                floor = min(floor, pending["min"].decode(), key=_id_order)
            plans.append((shard, trim_plan(floor, others.get(shard, []), now_ms, max_lag_ms)))
        tail_max = self.config.messages.tail_max
        trimmed = [(c, seq) for c, seq in flushed.items() if seq > 0]
        async with redis.pipeline(transaction=False) as pipe:
            for shard, plan in plans:
                for minid, _ in plan:
                    pipe.xtrim(keys.ingest(shard), minid=minid, approximate=False)
            for conversation, seq in trimmed:
                await self._trim_tail(
                    keys=[keys.tail(conversation), keys.seq(conversation)],
                    args=[seq, tail_max],
                    client=pipe,
                )
            replies = await pipe.execute()
        counts = iter(replies)
        for shard, plan in plans:
            for _, losers in plan:
                count = next(counts)
                if losers and count:
                    for group in losers:
                        metrics.INGEST_TRIMMED_UNREAD.labels(group).inc(count)
                    log.error(
                        "ingest_trimmed_unread",
                        shard=shard,
                        groups=losers,
                        entries=count,
                        hint="a consumer group fell more than [webhooks] max_lag behind",
                    )
        for (conversation, seq), reply in zip(
            trimmed, replies[len(replies) - len(trimmed) :], strict=True
        ):
            if reply == -1:
                log.error(
                    "seq_counter_behind_index",
                    conversation=conversation,
                    raised_to=seq,
                    hint="Redis restored an older snapshot: use AOF persistence",
                )

    async def _other_groups(
        self, shards: Sequence[int], infos: Sequence[Any]
    ) -> dict[int, list[GroupFloor]]:
        """The floors of every consumer group but ours on each shard's stream (XINFO GROUPS
        replies in `infos`), with a second round trip only when there are any."""
        keys = self.res.keys
        found: list[tuple[int, str, str]] = []  # shard, group, the id after its last delivered
        for shard, info in zip(shards, infos, strict=True):
            if isinstance(info, ResponseError):
                continue  # no stream
            for group in info:
                name = group["name"].decode()
                if name != GROUP:
                    found.append((shard, name, _after(group["last-delivered-id"])))
        if not found:
            return {}
        async with self.res.redis.pipeline(transaction=False) as pipe:
            for shard, name, after in found:
                pipe.xpending(keys.ingest(shard), name)
                pipe.xrange(keys.ingest(shard), min=after, count=1)
            replies = await pipe.execute(raise_on_error=False)
        raise_outage(replies)
        floors: dict[int, list[GroupFloor]] = {}
        for (shard, name, after), pending, unread in zip(
            found, replies[::2], replies[1::2], strict=True
        ):
            if isinstance(pending, ResponseError) or isinstance(unread, ResponseError):
                continue  # the group went away meanwhile
            floor, oldest = after, None
            if unread:
                oldest = int(unread[0][0].split(b"-", 1)[0])
            if pending and pending.get("pending"):
                first = pending["min"].decode()
                floor = min(floor, first, key=_id_order)
                oldest = min(oldest or 2**63, int(first.split("-", 1)[0]))
            floors.setdefault(shard, []).append(GroupFloor(name, floor, oldest))
        return floors

    # -- metrics ---------------------------------------------------------------------------

    async def report(self) -> None:
        """Backlog gauges of the owned shards: an ingest stream holds what is not flushed."""
        shards = sorted(self.owned)
        if not shards:
            return
        try:
            async with self.res.redis.pipeline(transaction=False) as pipe:
                for shard in shards:
                    pipe.xlen(self.res.keys.ingest(shard))
                    pipe.xrange(self.res.keys.ingest(shard), count=1)
                replies = await pipe.execute()
        except _FAILURES:
            return  # the flush steps count and log Redis failures
        now = time.time()
        for shard, length, first in zip(shards, replies[::2], replies[1::2], strict=True):
            age = now - int(first[0][0].split(b"-")[0]) / 1000 if first else 0.0
            metrics.INGEST_BACKLOG.labels(str(shard)).set(length)
            metrics.OLDEST_UNFLUSHED.labels(str(shard)).set(max(0.0, age))

    async def _report_loop(self) -> None:
        while True:
            await self.report()
            await asyncio.sleep(1.0)

    # -- the program -----------------------------------------------------------------------

    async def _loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            due = self.due_in()
            if due == 0.0:
                await self.cut()
                continue
            started = time.monotonic()
            got = await self.read(min(READ_BLOCK, due) if due is not None else READ_BLOCK)
            if got and not self._more:  # caught up: let entries gather before reading again
                pause = READ_INTERVAL - (time.monotonic() - started)
                due = self.due_in()
                if due is not None:
                    pause = min(pause, due)
                if pause > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), pause)
        # The drain: what the last pause left unread, and all that is buffered, if it can be
        # cut in time (what is not stays pending in Redis for the next owner).
        await self.read_available()
        await self.cut()

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`: claim, read, cut. Then cut what is buffered within most of
        `stop_timeout` (anything left stays pending in Redis) and release the leases."""
        await self.start()
        await self.claim()
        helpers = [
            asyncio.create_task(self._lease_loop()),
            asyncio.create_task(self._report_loop()),
        ]
        main = asyncio.create_task(self._loop(stop))
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({main, stopping}, return_when=asyncio.FIRST_COMPLETED)
            try:
                await asyncio.wait_for(main, self.config.appliance.stop_timeout * 0.75)
            except TimeoutError:
                log.warning("flush_drain_timeout", buffered=self.buffered)
        finally:
            for task in (*helpers, stopping, main):
                task.cancel()
            await asyncio.gather(*helpers, stopping, main, return_exceptions=True)
            await self.release()

    async def release(self) -> None:
        """Give up the leases now, so another flusher takes the shards at once."""
        try:
            async with asyncio.timeout(2.0):
                async with self.res.connection() as conn:
                    await index.release_shards(conn, self.owner)
            await self.res.redis.zrem(self._presence, self.owner)
        except _RELEASE_FAILURES as exc:
            log.warning("flush_release_failed", error=type(exc).__name__)
            return
        for shard in sorted(self.owned):
            metrics.INGEST_BACKLOG.labels(str(shard)).set(0)
            metrics.OLDEST_UNFLUSHED.labels(str(shard)).set(0)
        self.owned.clear()
        metrics.SHARDS_OWNED.set(0)


def _drop_upto(items: dict[str, dict[int, _Item]], conversation: str, head: int) -> None:
    records = items.get(conversation)
    if records:
        for seq in [s for s in records if s <= head]:
            del records[seq]


async def flush_pending(res: Resources) -> FlushStats:
    """Flush everything in the ingest streams now, in-process, and release the leases: for
    tests. Needs every shard (RuntimeError when another live flusher holds some)."""
    flusher = Flusher(res)
    await flusher.start()
    await flusher.claim()
    try:
        missing = set(range(res.config.segments.shards)) - flusher._ready
        if missing:
            raise RuntimeError(f"shards {sorted(missing)} are held by another flusher")
        while await flusher.read_available():
            await flusher.cut()
        await flusher.cut()
    finally:
        await flusher.release()
    return flusher.stats
