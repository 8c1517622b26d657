"""`diagnostics.noop`: the no-op job bench/jobs.py times, through the real worker and Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import msgspec
import pytest

from appliance import queue
from appliance.diagnostics.jobs import NOOP, NoopTiming, noop, noop_starts
from appliance.programs.worker import run_worker
from appliance.resources import Resources


@pytest.fixture
async def worker(resources: Resources) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(resources, stop))
    yield
    stop.set()
    await asyncio.wait_for(task, 30)


async def test_noop_records_its_enqueue_and_start_times(resources: Resources, worker: None) -> None:
    run = "test-records"
    key = noop_starts(resources.keys, run)
    await resources.redis.delete(key)
    enqueued = time.time()
    async with resources.connection() as conn:
        for _ in range(3):
            await queue.enqueue(conn, NOOP, msgspec.json.encode(NoopTiming(run, enqueued)))

    try:
        async with asyncio.timeout(15):
            while int(await resources.redis.llen(key)) < 3:
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail("the worker did not record three noop jobs within 15 s")
    entries = [e.split() for e in await resources.redis.lrange(key, 0, -1)]
    assert [float(e[0]) for e in entries] == [enqueued] * 3
    assert all(float(e[1]) >= enqueued for e in entries)
    assert 0 < await resources.redis.ttl(key) <= 300
    await resources.redis.delete(key)


async def test_noop_with_an_empty_payload_writes_nothing(resources: Resources) -> None:
    pattern = f"{resources.keys.prefix}:diag:noop:*"
    before = {k async for k in resources.redis.scan_iter(match=pattern)}
    await noop(resources, b"")
    assert {k async for k in resources.redis.scan_iter(match=pattern)} == before


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b'{"run": "x"}',
        b'{"run": "x", "enqueued": "soon"}',
        b'{"run": "x", "enqueued": 1, "more": 1}',
    ],
)
async def test_noop_rejects_a_payload_that_is_not_a_timing(
    resources: Resources, payload: bytes
) -> None:
    with pytest.raises(msgspec.DecodeError):
        await noop(resources, payload)
