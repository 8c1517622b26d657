"""message.created: the shards' ingest streams become webhook delivery jobs, a batch at a time.

Publishing writes only to Redis, so message events come from the ingest streams the flusher
reads too, through a consumer group of their own, `webhooks`. The group exists only while some
enabled endpoint subscribes to message.created (looked up every `CHECK_INTERVAL`): it is created
at "$", so events begin with the messages published after the first subscription is seen, and
destroyed once none is left, so that no forgotten group pins the streams (the flusher trims
below every group's unacknowledged entries, up to `[webhooks] max_lag`).

One dispatcher reads at a time across all workers, the holder of a Redis lease, so that each
conversation's events are emitted in seq order. A read of every stream is one PostgreSQL
transaction that emits all its events (`emit` groups them per endpoint into jobs of at most
`[webhooks] batch_max`), then one XACK per stream:

    XREADGROUP -> emit + COMMIT -> XACK

A read is bounded in entries and bytes: `READ_TOTAL` entries across all shards, and fewer when
`[messages] max_body_bytes` is large, so that a read never holds more than `READ_BYTES` even if
every entry is as large as a message may be. The budget is shared by need: after a read in which
some shards filled their count, those shards are asked for most of the next one (the others for
a little), so that one busy conversation still reads in large batches. Messages are carried as
the bytes the ingest stream holds (`msgspec.Raw`): only their id and time are decoded.

A new holder first takes over what the group holds pending (a dead holder's entries: XAUTOCLAIM)
and emits it before anything newer. So delivery is at least once: a crash between the commit
and the XACK emits those events again. A message event's id is the message's id: receivers
drop the repeat by id.

Test-only: the environment variable `WEBHOOKS_CRASH_AT=after_emit` makes the process SIGKILL
itself after an emit commits, before its XACK (the crash test uses it). It is not configuration
and is never set in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from redis.exceptions import ResponseError

from appliance import metrics
from appliance.errors import OUTAGES
from appliance.redis_keys import raise_outage
from appliance.resources import Resources
from appliance.webhooks.client import close_clients
from appliance.webhooks.events import Event
from appliance.webhooks.service import emit

log = structlog.get_logger()

CRASH_ENV = "WEBHOOKS_CRASH_AT"
GROUP = "webhooks"
READ_TOTAL = 1000  # entries per read, across all shards
READ_BYTES = 64 * 1_048_576  # bytes per read at most, every entry counted at its largest
ENTRY_OVERHEAD = 8192  # an entry's bytes besides the body at most (metadata, attachment refs)
READ_BLOCK = 1.0  # seconds a read waits for new entries at most
# While the streams keep up, a read at most about this often, so that a burst gathers into
# batches instead of one delivery per message (a blocking read returns at the first entry).
READ_INTERVAL = 0.2
CHECK_INTERVAL = 5.0  # seconds between looks at whether any endpoint takes message.created
LEASE_TTL = 10.0  # seconds the dispatcher lease lasts without renewal
BACKOFF_FIRST = 0.1
BACKOFF_CAP = 5.0

_SUBSCRIBED = """
SELECT EXISTS (SELECT 1 FROM webhook_endpoints
                WHERE enabled AND events && ARRAY['message.created']::text[])
"""
# KEYS: the lease. ARGV: our token, ttl ms. Renew ours, or take it when nobody holds it.
_HOLD = """
local holder = redis.call("GET", KEYS[1])
if holder == ARGV[1] then return redis.call("PEXPIRE", KEYS[1], ARGV[2]) end
if holder then return 0 end
redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2])
return 1
"""
_RELEASE = """
if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) end
return 0
"""

Entries = dict[int, list[tuple[bytes, dict[bytes, bytes] | None]]]  # shard -> (id, fields)


class _Head(msgspec.Struct):
    """What the dispatcher decodes of a stored message (the rest is carried as bytes)."""

    id: str
    ts: str


_head = msgspec.json.Decoder(_Head)


def read_budget(max_body_bytes: int) -> int:
    """Entries per read across all shards: `READ_TOTAL`, fewer when entries may be so large
    that as many would pass `READ_BYTES`."""
    return max(1, min(READ_TOTAL, READ_BYTES // (max_body_bytes + ENTRY_OVERHEAD)))


def shares(shards: range, budget: int, full: set[int]) -> dict[int, int]:
    """Entries to ask of each shard: equal shares, or (after a read in which the shards in
    `full` returned all they were asked) a quarter share for the others and the rest of
    `budget` split among those. The counts add up to `budget` at most (one each at least)."""
    share = max(1, budget // len(shards))
    if not full:
        return dict.fromkeys(shards, share)
    small = max(1, share // 4)
    rest = max(1, (budget - small * (len(shards) - len(full))) // len(full))
    return {s: rest if s in full else small for s in shards}


@dataclass
class DispatchStats:
    """What a Dispatcher did since it was made."""

    events: int = 0  # events emitted (repeats after a crash included)
    jobs: int = 0  # delivery jobs queued
    emits: int = 0  # transactions that emitted


def message_event(conversation: str, message: bytes) -> Event:
    """The message.created event of one ingest entry: the message as readers get it (its
    bytes, not decoded), under the message's own id and time."""
    head = _head.decode(message)
    return Event(
        id=head.id,
        type="message.created",
        created=head.ts,
        conversation=conversation,
        data=msgspec.Raw(message),
    )


