"""Redis: the client factory and the one place key names are built.

Keys are `<prefix>:<...>`. Everything of one conversation, and the ingest stream of its shard,
carries the shard's hash tag (`{s7}`), so a Lua script touching them all runs on Redis Cluster
too. The shard of a conversation is fixed by a stable hash of its id and `[segments] shards`.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass

import redis.asyncio as aioredis

from appliance.config.model import RedisSection


def client(section: RedisSection, name: str) -> aioredis.Redis:
    """A pooled asyncio client; the caller closes it with `aclose()`."""
    return aioredis.Redis.from_url(
        section.url.get_secret_value(),
        socket_connect_timeout=section.connect_timeout,
        socket_timeout=section.connect_timeout,
        health_check_interval=30,
        client_name=f"appliance-{name}",
        decode_responses=False,
    )


def shard_of(conversation: str, shards: int) -> int:
    """Stable across processes and releases (crc32, not Python's salted hash)."""
    return zlib.crc32(conversation.encode()) % shards


@dataclass(frozen=True)
class Keys:
    prefix: str
    shards: int

    def tag(self, shard: int) -> str:
        if not 0 <= shard < self.shards:
            raise ValueError(f"shard {shard} outside 0..{self.shards - 1}")
        return f"{{s{shard}}}"

    def _conversation(self, conversation: str, kind: str) -> str:
        return (
            f"{self.prefix}:{self.tag(shard_of(conversation, self.shards))}:{kind}:{conversation}"
        )

    def seq(self, conversation: str) -> str:
        return self._conversation(conversation, "seq")

    def tail(self, conversation: str) -> str:
        return self._conversation(conversation, "tail")

    def channel(self, conversation: str) -> str:
        return self._conversation(conversation, "chan")

    def ingest(self, shard: int) -> str:
        return f"{self.prefix}:{self.tag(shard)}:ingest"

    def idempotency(self, conversation: str, principal: str, key: str) -> str:
        # Principal and key may both hold ':': hashed as a pair, they never run into each other.
        pair = hashlib.sha256(f"{len(principal)}:{principal}{key}".encode()).hexdigest()
        return self._conversation(conversation, f"idem:{pair}")

    def receipts(self, conversation: str, kind: str) -> str:
        return self._conversation(conversation, f"rcpt:{kind}")

    def presence(self, conversation: str) -> str:
        return self._conversation(conversation, "presence")

    def sockets(self, principal: str) -> str:
        return f"{self.prefix}:sockets:{principal}"

    def rate(self, principal: str) -> str:
        return f"{self.prefix}:rate:{principal}"

    def invalidations(self) -> str:
        return f"{self.prefix}:invalidate"

    def ingest_of(self, conversation: str) -> str:
        return self.ingest(shard_of(conversation, self.shards))

    def heartbeat_prefix(self) -> str:
        return f"{self.prefix}:hb:"

    def heartbeat(self, program: str, instance: str) -> str:
        return f"{self.heartbeat_prefix()}{program}:{instance}"

    def ping_result(self, token: str) -> str:
        return f"{self.prefix}:diag:ping:{token}"
