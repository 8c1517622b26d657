"""The leased token bucket against real Redis: processes share one bucket and never exceed it."""

from __future__ import annotations

import asyncio
import time

import pytest

from appliance.config.model import MessagesSection
from appliance.messages import ratelimit
from appliance.messages.ratelimit import RateLimiter
from appliance.resources import Resources
from tests.messaging import unique


async def test_two_processes_together_never_exceed_the_bucket(resources: Resources) -> None:
    section = MessagesSection(rate_per_second=50, rate_burst=100, max_batch=100)
    one, two = (RateLimiter(resources.redis, resources.keys, section) for _ in range(2))
    principal = f"key:{unique('p')}"
    started = time.monotonic()
    allowed = refused = 0
    for i in range(600):
        wait = await (one if i % 2 else two).acquire(principal, 1)
        if wait:
            refused += 1
            assert 0 < wait <= 1.0
        else:
            allowed += 1
    elapsed = time.monotonic() - started
    assert refused > 0
    assert allowed <= 100 + 50 * elapsed + 1


@pytest.fixture
def long_leases(monkeypatch: pytest.MonkeyPatch) -> None:
    """Leases that outlive a slow test: what they hold is checked, not how long they last."""
    monkeypatch.setattr(ratelimit, "LEASE_SECONDS", 600.0)


async def test_a_lease_spares_round_trips_and_a_refusal_names_the_wait(
    resources: Resources, long_leases: None
) -> None:
    section = MessagesSection(rate_per_second=100, rate_burst=30, max_batch=30)
    limiter = RateLimiter(resources.redis, resources.keys, section)
    principal = f"key:{unique('p')}"
    assert await limiter.acquire(principal, 1) == 0.0
    bucket = resources.keys.rate(principal)
    left = float((await resources.redis.hget(bucket, "tokens")) or 0)
    # One call leased a tenth of a second's worth beyond the cost: 30 - 1 - 10.
    assert left == 19.0
    for _ in range(10):  # spent from the lease: the bucket does not move
        assert await limiter.acquire(principal, 1) == 0.0
    assert float((await resources.redis.hget(bucket, "tokens")) or 0) == left
    assert await limiter.acquire(principal, 31) > 0  # more than the bucket ever holds


async def test_concurrent_callers_of_one_process_share_their_refills(
    resources: Resources, long_leases: None
) -> None:
    """Callers that find the lease empty at once each take tokens; what each took is added to
    the lease, so none is refused while the bucket holds plenty."""
    # 200 tokens: twenty refills of 1 + 5 fit whatever order their replies come back in (from
    # one connection each); with fewer, one refused by Redis could find the lease still empty.
    section = MessagesSection(rate_per_second=50, rate_burst=200, max_batch=100)
    limiter = RateLimiter(resources.redis, resources.keys, section)
    principal = f"key:{unique('p')}"
    waits = await asyncio.gather(*(limiter.acquire(principal, 1) for _ in range(20)))
    assert waits == [0.0] * 20
    # Twenty refills of 1 + 5 took 120 tokens: 100 are left in the lease, spent without Redis
    # (the bucket does not move).
    bucket = resources.keys.rate(principal)
    state = await resources.redis.hgetall(bucket)
    assert [await limiter.acquire(principal, 1) for _ in range(100)] == [0.0] * 100
    assert await resources.redis.hgetall(bucket) == state
