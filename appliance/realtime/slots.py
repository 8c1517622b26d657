"""Sockets per principal (`[realtime] max_sockets_per_principal`), counted across api processes.

One sorted set per principal in Redis: a member per open socket, scored with the time (Redis's
clock, so the processes' clocks do not matter) until which it counts. A socket takes its slot
before it is served, renews it on its ping beat and gives it back when it closes; the slot of a
socket whose process crashed lapses after `presence_ttl`, so none leaks.
"""

from __future__ import annotations

import redis.asyncio as aioredis
import structlog

from appliance.errors import OUTAGES, ApplianceError
from appliance.redis_keys import Keys

log = structlog.get_logger()

# KEYS: 1 the principal's set. ARGV: 1 socket id, 2 limit, 3 ttl ms. Drops lapsed slots; takes
# the socket's slot unless `limit` others hold one. 1 if it holds a slot now.
_TAKE = """
local now = redis.call("TIME")
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", ms)
if not redis.call("ZSCORE", KEYS[1], ARGV[1])
    and redis.call("ZCARD", KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call("ZADD", KEYS[1], ms + tonumber(ARGV[3]), ARGV[1])
redis.call("PEXPIRE", KEYS[1], ARGV[3])
return 1
"""

# KEYS: 1 the principal's set. ARGV: 1 socket id, 2 ttl ms. Drops lapsed slots; (re)claims the
# socket's slot with no limit check: the socket was admitted, and if the set was lost (Redis
# restarted empty, flushed, or out longer than the ttl) this puts its slot back, so that new
# sockets are counted against it again.
_RENEW = """
local now = redis.call("TIME")
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", ms)
redis.call("ZADD", KEYS[1], ms + tonumber(ARGV[2]), ARGV[1])
redis.call("PEXPIRE", KEYS[1], ARGV[2])
return 1
"""


class TooManySockets(ApplianceError):
    status = 429
    code = "too_many_sockets"

    def __init__(self, limit: int) -> None:
        super().__init__(f"at most {limit} open sockets per principal: close one, then retry")


class Slots:
    def __init__(self, redis: aioredis.Redis, keys: Keys, limit: int, ttl: float) -> None:
        self._redis = redis
        self._keys = keys
        self.limit = limit
        self._ttl_ms = int(ttl * 1000)
        self._take = redis.register_script(_TAKE)
        self._renew = redis.register_script(_RENEW)

    async def take(self, principal: str, socket: str) -> bool:
        """Take a slot for a socket about to be served; False when all are taken."""
        taken = await self._take(
            keys=[self._keys.sockets(principal)], args=[socket, self.limit, self._ttl_ms]
        )
        return bool(taken)

    async def renew(self, principal: str, socket: str) -> None:
        """Hold the slot of an admitted socket for another ttl, claiming it again if it was lost:
        never refused, so a lost set costs no open socket, and the limit holds once every open
        socket has renewed (within one ping interval)."""
        await self._renew(keys=[self._keys.sockets(principal)], args=[socket, self._ttl_ms])

    async def give_back(self, principal: str, socket: str) -> None:
        try:
            await self._redis.zrem(self._keys.sockets(principal), socket)
        except OUTAGES as exc:  # the slot lapses after its ttl
            log.warning("socket_slot_release_failed", error=str(exc))
