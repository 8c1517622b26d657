"""Program heartbeats in Redis: a key per program and instance, refreshed well inside its TTL.

`/readyz`, `appliance status` and `doctor` read them; a program whose key expired is not running
(or is stuck: a blocked event loop stops its heartbeat too).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from appliance import metrics
from appliance.redis_keys import Keys

log = structlog.get_logger()


@dataclass(frozen=True)
class Heartbeat:
    program: str
    instance: str
    pid: int
    ts: float
    started: float

    @property
    def age(self) -> float:
        return max(0.0, time.time() - self.ts)


def ttl_for(interval: float) -> int:
    return max(2, math.ceil(interval * 3))


async def beat(
    redis: aioredis.Redis, keys: Keys, program: str, instance: str, interval: float, started: float
) -> None:
    metrics.sample_process(program)
    metrics.PROGRAM_UP.labels(program).set(1)
    payload = {"pid": os.getpid(), "ts": time.time(), "started": started}
    await redis.set(keys.heartbeat(program, instance), json.dumps(payload), ex=ttl_for(interval))
    metrics.HEARTBEATS.labels(program).inc()


async def start_heartbeat(
    redis: aioredis.Redis,
    keys: Keys,
    program: str,
    instance: str,
    interval: float,
    stop: asyncio.Event,
) -> asyncio.Task[None]:
    """Beat once now, so readiness sees the program as soon as it starts, then every `interval`
    seconds in the returned task until `stop`, which removes the key. Redis errors are logged
    (once per outage) and retried; they never stop the program."""
    started = time.time()
    failing = False

    async def once() -> None:
        nonlocal failing
        try:
            await beat(redis, keys, program, instance, interval, started)
        except (RedisError, OSError) as exc:
            if not failing:
                log.warning("heartbeat_failed", program=program, error=str(exc))
            failing = True
            return
        if failing:
            log.info("heartbeat_recovered", program=program)
        failing = False

    async def loop() -> None:
        while True:
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
                break
            except TimeoutError:
                await once()
        try:
            await redis.delete(keys.heartbeat(program, instance))
        except (RedisError, OSError):
            log.warning("heartbeat_clear_failed", program=program)

    await once()
    return asyncio.create_task(loop())


async def _read(redis: aioredis.Redis, pairs: list[tuple[str, str]], keys: Keys) -> list[Heartbeat]:
    """The heartbeats of these (program, instance) pairs that exist, one GET each in a pipeline
    (not MGET: heartbeat keys carry no hash tag, so on Redis Cluster they span slots)."""
    async with redis.pipeline(transaction=False) as pipe:
        for program, instance in pairs:
            pipe.get(keys.heartbeat(program, instance))
        values = await pipe.execute()
    beats = []
    for (program, instance), raw in zip(pairs, values, strict=True):
        if raw is None:
            continue
        data = json.loads(raw)
        beats.append(
            Heartbeat(
                program, instance, int(data["pid"]), float(data["ts"]), float(data["started"])
            )
        )
    return beats


async def read_instance(
    redis: aioredis.Redis, keys: Keys, instance: str, programs: list[str]
) -> dict[str, Heartbeat]:
    """This instance's heartbeats by program: direct reads, cheap enough for every probe."""
    beats = await _read(redis, [(p, instance) for p in programs], keys)
    return {b.program: b for b in beats}


async def read_all(redis: aioredis.Redis, keys: Keys) -> list[Heartbeat]:
    """Every live heartbeat of this deployment, across instances (SCAN: for status, not probes)."""
    prefix = keys.heartbeat_prefix()
    pairs = []
    async for name in redis.scan_iter(match=prefix + "*", count=1000):
        program, _, instance = name.decode()[len(prefix) :].partition(":")
        pairs.append((program, instance))
    beats = await _read(redis, pairs, keys) if pairs else []
    return sorted(beats, key=lambda b: (b.program, b.instance))
