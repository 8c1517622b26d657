"""Reading history: pages and single messages, from the Redis tail.

The tail stream's ids are `<seq>-0`, so a seq range is a stream range. One page shape,
`{messages, next_cursor, prev_cursor}`, which the segment reader extends without changing it.
Newest first by default (`before`); `after` pages forward, oldest first. A cursor is an opaque
token for "continue before/after seq N".
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Literal, cast

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from appliance.errors import Invalid, NotFound
from appliance.redis_keys import Keys

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


def _seq(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[0])


async def _range(
    redis: aioredis.Redis, key: str, low: str, high: str, count: int, reverse: bool = False
) -> Entries:
    """XRANGE/XREVRANGE from `low` to `high` (typed: this client never decodes responses)."""
    if reverse:
        return cast(Entries, await redis.xrevrange(key, high, low, count=count))
    return cast(Entries, await redis.xrange(key, low, high, count=count))


async def page(
    redis: aioredis.Redis, keys: Keys, conversation: str, at: Position, limit: int
) -> bytes:
    """The page as JSON bytes (message bodies are passed through, never re-encoded)."""
    if not 1 <= limit <= MAX_LIMIT:
        raise Invalid(f"must be between 1 and {MAX_LIMIT}", field="limit")
    tail = keys.tail(conversation)
    if at.direction == "before" and at.seq == 0:
        entries = []  # nothing comes before the first seq (1)
    elif at.direction == "before":
        top = f"({at.seq}-0" if at.seq is not None else "+"
        entries = await _range(redis, tail, "-", top, limit, reverse=True)
    else:
        entries = await _range(redis, tail, f"({at.seq}-0", "+", limit)
    messages = [fields[b"m"] for _, fields in entries]
    seqs = [_seq(entry_id) for entry_id, _ in entries]
    next_cursor = prev_cursor = None
    if seqs:
        if at.direction == "before":
            next_cursor = encode_cursor("before", seqs[-1]) if len(seqs) == limit else None
            prev_cursor = encode_cursor("after", seqs[0])
        else:
            next_cursor = encode_cursor("after", seqs[-1]) if len(seqs) == limit else None
            prev_cursor = encode_cursor("before", seqs[0])
    return b"".join(
        (
            b'{"messages":[',
            b",".join(messages),
            b'],"next_cursor":',
            _json_str(next_cursor),
            b',"prev_cursor":',
            _json_str(prev_cursor),
            b"}",
        )
    )


def _json_str(value: str | None) -> bytes:
    return b"null" if value is None else f'"{value}"'.encode()


async def one(redis: aioredis.Redis, keys: Keys, conversation: str, seq: int) -> bytes:
    if not 1 <= seq <= MAX_SEQ:
        raise Invalid(f"must be a seq between 1 and {MAX_SEQ}", field="seq")
    entries = await _range(redis, keys.tail(conversation), f"{seq}-0", f"{seq}-0", 1)
    if not entries:
        raise NotFound(f"no message {seq} in {conversation!r}", field="seq")
    return entries[0][1][b"m"]


async def replay(
    redis: aioredis.Redis, keys: Keys, conversation: str, after: int, limit: int
) -> list[tuple[int, bytes]]:
    """Up to `limit` messages with seq > after, oldest first, as (seq, message JSON)."""
    entries = await _range(redis, keys.tail(conversation), f"({after}-0", "+", limit)
    return [(_seq(entry_id), fields[b"m"]) for entry_id, fields in entries]


async def head(redis: aioredis.Redis, keys: Keys, conversation: str) -> int:
    """The newest seq (0 when none). Without the counter, the tail's last generated id, which
    outlives trimming (the newest entry may be gone), as the publish script re-seeds it."""
    value = await redis.get(keys.seq(conversation))
    if value is not None:
        return int(value)
    try:
        info = await redis.xinfo_stream(keys.tail(conversation))
    except ResponseError:  # no such key
        return 0
    return _seq(info["last-generated-id"])
