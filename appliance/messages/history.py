"""Reading history: pages, single messages and catch-up, across the Redis tail and S3.

The tail stream's ids are `<seq>-0`, so a seq range is a stream range; older messages are in
segment blocks the index locates (appliance/segments/index.py). One page shape,
`{messages, next_cursor, prev_cursor}`, whatever tier answers. Newest first by default
(`before`); `after` pages forward, oldest first. A cursor is an opaque token for "continue
before/after seq N".
"""

from __future__ import annotations

import asyncio
import base64
import re
from bisect import bisect_left
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Literal, cast

import msgspec
import psycopg
import redis.asyncio as aioredis
import structlog
from redis.exceptions import ResponseError

from appliance import metrics
from appliance.errors import ApplianceError, Invalid, NotFound, Unavailable
from appliance.logthrottle import Throttle
from appliance.messages.blocks import BlockCache
from appliance.redis_keys import Keys
from appliance.segments import index
from appliance.segments.format import Block, Record, SegmentCorrupt
from appliance.segments.index import BlockRow
from appliance.storage import StorageError

log = structlog.get_logger()
_STORAGE_LOG = Throttle()

MAX_LIMIT = 200
DEFAULT_LIMIT = 50
# Seqs come from Redis INCR (signed 64-bit); larger numbers are not stream ids Redis accepts.
MAX_SEQ = 2**63 - 1
Direction = Literal["before", "after"]
# Numbers from paths, query strings and cursors: ASCII digits only. Python's int() also takes
# other scripts' digits (U+FF11, U+0661), signs, spaces and underscores ("1_0" is 10).
_DIGITS = re.compile(r"[0-9]{1,20}\Z")


def number(text: str, field: str) -> int:
    """`text` as a non-negative integer, if it is 1-20 ASCII digits; else Invalid naming `field`."""
    if not _DIGITS.match(text):
        raise Invalid("must be a whole number written in ASCII digits 0-9", field=field)
    return int(text)


@dataclass(frozen=True)
class Position:
    direction: Direction
    seq: int | None  # None: from the newest


def encode_cursor(direction: Direction, seq: int) -> str:
    return base64.urlsafe_b64encode(f"{direction[0]}{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> Position:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        directions: dict[str, Direction] = {"b": "before", "a": "after"}
        direction = directions[text[0]]
        seq = number(text[1:], "cursor")
    # ValueError covers binascii.Error, UnicodeDecodeError and a str that is not ASCII.
    except (ValueError, KeyError, IndexError, Invalid):
        raise Invalid("is not a cursor returned by this API", field="cursor") from None
    if seq > MAX_SEQ:
        raise Invalid("is not a cursor returned by this API", field="cursor")
    return Position(direction, seq)


def position(before: int | None, after: int | None, cursor: str | None) -> Position:
    values = (("before", before), ("after", after), ("cursor", cursor or None))
    given = [name for name, value in values if value is not None]
    if len(given) > 1:
        raise Invalid(f"give at most one of before, after, cursor (got {given})", field=given[1])
    if cursor:
        return decode_cursor(cursor)
    for name, value in (("before", before), ("after", after)):
        if value is not None and not 0 <= value <= MAX_SEQ:
            raise Invalid(f"must be a seq between 0 and {MAX_SEQ}", field=name)
    if after is not None:
        return Position("after", after)
    return Position("before", before)


Entries = list[tuple[bytes, dict[bytes, bytes]]]
Message = tuple[int, bytes]  # (seq, the message JSON as published)
Connect = Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]]
# Index rows asked for at once. The blocks a page needs among them are fetched concurrently: a
# quiet conversation's uncompacted day is a block per message, one ranged GET each.
ROWS = 16
# S3's answer for an object that is not there: a flush object compacted away and deleted after
# the index was read. The index, read again, names the block's new home.
_GONE = frozenset({"NoSuchKey", "404", "NotFound"})
_RETRIES = 3
_PAGE_HEAD = b'{"messages":['


