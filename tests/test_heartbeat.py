"""Heartbeat keys against the configured interval, read back from Redis: the TTL a beat really
sets, and readiness turning a stale or missing heartbeat into 503 naming the program.

The bounds come from the interval itself (a key outlives the next beat, and is gone within
three intervals, two seconds at least), never from `ttl_for()`, so a wrong TTL cannot agree
with itself."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from appliance import heartbeat
from appliance.api.app import create_app
from appliance.config import PROGRAMS, Config
from appliance.resources import Resources
from tests.messaging import unique


@pytest.mark.parametrize("interval", [0.2, 1.0, 5.0, 30.0])
async def test_a_beat_expires_within_three_intervals(resources: Resources, interval: float) -> None:
    program, instance = "flusher", unique("hb")
    key = resources.keys.heartbeat(program, instance)
    await heartbeat.beat(resources.redis, resources.keys, program, instance, interval, time.time())
    try:
        ttl_ms = await resources.redis.pttl(key)
        # Outlives the next beat; expires within 3 intervals (2 s at least).
        assert interval * 1000 < ttl_ms <= max(2.0, 3 * interval) * 1000, ttl_ms
    finally:
        await resources.redis.delete(key)


async def test_a_running_heartbeat_keeps_its_key_within_three_intervals(
    resources: Resources,
) -> None:
    stop = asyncio.Event()
    program, instance = "scheduler", unique("hb")
    key = resources.keys.heartbeat(program, instance)
    task = await heartbeat.start_heartbeat(
        resources.redis, resources.keys, program, instance, 1.0, stop
    )
    try:
        assert 0 < await resources.redis.pttl(key) <= 3000
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert not await resources.redis.exists(key)


async def write_beat(res: Resources, instance: str, program: str, age: float) -> None:
    """A heartbeat `age` seconds old, kept in Redis for a minute whatever its age (a process
    that froze after writing it, or a clock that says so): only its `ts` tells it is stale."""
    now = time.time()
    payload = {"pid": 1, "ts": now - age, "started": now - age - 1}
    key = res.keys.heartbeat(program, instance)
    await res.redis.set(key, json.dumps(payload), ex=60)


def named(detail: str) -> set[str]:
    return {program for program in PROGRAMS if program in detail}


@pytest.fixture
def ready_app(settings: dict[str, Any]) -> tuple[str, Config]:
    """An instance of its own (so no other test's beats count), heartbeat_interval 1 s."""
    instance = settings["appliance"]["instance"] = unique("ready")
    config = Config.model_validate(settings)
    assert config.appliance.heartbeat_interval == 1.0
    return instance, config


async def test_readyz_is_503_naming_a_program_whose_heartbeat_is_stale(
    resources: Resources, ready_app: tuple[str, Config]
) -> None:
    """A beat 4 s old is three beats late; one an hour old is far beyond any sane TTL. The
    beats are written once the app runs, so its start-up cannot age the fresh ones."""
    instance, config = ready_app
    try:
        async with AsyncTestClient(app=create_app(config)) as client:
            for age in (4.0, 3600.0):
                for program in PROGRAMS:
                    if program != "api":  # the app's own lifespan beats for the api
                        await write_beat(resources, instance, program, 0.0)
                await write_beat(resources, instance, "worker", age)
                response = await client.get("/readyz")
                assert response.status_code == 503, (age, response.text)
                found = {c["name"]: c for c in response.json()["checks"]}["heartbeats"]
                assert found["ok"] is False
                assert named(found["detail"]) == {"worker"}, (age, found)
            # The same beat made fresh: ready.
            await write_beat(resources, instance, "worker", 0.0)
            response = await client.get("/readyz")
            assert response.status_code == 200, response.text
    finally:
        for program in PROGRAMS:
            await resources.redis.delete(resources.keys.heartbeat(program, instance))


async def test_readyz_is_503_naming_a_program_without_a_heartbeat(
    resources: Resources, ready_app: tuple[str, Config]
) -> None:
    instance, config = ready_app
    try:
        async with AsyncTestClient(app=create_app(config)) as client:
            for program in ("worker", "flusher"):
                await write_beat(resources, instance, program, 0.0)
            response = await client.get("/readyz")
        assert response.status_code == 503, response.text
        found = {c["name"]: c for c in response.json()["checks"]}["heartbeats"]
        assert found["ok"] is False
        assert named(found["detail"]) == {"scheduler"}, found
    finally:
        for program in PROGRAMS:
            await resources.redis.delete(resources.keys.heartbeat(program, instance))
