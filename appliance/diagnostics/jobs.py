"""Diagnostic entrypoints: `diagnostics.ping` answers a token through Redis, proving the job
round trip (`appliance doctor`); `diagnostics.noop` does nothing but note when it started, so that
bench/jobs.py can time the worker's pick-up and throughput without measuring a handler's work."""

from __future__ import annotations

import json
import os
import time

import msgspec

from appliance.redis_keys import Keys
from appliance.resources import Resources

PING = "diagnostics.ping"
NOOP = "diagnostics.noop"
RESULT_TTL = 300


async def ping(res: Resources, payload: bytes) -> None:
    token = json.loads(payload)["token"]
    answer = json.dumps({"pid": os.getpid(), "instance": res.config.appliance.instance})
    await res.redis.set(res.keys.ping_result(token), answer, ex=RESULT_TTL)


class NoopTiming(msgspec.Struct, forbid_unknown_fields=True):
    """What a timed no-op carries: the run whose list records its start, and its enqueue time
    (seconds since the epoch, as `time.time()` in the enqueuing process on the same clock)."""

    run: str
    enqueued: float


def noop_starts(keys: Keys, run: str) -> str:
    """The Redis list of one benchmark run's `"<enqueued> <started>"` entries."""
    return f"{keys.prefix}:diag:noop:{run}"


async def noop(res: Resources, payload: bytes) -> None:
    """An empty payload does nothing at all; a `NoopTiming` appends one entry to its run's list
    (one round trip). A payload that is neither fails the job."""
    started = time.time()  # first: the entry times pick-up, not this handler
    if not payload:
        return
    timing = msgspec.json.decode(payload, type=NoopTiming)
    async with res.redis.pipeline(transaction=False) as pipe:
        pipe.rpush(noop_starts(res.keys, timing.run), f"{timing.enqueued!r} {started!r}")
        pipe.expire(noop_starts(res.keys, timing.run), RESULT_TTL)
        await pipe.execute()