class _Identified(msgspec.Struct):
    id: str


_decode_identified = msgspec.json.Decoder(_Identified).decode


def message_id(message: bytes) -> str:
    """The `id` of an encoded message."""
    return _decode_identified(message).id


def _seq(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[0])


def _record_seq(record: Record) -> int:
    return record.seq


def _json_str(value: str | None) -> bytes:
    return b"null" if value is None else f'"{value}"'.encode()


def page_json(messages: list[Message], at: Position, limit: int) -> bytes:
    """The page for `messages` (in page order) read at `at`: bodies passed through as bytes."""
    next_cursor = prev_cursor = None
    if messages:
        first, last = messages[0][0], messages[-1][0]
        full = len(messages) == limit
        if at.direction == "before":
            next_cursor = encode_cursor("before", last) if full else None
            prev_cursor = encode_cursor("after", first)
        else:
            next_cursor = encode_cursor("after", last) if full else None
            prev_cursor = encode_cursor("before", first)
    return b"".join(
        (
            _PAGE_HEAD,
            b",".join(message for _, message in messages),
            b'],"next_cursor":',
            _json_str(next_cursor),
            b',"prev_cursor":',
            _json_str(prev_cursor),
            b"}",
        )
    )


class History:
    """The one reader of every tier: the Redis tail (newest), flush segments and compacted
    history objects (S3, located by the PostgreSQL index). Pages, single messages and the
    WebSocket catch-up all read through it, with one shape whatever tier answers.

    Order of reads: the tail FIRST, then the index. The flusher indexes a record before it
    trims it from the tail, so a record trimmed after the tail read is in the index by the time
    the index is read: nothing falls between the two. Newest first (`before`): the tail from
    the top down; if that is short of the limit and the lowest seq seen is above 1, the index
    goes on strictly below it. Oldest first (`after`): the tail from after+1; when its first seq
    is not after+1 (or it is empty), the index supplies after+1 up to (not including) the tail's
    first seq, then the tail follows. Each seq comes once, in order; a seq neither tier holds
    (lost with Redis, or past retention) is skipped, never made up. A page the tail answers
    alone touches neither PostgreSQL nor S3, so it is served while they are down.
    """

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, connect: Connect, blocks: BlockCache
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._connect = connect
        self._blocks = blocks

    async def page(self, conversation: str, at: Position, limit: int) -> bytes:
        """The page as JSON bytes (message bodies are passed through, never re-encoded)."""
        if not 1 <= limit <= MAX_LIMIT:
            raise Invalid(f"must be between 1 and {MAX_LIMIT}", field="limit")
        if at.direction == "before":
            messages = await self._newest_first(conversation, at.seq, limit)
        else:
            messages = await self.replay(conversation, at.seq or 0, limit)
        return page_json(messages, at, limit)

    async def one(self, conversation: str, seq: int) -> bytes:
        if not 1 <= seq <= MAX_SEQ:
            raise Invalid(f"must be a seq between 1 and {MAX_SEQ}", field="seq")
        entries = await _range(
            self._redis, self._keys.tail(conversation), f"{seq}-0", f"{seq}-0", 1
        )
        if entries:
            metrics.HISTORY_READS.labels("tail").inc()
            return entries[0][1][b"m"]
        for attempt in range(_RETRIES + 1):
            async with self._connect() as conn:
                row = await index.block_at(conn, conversation, seq)
            if row is None:
                break
            block = await self._block(row, retry=attempt < _RETRIES)
            if block is None:
                continue
            found = _from(block.records, seq)
            if found < len(block.records) and block.records[found].seq == seq:
                metrics.HISTORY_READS.labels("segment").inc()
                return block.records[found].payload
            break
        raise NotFound(f"no message {seq} in {conversation!r}", field="seq")

    async def replay(self, conversation: str, after: int, limit: int) -> list[Message]:
        """Up to `limit` messages with seq > after, oldest first, from whichever tiers hold
        them (see the class docstring for the order of reads)."""
        tail = self._keys.tail(conversation)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xrange(tail, f"({after}-0", "+", count=limit)
            pipe.get(self._keys.seq(conversation))
            entries, counter = cast(tuple[Entries, bytes | None], await pipe.execute())
        recent = [(_seq(entry_id), fields[b"m"]) for entry_id, fields in entries]
        if recent and recent[0][0] == after + 1:
            return self._counted(recent, [])
        if not recent and counter is not None and int(counter) <= after:
            return []  # nothing was published after `after`, in any tier
        upper = recent[0][0] if recent else MAX_SEQ + 1
        older = await self._indexed_after(conversation, after, upper, limit)
        return self._counted(recent, older, limit)

    async def head(self, conversation: str) -> int:
        """The newest seq (0 when none): the Redis counter; without it, the tail's last
        generated id (which outlives trimming), as the publish script re-seeds it; without the
        tail too (Redis lost its data), the highest indexed seq, where seqs go on from."""
        value = await self._redis.get(self._keys.seq(conversation))
        if value is not None:
            return int(value)
        try:
            info = await self._redis.xinfo_stream(self._keys.tail(conversation))
        except ResponseError:  # no such key
            async with self._connect() as conn:
                return await index.durable_head(conn, conversation)
        return _seq(info["last-generated-id"])

    async def tail_id(self, conversation: str, seq: int) -> str | None:
        """The id of message `seq` while the Redis tail holds it (the newest always is)."""
        if not 1 <= seq <= MAX_SEQ:
            return None
        entries = await _range(
            self._redis, self._keys.tail(conversation), f"{seq}-0", f"{seq}-0", 1
        )
        return message_id(entries[0][1][b"m"]) if entries else None

    # -- reading ----------------------------------------------------------------------------

    async def _newest_first(
        self, conversation: str, below: int | None, limit: int
    ) -> list[Message]:
        if below is not None and below <= 1:
            return []  # nothing comes before the first seq (1)
        top = f"({below}-0" if below is not None else "+"
        entries = await _range(
            self._redis, self._keys.tail(conversation), "-", top, limit, reverse=True
        )
        recent = [(_seq(entry_id), fields[b"m"]) for entry_id, fields in entries]
        low = recent[-1][0] if recent else (MAX_SEQ + 1 if below is None else below)
        if len(recent) == limit or low <= 1:
            return self._counted(recent, [])
        older = await self._indexed_before(conversation, low, limit - len(recent))
        return self._counted(recent, older)

    def _counted(
        self, tail: list[Message], segments: list[Message], limit: int | None = None
    ) -> list[Message]:
        """`tail` and `segments` joined in page order (segments after the tail newest first,
        before it oldest first, as `limit` says) and counted by tier."""
        if limit is None:
            out = tail + segments
        else:
            tail = tail[: limit - len(segments)]
            out = segments + tail
        metrics.HISTORY_READS.labels("tail").inc(len(tail))
        if segments:
            metrics.HISTORY_READS.labels("segment").inc(len(segments))
        return out

    async def _indexed_before(self, conversation: str, below: int, limit: int) -> list[Message]:
        """Up to `limit` indexed messages with seq < below, newest first."""
        out: list[Message] = []
        retries = 0
        while len(out) < limit and below > 1:
            async with self._connect() as conn:
                found = await index.blocks_before(conn, conversation, below, ROWS)
            rows = _needed(found, limit - len(out))
            fetched = await self._fetch(rows, retry=retries < _RETRIES)
            for row, block in zip(rows, fetched, strict=True):
                if block is None:
                    retries += 1
                    break  # compacted away meanwhile: ask the index again from `below`
                records = block.records
                for record in reversed(records[: _from(records, below)]):
                    out.append((record.seq, record.payload))
                    if len(out) == limit:
                        return out
                below = min(below, row.first_seq)
            else:
                if len(rows) == len(found) < ROWS:  # every row there is was read
                    return out
        return out

    async def _fetch(self, rows: list[BlockRow], retry: bool) -> list[Block | None]:
        """The blocks of `rows`, fetched concurrently (each through the cache)."""
        if len(rows) == 1:
            return [await self._block(rows[0], retry)]
        return list(await asyncio.gather(*(self._block(row, retry) for row in rows)))

    async def _indexed_after(
        self, conversation: str, after: int, upper: int, limit: int
    ) -> list[Message]:
        """Up to `limit` indexed messages with after < seq < upper, oldest first."""
        out: list[Message] = []
        retries = 0
        while len(out) < limit and after + 1 < upper:
            async with self._connect() as conn:
                found = await index.blocks_after(conn, conversation, after, ROWS)
            below_upper = [r for r in found if r.first_seq < upper]
            rows = _needed(below_upper, limit - len(out))
            fetched = await self._fetch(rows, retry=retries < _RETRIES)
            for row, block in zip(rows, fetched, strict=True):
                if block is None:
                    retries += 1
                    break  # compacted away meanwhile: ask the index again from `after`
                records = block.records
                for record in records[_from(records, after + 1) :]:
                    if record.seq >= upper:
                        return out
                    out.append((record.seq, record.payload))
                    if len(out) == limit:
                        return out
                after = max(after, row.last_seq)
            else:
                # Every row below `upper` was read, and there are no more (or the rest is not).
                if len(rows) == len(below_upper) and (
                    len(below_upper) < len(found) or len(found) < ROWS
                ):
                    return out
        return out

    async def _block(self, row: BlockRow, retry: bool = False) -> Block | None:
        """The decoded block of `row`; None when its object is gone and `retry` allows asking
        the index again. A corrupt block is a logged 500 whose response names nothing."""
        try:
            return await self._blocks.get(row.object_key, row.entry)
        except StorageError as exc:
            if exc.s3_code == "InvalidRange":  # the object ends before the block the row names
                reason = "object truncated: it ends before this block"
                raise _corrupt(row, row.byte_offset, reason) from None
            if exc.s3_code in _GONE:
                if retry:
                    return None
                log.error("history_block_missing", object=row.object_key, offset=row.byte_offset)
                raise ApplianceError("a stored history block could not be read") from None
            # S3's detail (endpoint, object) is for the log; once per window in an outage.
            _STORAGE_LOG(
                log.warning,
                "history_storage_unavailable",
                exc.operation,
                operation=exc.operation,
                error=exc.message,
            )
            raise Unavailable(
                "s3 is unavailable, retry later", code="storage", headers={"Retry-After": "1"}
            ) from None
        except SegmentCorrupt as exc:
            raise _corrupt(row, exc.offset, exc.reason) from None


