"""Redis: the client factory (and its connections) and the one place key names are built.

Keys are `<prefix>:<...>`. Everything of one conversation, and the ingest stream of its shard,
carries the shard's hash tag (`{s7}`), so a Lua script touching them all runs on Redis Cluster
too. The shard of a conversation is fixed by a stable hash of its id and `[segments] shards`.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from appliance.config.model import RedisSection


class _LostOnFailedSend(AbstractConnection):
    """A write to a connection that is gone raises what the event loop raises for it: uvloop
    (granian's loop) a RuntimeError ("... the handler is closed") once a reset from the server
    closed the transport, asyncio an AttributeError when a concurrent disconnect dropped the
    writer. redis-py drops the connection after any failed send but turns only OSError into a
    ConnectionError, so these escaped as bugs (a 500, a socket closed 1011) and were never
    retried. A packed command is bytes, so its write fails only for the connection's sake: a
    failure that left the connection dropped is a lost connection. Redis's own errors, and a
    failure that left the connection up (raised before the write), pass unchanged."""

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        try:
            await super().send_packed_command(command, check_health)
        except RedisError:
            raise
        except Exception as exc:
            if self.is_connected:
                raise
            raise RedisConnectionError(
                f"connection lost while writing ({type(exc).__name__}: {exc})"
            ) from exc


class _Tcp(_LostOnFailedSend, aioredis.Connection):
    pass


class _Tls(_LostOnFailedSend, aioredis.SSLConnection):
    pass


class _Unix(_LostOnFailedSend, aioredis.UnixDomainSocketConnection):
    pass


_CONNECTIONS: dict[type[AbstractConnection], type[AbstractConnection]] = {
    aioredis.Connection: _Tcp,
    aioredis.SSLConnection: _Tls,
    aioredis.UnixDomainSocketConnection: _Unix,
}


def client(section: RedisSection, name: str, *, reconnect: bool = True) -> aioredis.Redis:
    """A pooled asyncio client; the caller closes it with `aclose()`. With `reconnect=False`,
    redis-py never reconnects a connection by itself after an error (not even for a pub/sub):
    the caller does, for a connection that must not be reconnected from two tasks at once."""
    options: dict[str, Any] = {
        "socket_connect_timeout": section.connect_timeout,
        "socket_timeout": section.connect_timeout,
        "health_check_interval": 30,
        "client_name": f"appliance-{name}",
        "decode_responses": False,
        # What Redis.from_url does: the URL's own options win.
        **parse_url(section.url.get_secret_value()),
    }
    if not reconnect:
        options["retry"] = Retry(NoBackoff(), 0, supported_errors=())
    base = options.pop("connection_class", aioredis.Connection)
    pool = aioredis.ConnectionPool(connection_class=_CONNECTIONS[base], **options)
    return aioredis.Redis.from_pool(pool)


def raise_outage(replies: Iterable[Any]) -> None:
    """Raise the first of a pipeline's replies (run with `raise_on_error=False`) that says Redis
    did not answer (lost connection, timeout); its other errors (NOGROUP, BUSYGROUP...) are
    the caller's to read."""
    for reply in replies:
        if isinstance(reply, RedisConnectionError | RedisTimeoutError):
            raise reply


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

    def flushers(self) -> str:
        """Live flushers, scored by when each stops counting (shard fair shares)."""
        return f"{self.prefix}:flushers"

    def webhooks_dispatcher(self) -> str:
        """The lease of the one message.created dispatcher reading the ingest streams."""
        return f"{self.prefix}:webhooks:dispatcher"

    def seq_pattern(self) -> str:
        """A SCAN pattern matching every conversation's seq counter (ids never hold braces,
        so `}:seq:` is the tag's end)."""
        escaped = "".join(f"\\{ch}" if ch in "*?[]\\" else ch for ch in self.prefix)
        return f"{escaped}:{{s*}}:seq:*"

    def reconcile_cursor(self) -> str:
        """Where the reconcile schedule's SCAN resumes at its next run."""
        return f"{self.prefix}:reconcile:cursor"

    def heartbeat_prefix(self) -> str:
        return f"{self.prefix}:hb:"

    def heartbeat(self, program: str, instance: str) -> str:
        return f"{self.heartbeat_prefix()}{program}:{instance}"

    def ping_result(self, token: str) -> str:
        return f"{self.prefix}:diag:ping:{token}"
