"""What a purged conversation leaves of messages in Redis: its tail and its seq counter.

Idempotency keys are not looked for (that would be a SCAN of the keyspace): they expire within
`[messages] idempotency_window` by themselves.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from appliance.redis_keys import Keys


async def forget_conversation(redis: aioredis.Redis, keys: Keys, conversation: str) -> int:
    """Delete the conversation's tail and counter; the number of keys deleted."""
    deleted: int = await redis.delete(keys.tail(conversation), keys.seq(conversation))
    return deleted
