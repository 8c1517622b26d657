"""What waits to be flushed, per shard: read from Redis alone, for probes and `appliance status`.

The flusher trims a shard's ingest stream to what is not yet indexed, so the stream's length is
the shard's backlog and its first entry (ids are Redis's clock in milliseconds) the oldest
message not yet durable in S3. Ages use Redis's own clock (TIME), never this host's.
"""

from __future__ import annotations

from typing import Any

import msgspec
import redis.asyncio as aioredis

from appliance.redis_keys import Keys


class ShardBacklog(msgspec.Struct, frozen=True):
    shard: int
    entries: int
    oldest_s: float  # age of the oldest entry not yet flushed (0 when none)


async def backlog(redis: aioredis.Redis, keys: Keys) -> list[ShardBacklog]:
    """Every shard's backlog, in one pipelined round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.time()
        for shard in range(keys.shards):
            pipe.xlen(keys.ingest(shard))
            pipe.xrange(keys.ingest(shard), count=1)
        replies: list[Any] = await pipe.execute()
    seconds, micros = replies[0]
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    out = []
    for shard in range(keys.shards):
        entries, first = replies[1 + 2 * shard], replies[2 + 2 * shard]
        oldest = 0.0
        if first:
            oldest = max(0.0, (now_ms - int(first[0][0].split(b"-", 1)[0])) / 1000)
        out.append(ShardBacklog(shard, int(entries), round(oldest, 3)))
    return out


def summary(shards: list[ShardBacklog]) -> str:
    """One line for a probe: the total and the oldest, with its shard."""
    total = sum(s.entries for s in shards)
    if not total:
        return "nothing waiting to be flushed"
    oldest = max(shards, key=lambda s: s.oldest_s)
    return (
        f"{total} messages waiting to be flushed, oldest {oldest.oldest_s:.1f}s"
        f" (shard {oldest.shard})"
    )
