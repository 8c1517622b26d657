"""Cache invalidation across api processes: one Redis pub/sub channel, tiny JSON events.

Whoever changes an API key, a conversation or a membership announces it; every api process's hub
hears it within milliseconds and drops what it cached (and re-checks live sockets). If the hub's
connection drops, it clears every cache on reconnect, so a missed event costs a lookup, never a
stale grant beyond the cache TTL.
"""

from __future__ import annotations

from typing import Literal

import msgspec
import redis.asyncio as aioredis

from appliance.redis_keys import Keys


class Invalidation(msgspec.Struct, frozen=True):
    kind: Literal["key", "conversation", "member"]
    id: str  # key id or conversation id
    principal: str | None = None  # for "member"


def encode(event: Invalidation) -> bytes:
    return msgspec.json.encode(event)


def decode(payload: bytes) -> Invalidation:
    return msgspec.json.decode(payload, type=Invalidation)


async def announce(redis: aioredis.Redis, keys: Keys, event: Invalidation) -> None:
    await redis.publish(keys.invalidations(), encode(event))