class Dispatcher:
    """The dispatcher of one worker. `run(stop)` is its loop; `step()` does one round (tests
    drive it directly). `on_step` (tests) is called after the emit commits, before the XACK."""

    def __init__(
        self,
        res: Resources,
        *,
        consumer: str | None = None,
        lease_ttl: float = LEASE_TTL,
        check_interval: float = CHECK_INTERVAL,
    ) -> None:
        self.res = res
        self.consumer = consumer or res.config.appliance.instance
        self.token = f"{self.consumer}:{uuid.uuid4().hex[:8]}"
        self.lease_ttl = lease_ttl
        self.check_interval = check_interval
        self.on_step: Callable[[str], None] | None = None
        self._crash_at = os.environ.get(CRASH_ENV)
        self.stats = DispatchStats()
        self.subscribed = False
        self._checked_at: float | None = None
        self._valid_until = 0.0  # monotonic time our lease lasts to, as far as we know
        self._renewed_at = 0.0
        self._ready = False  # the groups are known to exist
        self._claimed = False  # the group's pending entries were taken over since we won
        self._more = False  # the last read returned all it asked of a stream
        self._shards = range(res.config.segments.shards)
        self._budget = read_budget(res.config.messages.max_body_bytes)
        self._full: set[int] = set()  # shards that returned all they were asked last time
        self._hold = res.redis.register_script(_HOLD)
        self._release = res.redis.register_script(_RELEASE)

    # -- whether to read at all ------------------------------------------------------------

    async def check(self, force: bool = False) -> bool:
        """Whether an enabled endpoint takes message.created (asked every `check_interval`);
        when none does, the groups are destroyed and the lease given up."""
        now = time.monotonic()
        fresh = self._checked_at is not None and now - self._checked_at < self.check_interval
        if fresh and not force:
            return self.subscribed
        async with self.res.connection() as conn:
            cur = await conn.execute(_SUBSCRIBED)
            row = await cur.fetchone()
        self._checked_at = now
        was, self.subscribed = self.subscribed, bool(row and row[0])
        if not self.subscribed:
            await self._forget()
            if was:
                log.info("webhooks_dispatch_idle", reason="no endpoint takes message.created")
        return self.subscribed

    async def _forget(self) -> None:
        """No group left to pin the streams (any worker may do it: nobody subscribes)."""
        keys = self.res.keys
        async with self.res.redis.pipeline(transaction=False) as pipe:
            for shard in self._shards:
                pipe.xgroup_destroy(keys.ingest(shard), GROUP)
            replies = await pipe.execute(raise_on_error=False)
        raise_outage(replies)  # a missing stream is an error too, and nothing to undo
        dropped = sum(1 for r in replies if r == 1)
        if dropped:
            log.info("webhooks_groups_destroyed", streams=dropped)
        self._ready = False
        self._claimed = False
        await self.release()

    async def _lease(self) -> bool:
        """Hold (renew or take) the dispatcher lease; whether we hold it."""
        now = time.monotonic()
        if now < self._valid_until and now - self._renewed_at < self.lease_ttl / 3:
            return True
        won = await self._hold(
            keys=[self.res.keys.webhooks_dispatcher()],
            args=[self.token, int(self.lease_ttl * 1000)],
        )
        if not won:
            if self._valid_until:
                log.warning("webhooks_dispatch_lease_lost", consumer=self.consumer)
            self._valid_until = 0.0
            self._claimed = False
            return False
        if not self._valid_until:
            log.info("webhooks_dispatch_lease_won", consumer=self.consumer)
        self._renewed_at = now
        self._valid_until = now + self.lease_ttl
        return True

    async def release(self) -> None:
        """Give up the lease now, so another worker's dispatcher takes over at once."""
        if self._valid_until:
            self._valid_until = 0.0
            self._claimed = False
            await self._release(keys=[self.res.keys.webhooks_dispatcher()], args=[self.token])

    async def _ensure_groups(self) -> None:
        """Each stream's group, created at "$" (MKSTREAM: a shard may have no stream yet)."""
        keys = self.res.keys
        async with self.res.redis.pipeline(transaction=False) as pipe:
            for shard in self._shards:
                pipe.xgroup_create(keys.ingest(shard), GROUP, id="$", mkstream=True)
            replies = await pipe.execute(raise_on_error=False)
        raise_outage(replies)
        for reply in replies:
            if isinstance(reply, ResponseError) and "BUSYGROUP" not in str(reply):
                raise reply
        made = sum(1 for r in replies if not isinstance(r, ResponseError))
        if made:
            log.info("webhooks_groups_created", streams=made)
        self._ready = True

    # -- one round -------------------------------------------------------------------------

    async def step(self, block: float | None = None) -> int:
        """One round: take over pending entries, else read new ones (waiting up to `block`
        seconds); emit and acknowledge them. The entries handled, or -1 when this dispatcher
        has nothing to do (nobody subscribes, another worker holds the lease)."""
        if not await self.check() or not await self._lease():
            return -1
        if not self._ready:
            await self._ensure_groups()
        if not self._claimed:
            entries = await self._claim()
            if entries:
                return await self._handle(entries)
            self._claimed = True
            await self._tidy()
        return await self._handle(await self._read(block))

    async def _claim(self) -> Entries:
        """The group's pending entries, whoever read them (ours from before a failure or a
        restart, a dead holder's), taken over oldest first. Entries trimmed meanwhile are
        dropped from the pending lists by XAUTOCLAIM itself."""
        keys = self.res.keys
        counts = shares(self._shards, self._budget, set())
        async with self.res.redis.pipeline(transaction=False) as pipe:
            for shard in self._shards:
                pipe.xautoclaim(
                    keys.ingest(shard), GROUP, self.consumer, 0, start_id="0-0", count=counts[shard]
                )
            replies = await pipe.execute(raise_on_error=False)
        if self._lost_group(replies):
            return {}
        return {s: r[1] for s, r in zip(self._shards, replies, strict=True) if r[1]}

    async def _tidy(self) -> None:
        """Remove other consumers with nothing pending (workers gone, renamed)."""
        keys = self.res.keys
        async with self.res.redis.pipeline(transaction=False) as pipe:
            for shard in self._shards:
                pipe.xinfo_consumers(keys.ingest(shard), GROUP)
            replies = await pipe.execute(raise_on_error=False)
        if self._lost_group(replies):
            return
        async with self.res.redis.pipeline(transaction=False) as pipe:
            for shard, consumers in zip(self._shards, replies, strict=True):
                for consumer in consumers:
                    name = consumer["name"]
                    if name != self.consumer.encode() and not consumer["pending"]:
                        pipe.xgroup_delconsumer(keys.ingest(shard), GROUP, name)
            await pipe.execute(raise_on_error=False)

    async def _read(self, block: float | None) -> Entries:
        """New entries within the read budget: after a read that found some, one read per
        shard without waiting, sized by `shares`; else one read of every stream that waits up
        to `block` seconds for the first entry."""
        if self._full or self._more:
            got = await self._read_shards(shares(self._shards, self._budget, self._full))
            if got:
                return got
        counts = shares(self._shards, self._budget, set())
        keys = self.res.keys
        streams: dict[Any, Any] = {keys.ingest(s): ">" for s in self._shards}
        try:
            reply: Any = await self.res.redis.xreadgroup(
                GROUP,
                self.consumer,
                streams,
                count=counts[0],
                block=max(1, int(block * 1000)) if block else None,
            )
        except ResponseError as exc:
            # NOGROUP: the group went away (nobody subscribed for a moment, Redis lost it);
            # UNBLOCKED: a stream went away while the read waited. Made again at the next step.
            if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                raise
            self._ready = False
            return {}
        named = {keys.ingest(s).encode(): s for s in self._shards}
        return self._note({named[name]: entries for name, entries in reply or []}, counts)

    async def _read_shards(self, counts: dict[int, int]) -> Entries:
        keys = self.res.keys
        async with self.res.redis.pipeline(transaction=False) as pipe:
            for shard, count in counts.items():
                pipe.xreadgroup(GROUP, self.consumer, {keys.ingest(shard): ">"}, count=count)
            replies = await pipe.execute(raise_on_error=False)
        if self._lost_group(replies):
            return {}
        got = {s: r[0][1] for s, r in zip(counts, replies, strict=True) if r and r[0][1]}
        return self._note(got, counts)

    def _note(self, got: Entries, counts: dict[int, int]) -> Entries:
        """Remember which shards filled their count (they get most of the next read)."""
        self._full = {s for s, entries in got.items() if len(entries) >= counts[s]}
        self._more = bool(self._full)
        return got

    async def _handle(self, got: Entries) -> int:
        """Emit the events of `got` in one transaction, then acknowledge the entries."""
        if not got:
            return 0
        events = [
            message_event(fields[b"c"].decode(), fields[b"m"])
            for entries in got.values()
            for _, fields in entries
            if fields and b"m" in fields
        ]
        if time.monotonic() >= self._valid_until:
            # Our lease ran out while we read: the new holder takes these entries over.
            self._claimed = False
            return 0
        if events:
            async with self.res.connection() as conn, conn.transaction():
                jobs = await emit(conn, events, batch_max=self.res.config.webhooks.batch_max)
            self.stats.emits += 1
            self.stats.events += len(events)
            self.stats.jobs += jobs
            metrics.WEBHOOK_DISPATCHED.inc(len(events))
        if self._crash_at == "after_emit" and events:
            log.warning("webhooks_dispatch_crash_injected", step="after_emit")
            os.kill(os.getpid(), signal.SIGKILL)
        if self.on_step is not None:
            self.on_step("after_emit")
        keys = self.res.keys
        async with self.res.redis.pipeline(transaction=False) as pipe:
            for shard, entries in got.items():
                pipe.xack(keys.ingest(shard), GROUP, *[entry_id for entry_id, _ in entries])
            replies = await pipe.execute(raise_on_error=False)
        self._lost_group(replies)
        return sum(len(entries) for entries in got.values())

    def _lost_group(self, replies: list[Any]) -> bool:
        """Raise the outage among `replies`; whether a group is gone (NOGROUP), in which case it
        is made again at the next step."""
        raise_outage(replies)
        for reply in replies:
            if isinstance(reply, ResponseError):
                if "NOGROUP" not in str(reply) and "no such key" not in str(reply):
                    raise reply
                self._ready = False
                return True
        return False

    # -- the loop --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds until `stop`; failures of PostgreSQL or Redis are logged and waited out with
        jittered back-off (the entries stay pending in Redis and are taken over again)."""
        delay = BACKOFF_FIRST
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    done = await self.step(READ_BLOCK)
                except OUTAGES as exc:
                    wait = delay * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not secrecy
                    log.warning(
                        "webhooks_dispatch_retry",
                        error=type(exc).__name__,
                        detail=str(exc)[:200],
                        retry_in=round(wait, 3),
                    )
                    self._claimed = False  # what was read stays pending: take it over again
                    await _sleep(stop, wait)
                    delay = min(BACKOFF_CAP, delay * 2)
                    continue
                delay = BACKOFF_FIRST
                if done < 0:
                    await _sleep(stop, min(self.check_interval, self.lease_ttl / 3))
                elif done and not self._more:
                    await _sleep(stop, READ_INTERVAL - (time.monotonic() - started))
        finally:
            with contextlib.suppress(*OUTAGES, TimeoutError):
                async with asyncio.timeout(2.0):
                    await self.release()


async def run_dispatcher(res: Resources, stop: asyncio.Event) -> None:
    """The worker's background task. When it stops, so does the worker: it closes the kept
    delivery clients then (those in use when their delivery ends)."""
    try:
        await Dispatcher(res).run(stop)
    finally:
        await close_clients()


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    if seconds > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
