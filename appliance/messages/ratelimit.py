"""Per-principal rate limits: a token bucket in Redis, leased to each api process in small chunks.

The bucket (`[messages] rate_per_second`, `rate_burst`) is global: every process takes tokens from
the same Redis key, so all processes together never exceed it. To avoid a Redis round trip per
publish, a process takes up to a tenth of a second's worth of tokens at once (at most 100) and
spends them locally for up to a second; tokens it does not use in that second are forfeited. The
limit is therefore never exceeded, and a principal spread over N processes may get up to N
chunks per second less than its rate.
"""

from __future__ import annotations

import time
from importlib import resources

import redis.asyncio as aioredis

from appliance.config.model import MessagesSection
from appliance.redis_keys import Keys

LEASE_SECONDS = 1.0
_MAX_LEASES = 100_000


class RateLimiter:
    def __init__(self, redis: aioredis.Redis, keys: Keys, section: MessagesSection) -> None:
        self._keys = keys
        self._rate = section.rate_per_second
        self._burst = section.rate_burst
        self._chunk = int(max(1, min(section.rate_per_second / 10, 100, section.rate_burst)))
        script = resources.files("appliance.messages").joinpath("ratelimit.lua").read_text()
        self._take = redis.register_script(script)
        self._leases: dict[str, tuple[float, float]] = {}  # principal → (tokens, expires)

    async def acquire(self, principal: str, cost: int) -> float:
        """Spend `cost` tokens: 0.0 when allowed, else the seconds until they would be."""
        now = time.monotonic()
        tokens, expires = self._leases.get(principal, (0.0, 0.0))
        if expires > now and tokens >= cost:
            self._leases[principal] = (tokens - cost, expires)
            return 0.0
        granted = int(
            await self._take(
                keys=[self._keys.rate(principal)],
                args=[self._rate, self._burst, cost, cost + self._chunk],
            )
        )
        # Concurrent callers of this process may have refilled the lease meanwhile: what they
        # took is added to, never replaced (or it would be forfeited unused).
        tokens, expires = self._leases.get(principal, (0.0, 0.0))
        tokens = tokens if expires > now else 0.0
        if granted < 0:
            if tokens >= cost:  # a concurrent refill covers this one
                self._leases[principal] = (tokens - cost, expires)
                return 0.0
            return -granted / 1000
        if len(self._leases) >= _MAX_LEASES:
            self._leases.clear()
        self._leases[principal] = (tokens + granted - cost, now + LEASE_SECONDS)
        return 0.0
