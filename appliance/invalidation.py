"""Cache invalidation across api processes: one Redis pub/sub channel, tiny JSON events.

Whoever changes an API key, a conversation or a membership announces it after the change is
committed; every api process's hub hears it within milliseconds and drops what it cached (and
re-checks live sockets). If the hub's connection drops, it clears every cache on reconnect, so a
missed event costs a lookup, never a stale grant beyond the cache TTL. For the same reason an
announcement that cannot be sent does not undo or fail the committed change: it is logged, and the
other processes notice within their cache TTL (`[auth] key_cache_ttl`, `membership_cache_ttl`).
"""

from __future__ import annotations

from typing import Literal

import msgspec
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from appliance.redis_keys import Keys

log = structlog.get_logger()


class Invalidation(msgspec.Struct, frozen=True):
    kind: Literal["key", "conversation", "member"]
    id: str  # key id or conversation id
    principal: str | None = None  # for "member"
    origin: str | None = None  # the announcing api process (its own events are applied already)


def encode(event: Invalidation) -> bytes:
    return msgspec.json.encode(event)


def decode(payload: bytes) -> Invalidation:
    return msgspec.json.decode(payload, type=Invalidation)


async def announce(redis: aioredis.Redis, keys: Keys, event: Invalidation) -> bool:
    """Publish `event`; False (and a warning in the log) when Redis did not take it."""
    try:
        await redis.publish(keys.invalidations(), encode(event))
    except RedisError as exc:
        log.warning(
            "invalidation_not_announced",
            kind=event.kind,
            id=event.id,
            error=type(exc).__name__,
            hint="other api processes notice the change within their cache TTL",
        )
        return False
    return True