def _corrupt(row: BlockRow, at: int, reason: str) -> ApplianceError:
    """A damaged block, logged with where and why; the 500 it becomes names nothing."""
    log.error(
        "history_block_corrupt",
        conversation=row.conversation,
        object=row.object_key,
        offset=row.byte_offset,
        at=at,
        reason=reason,
    )
    return ApplianceError("a stored history block could not be read")


def _needed(rows: list[BlockRow], wanted: int) -> list[BlockRow]:
    """The first rows (in reading order) whose records can fill `wanted` messages: the blocks
    worth fetching at once. The first row may hold fewer in range, so the caller asks again."""
    total = 0
    for n, row in enumerate(rows, 1):
        total += row.records
        if total >= wanted:
            return rows[:n]
    return rows


def _from(records: list[Record], seq: int) -> int:
    """The index of the first record with a seq at or above `seq` (records ascend by seq)."""
    return bisect_left(records, seq, key=_record_seq)


async def _range(
    redis: aioredis.Redis, key: str, low: str, high: str, count: int, reverse: bool = False
) -> Entries:
    """XRANGE/XREVRANGE from `low` to `high` (typed: this client never decodes responses)."""
    if reverse:
        return cast(Entries, await redis.xrevrange(key, high, low, count=count))
    return cast(Entries, await redis.xrange(key, low, high, count=count))
