"""What a purged conversation leaves of messages in Redis: its tail and its seq counter; and
whether its tail still holds messages the flusher has not indexed (a purge waits for them).

Idempotency keys are not looked for (that would be a SCAN of the keyspace): they expire within
`[messages] idempotency_window` by themselves.
"""

from __future__ import annotations

from typing import cast

import redis.asyncio as aioredis

from appliance.redis_keys import Keys


async def forget_conversation(redis: aioredis.Redis, keys: Keys, conversation: str) -> int:
    """Delete the conversation's tail and counter; the number of keys deleted."""
    deleted: int = await redis.delete(keys.tail(conversation), keys.seq(conversation))
    return deleted


async def last_seq(redis: aioredis.Redis, keys: Keys, conversation: str) -> int:
    """The newest seq in the conversation's tail (0: no tail)."""
    newest = cast(
        list[tuple[bytes, object]], await redis.xrevrange(keys.tail(conversation), count=1)
    )
    return int(newest[0][0].split(b"-")[0]) if newest else 0
