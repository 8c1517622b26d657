"""Receipts and presence: Redis only, with TTLs, broadcast on the conversation's channel.

Presence is a sorted set per conversation whose members are `<principal>|<socket id>` scored by
their expiry, so several sockets of one principal (on any api process) count once and a crashed
process's sockets fade out after `presence_ttl`. Receipts are two hashes per conversation
(`delivered`, `read`): principal → highest seq, only ever raised. Read implies delivered: raising
`read` to n raises `delivered` to n in the same script, so `read` never runs ahead.
"""

from __future__ import annotations

import time
from typing import Literal, cast

import msgspec
import redis.asyncio as aioredis

from appliance.redis_keys import Keys

ReceiptKind = Literal["delivered", "read"]

# KEYS: 1 receipts hash of the kind, 2 (for `read`) the `delivered` hash. ARGV: 1 principal,
# 2 seq, 3 ttl ms, 4 channel, 5 event frame head of the kind, 6 (for `read`) that of `delivered`.
# Raises the principal's mark (never lowers it), and for `read` the delivered mark with it;
# broadcasts only a change, read before delivered. Returns the mark of the kind asked.
_RAISE_RECEIPT = """
local function raise(key, head)
  local old = tonumber(redis.call("HGET", key, ARGV[1]) or "0")
  local new = tonumber(ARGV[2])
  if new > old then
    redis.call("HSET", key, ARGV[1], new)
    redis.call("PUBLISH", ARGV[4], head .. new .. "}")
    old = new
  end
  redis.call("PEXPIRE", key, ARGV[3])
  return old
end
local mark = raise(KEYS[1], ARGV[5])
if KEYS[2] then
  raise(KEYS[2], ARGV[6])
end
return mark
"""


def _receipt_head(conversation: str, principal: str, kind: ReceiptKind) -> bytes:
    """A receipt frame up to its seq: the script appends the new mark and the closing brace."""
    frame = {"event": "receipt", "conversation": conversation, "principal": principal, "type": kind}
    return msgspec.json.encode(frame)[:-1] + b',"seq":'


class ReceiptIn(msgspec.Struct, forbid_unknown_fields=True):
    type: ReceiptKind
    seq: int


class Receipt(msgspec.Struct):
    principal: str
    delivered: int
    read: int


def _event(conversation: str, principal: str, **fields: str) -> bytes:
    return msgspec.json.encode(
        {"event": "presence", "conversation": conversation, "principal": principal, **fields}
    )


class Presence:
    def __init__(self, redis: aioredis.Redis, keys: Keys, ttl: float, receipt_ttl: float) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl = ttl
        self._receipt_ttl_ms = int(receipt_ttl * 1000)
        self._raise = redis.register_script(_RAISE_RECEIPT)

    async def _live(self, conversation: str, now: float) -> list[bytes]:
        key = self._keys.presence(conversation)
        return cast(list[bytes], await self._redis.zrangebyscore(key, now, "+inf"))

    async def _present(self, conversation: str, principal: str, now: float) -> bool:
        members = await self._live(conversation, now)
        mine = principal.encode()  # a principal may hold '|'; a socket id never does
        return any(m.rsplit(b"|", 1)[0] == mine for m in members)

    async def join(self, conversation: str, principal: str, socket_id: str) -> None:
        now = time.time()
        was_present = await self._present(conversation, principal, now)
        key = self._keys.presence(conversation)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zadd(key, {f"{principal}|{socket_id}": now + self._ttl})
            pipe.zremrangebyscore(key, "-inf", now)
            pipe.expire(key, int(self._ttl) + 1)
            if not was_present:
                pipe.publish(
                    self._keys.channel(conversation),
                    _event(conversation, principal, status="online"),
                )
            await pipe.execute()

    async def refresh(self, entries: list[tuple[str, str, str]]) -> None:
        """(conversation, principal, socket id) of one socket's subscriptions, on its ping beat."""
        if not entries:
            return
        expiry = time.time() + self._ttl
        async with self._redis.pipeline(transaction=False) as pipe:
            for conversation, principal, socket_id in entries:
                key = self._keys.presence(conversation)
                pipe.zadd(key, {f"{principal}|{socket_id}": expiry})
                pipe.expire(key, int(self._ttl) + 1)
            await pipe.execute()

    async def forget(self, entries: list[tuple[str, str, str]]) -> None:
        """Remove (conversation, principal, socket id) entries without an event."""
        if not entries:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for conversation, principal, socket_id in entries:
                pipe.zrem(self._keys.presence(conversation), f"{principal}|{socket_id}")
            await pipe.execute()

    async def forget_conversation(self, conversation: str) -> int:
        """Delete a purged conversation's presence and receipts (no event: nobody may be
        subscribed to a deleted conversation); the number of keys deleted."""
        deleted: int = await self._redis.delete(
            self._keys.presence(conversation),
            self._keys.receipts(conversation, "delivered"),
            self._keys.receipts(conversation, "read"),
        )
        return deleted

    async def leave(self, conversation: str, principal: str, socket_id: str) -> None:
        await self._redis.zrem(self._keys.presence(conversation), f"{principal}|{socket_id}")
        if not await self._present(conversation, principal, time.time()):
            await self._redis.publish(
                self._keys.channel(conversation), _event(conversation, principal, status="offline")
            )

    async def online(self, conversation: str) -> list[str]:
        members = await self._live(conversation, time.time())
        return sorted({m.decode().rsplit("|", 1)[0] for m in members})

    async def receipt(self, conversation: str, principal: str, kind: ReceiptKind, seq: int) -> int:
        keys = [self._keys.receipts(conversation, kind)]
        args: list[str | int | bytes] = [
            principal,
            seq,
            self._receipt_ttl_ms,
            self._keys.channel(conversation),
            _receipt_head(conversation, principal, kind),
        ]
        if kind == "read":  # read implies delivered, atomically
            keys.append(self._keys.receipts(conversation, "delivered"))
            args.append(_receipt_head(conversation, principal, "delivered"))
        mark = await self._raise(keys=keys, args=args)
        return int(mark)

    async def receipts(self, conversation: str) -> list[Receipt]:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._keys.receipts(conversation, "delivered"))
            pipe.hgetall(self._keys.receipts(conversation, "read"))
            delivered, read = await pipe.execute()
        principals = sorted({*delivered, *read})
        return [
            Receipt(p.decode(), int(delivered.get(p, 0)), int(read.get(p, 0))) for p in principals
        ]
