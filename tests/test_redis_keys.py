"""Key naming and hash tags, checked against real Redis (CLUSTER KEYSLOT) and a real Lua script."""

from __future__ import annotations

from typing import Any

import pytest
from redis.crc import key_slot

from appliance.config.model import RedisSection
from appliance.redis_keys import Keys, client, shard_of


def test_shard_is_stable_and_in_range() -> None:
    # crc32 is fixed across processes and releases (Python's hash() is salted per process).
    assert shard_of("team-42", 16) == shard_of("team-42", 16)
    assert {shard_of(f"c{i}", 16) for i in range(500)} == set(range(16))


def test_conversation_keys_share_their_shard_tag() -> None:
    keys = Keys("app", 16)
    shard = shard_of("team-42", 16)
    tag = f"{{s{shard}}}"
    for key in (keys.seq("team-42"), keys.tail("team-42"), keys.channel("team-42"),
                keys.ingest(shard)):  # fmt: skip
        assert key.startswith("app:")
        assert tag in key
    assert keys.seq("team-42") != keys.tail("team-42")


def test_tag_rejects_unknown_shard() -> None:
    with pytest.raises(ValueError, match="outside"):
        Keys("app", 4).tag(4)


def test_one_cluster_slot_per_conversation_and_its_ingest_stream() -> None:
    """redis-py's own Redis Cluster slot function (CRC16 with hash tags) puts them together."""
    keys = Keys("app", 16)
    for conversation in ("team-42", "a", "x" * 128, "dm:alice:bob"):
        shard = shard_of(conversation, 16)
        names = [keys.seq(conversation), keys.tail(conversation), keys.channel(conversation),
                 keys.ingest(shard)]  # fmt: skip
        assert len({key_slot(n.encode()) for n in names}) == 1


async def test_lua_script_over_conversation_keys(settings: dict[str, Any]) -> None:
    """A script touching seq, tail and ingest keys of one shard runs in one call."""
    redis = client(RedisSection.model_validate(settings["redis"]), "test")
    keys = Keys(settings["redis"]["key_prefix"], 16)
    script = redis.register_script(
        "local s = redis.call('INCR', KEYS[1]);"
        "redis.call('XADD', KEYS[2], '*', 'seq', s);"
        "redis.call('XADD', KEYS[3], '*', 'seq', s);"
        "return s"
    )
    shard = shard_of("lua-conv", 16)
    names = [keys.seq("lua-conv"), keys.tail("lua-conv"), keys.ingest(shard)]
    try:
        assert await script(keys=names) == 1
        assert await script(keys=names) == 2
        assert await redis.xlen(names[1]) == 2
    finally:
        await redis.delete(*names)
        await redis.aclose()
