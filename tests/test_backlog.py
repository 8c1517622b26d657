"""The flush backlog read from Redis alone: per shard, entries and the oldest entry's age."""

from __future__ import annotations

import uuid

from appliance.redis_keys import Keys
from appliance.resources import Resources
from appliance.segments.backlog import ShardBacklog, backlog, summary


async def test_backlog_counts_entries_and_ages_the_oldest_by_redis_time(
    resources: Resources,
) -> None:
    keys = Keys(f"bl{uuid.uuid4().hex[:8]}", 3)
    redis = resources.redis
    seconds, _ = await redis.time()
    old = (int(seconds) - 90) * 1000
    await redis.xadd(keys.ingest(1), {"c": "a", "s": 1, "m": "{}"}, id=f"{old}-0")
    await redis.xadd(keys.ingest(1), {"c": "a", "s": 2, "m": "{}"})
    await redis.xadd(keys.ingest(2), {"c": "b", "s": 1, "m": "{}"})
    try:
        shards = await backlog(redis, keys)
        assert [(s.shard, s.entries) for s in shards] == [(0, 0), (1, 2), (2, 1)]
        assert shards[0].oldest_s == 0.0
        assert 89 <= shards[1].oldest_s < 200
        assert shards[2].oldest_s < 60
        line = summary(shards)
        assert line.startswith("3 messages waiting to be flushed, oldest ")
        assert line.endswith("(shard 1)")
    finally:
        await redis.delete(*(keys.ingest(s) for s in range(3)))


def test_an_empty_backlog_says_so() -> None:
    assert summary([ShardBacklog(0, 0, 0.0)]) == "nothing waiting to be flushed"
