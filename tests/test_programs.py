"""Worker, scheduler and heartbeats against real PostgreSQL and Redis; one program as a process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from appliance import heartbeat, jobs, metrics, queue
from appliance.config import Config
from appliance.diagnostics.roundtrip import ping_worker
from appliance.programs.scheduler import claim, next_tick, run_entry
from appliance.programs.worker import run_worker
from appliance.resources import Resources
from appliance.schedules import SCHEDULES, Run
from tests.conftest import REDIS_URL
from tests.support import wait_for, write_toml


def sample(name: str, labels: dict[str, str]) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def worker(resources: Resources) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(resources, stop))
    yield stop
    stop.set()
    await asyncio.wait_for(task, 30)


async def test_ping_round_trip_through_the_worker(
    resources: Resources, worker: asyncio.Event
) -> None:
    before = sample("appliance_jobs_total", {"entrypoint": "diagnostics.ping", "status": "ok"})
    answer = await ping_worker(resources, timeout=15)
    assert answer["pid"] == os.getpid()
    assert answer["instance"] == resources.config.appliance.instance
    after = sample("appliance_jobs_total", {"entrypoint": "diagnostics.ping", "status": "ok"})
    assert after == before + 1


async def test_notify_wakes_an_idle_worker(settings: dict[str, Any], migrated: str) -> None:
    """With a 30 s poll interval, only LISTEN/NOTIFY can start each of three jobs within 10 s.

    How fast it is (about 10 ms, against 1-2 s for pgqueuer's single-connection driver) is
    measured by bench/job_pickup.py, not asserted here.
    """
    from appliance.resources import open_resources

    settings["worker"]["poll_interval"] = 30.0
    async with open_resources(Config.model_validate(settings), "test") as res:
        stop = asyncio.Event()
        task = asyncio.create_task(run_worker(res, stop))
        await ping_worker(res, timeout=15)  # the worker is up and listening
        latencies = []
        for _ in range(3):
            await asyncio.sleep(1.5)  # idle: the worker waits on NOTIFY or its poll timeout
            latencies.append((await ping_worker(res, timeout=15))["latency_ms"])
        stop.set()
        await asyncio.wait_for(task, 30)
    assert max(latencies) < 10_000, latencies


async def test_job_timeout_is_enforced(
    settings: dict[str, Any], migrated: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.resources import open_resources

    done = asyncio.Event()

    async def slow(res: Resources, payload: bytes) -> None:
        try:
            await asyncio.sleep(30)
        finally:
            done.set()

    monkeypatch.setitem(jobs.ENTRYPOINTS, "test.slow", slow)
    monkeypatch.setattr(queue, "NAMES", (*queue.NAMES, "test.slow"))
    settings["worker"]["job_timeout"] = 0.3
    config = Config.model_validate(settings)
    labels = {"entrypoint": "test.slow", "status": "timeout"}
    before = sample("appliance_jobs_total", labels)
    async with open_resources(config, "test") as res:
        stop = asyncio.Event()
        task = asyncio.create_task(run_worker(res, stop))
        async with res.connection() as conn:
            await queue.enqueue(conn, "test.slow", b"{}")
        await asyncio.wait_for(done.wait(), 15)
        stop.set()
        await asyncio.wait_for(task, 30)
    assert sample("appliance_jobs_total", labels) == before + 1


async def test_enqueue_rejects_unknown_entrypoint(resources: Resources) -> None:
    async with resources.connection() as conn:
        with pytest.raises(ValueError, match="unknown job entrypoint"):
            await queue.enqueue(conn, "no.such", b"")


async def test_enqueue_inside_rolled_back_transaction_leaves_no_job(resources: Resources) -> None:
    async with resources.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM pgqueuer")
        (before,) = await cur.fetchone() or (0,)
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await queue.enqueue(conn, "diagnostics.ping", b'{"token": "x"}')
                raise RuntimeError("business step failed")
        cur = await conn.execute("SELECT count(*) FROM pgqueuer")
        assert await cur.fetchone() == (before,)


async def test_schedule_tick_is_claimed_once(resources: Resources) -> None:
    tick = datetime(2026, 1, 1, 3, 17, tzinfo=UTC)
    owners = await asyncio.gather(*(claim(resources, "test_claim", tick) for _ in range(5)))
    won = [o for o in owners if o is not None]
    assert len(won) == 1
    await won[0].close()


def test_next_tick_is_utc_cron() -> None:
    after = datetime(2026, 11, 23, 10, 30, tzinfo=UTC)
    assert next_tick("17 * * * *", after) == datetime(2026, 11, 23, 11, 17, tzinfo=UTC)


async def test_prune_job_log_deletes_only_old_rows_and_records_the_run(
    resources: Resources,
) -> None:
    async with resources.connection() as conn:
        await conn.execute(
            "INSERT INTO pgqueuer_log (created, job_id, status, priority, entrypoint)"
            " SELECT now() - make_interval(days => d), 1, 'successful', 0, 'test.prune'"
            " FROM unnest(ARRAY[30, 20, 8, 6, 1, 0]) AS d"
        )
    entry = next(e for e in SCHEDULES if e.name == "prune_job_log")
    assert entry.retention
    would = await entry.run(resources, Run(dry_run=True))
    assert would["deleted"] >= 3
    async with resources.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pgqueuer_log WHERE entrypoint = 'test.prune'"
        )
        assert await cur.fetchone() == (6,)  # a dry run deletes nothing
    tick = datetime.now(UTC).replace(microsecond=0)
    await run_entry(resources, entry, tick)
    async with resources.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pgqueuer_log WHERE entrypoint = 'test.prune'"
        )
        assert await cur.fetchone() == (3,)
        cur = await conn.execute(
            "SELECT status, counts, finished_at IS NOT NULL FROM schedule_runs"
            " WHERE name = 'prune_job_log' AND tick = %s",
            (tick,),
        )
        status, counts, finished = await cur.fetchone() or (None, None, None)
    assert status == "ok"
    assert counts["deleted"] >= 3
    assert finished is True


async def test_failed_schedule_run_is_recorded(
    resources: Resources, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.schedules import Entry

    async def broken(res: Resources, run: Run) -> dict[str, int]:
        raise RuntimeError("maintenance exploded")

    entry = Entry("test_broken", lambda c: c.schedules.prune_job_log, broken)
    tick = datetime.now(UTC).replace(microsecond=0)
    await run_entry(resources, entry, tick)
    async with resources.connection() as conn:
        cur = await conn.execute(
            "SELECT status, error FROM schedule_runs WHERE name = 'test_broken' AND tick = %s",
            (tick,),
        )
        assert await cur.fetchone() == ("failed", "RuntimeError: maintenance exploded")


async def test_heartbeat_written_with_ttl_and_cleared_on_stop(resources: Resources) -> None:
    stop = asyncio.Event()
    task = await heartbeat.start_heartbeat(
        resources.redis, resources.keys, "flusher", "hb-test", 1.0, stop
    )
    key = resources.keys.heartbeat("flusher", "hb-test")
    assert await resources.redis.exists(key), "the first beat is written before start returns"
    ttl = await resources.redis.ttl(key)
    assert 0 < ttl <= heartbeat.ttl_for(1.0)
    beats = [b for b in await heartbeat.read_all(resources.redis, resources.keys)
             if b.instance == "hb-test"]  # fmt: skip
    assert [(b.program, b.pid) for b in beats] == [("flusher", os.getpid())]
    assert beats[0].age < 2
    stop.set()
    await task
    assert not await resources.redis.exists(key)


def test_program_process_heartbeats_and_drains_on_sigterm(
    settings: dict[str, Any], migrated: str, tmp_path: Path
) -> None:
    """`appliance run scheduler` as a real process: heartbeat in Redis, clean exit 0 on SIGTERM."""
    settings["appliance"]["instance"] = "proc-test"
    settings["appliance"]["run_dir"] = str(tmp_path / "run")
    config_file = write_toml(tmp_path / "c.toml", settings)
    env = {"APPLIANCE_CONFIG": str(config_file), "PATH": os.environ["PATH"]}
    log = (tmp_path / "out.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "run", "scheduler"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    client = redis.Redis.from_url(REDIS_URL)
    key = f"{settings['redis']['key_prefix']}:hb:scheduler:proc-test"
    try:
        wait_for(lambda: client.exists(key), 20, "scheduler heartbeat")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=settings["appliance"]["stop_timeout"] + 5) == 0
        assert time.monotonic() - started < settings["appliance"]["stop_timeout"]
        assert not client.exists(key)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        client.close()
    lines = [json.loads(line) for line in (tmp_path / "out.log").read_text().splitlines()]
    events = [line["event"] for line in lines]
    assert "scheduler_ready" in events
    assert "program_stopped" in events
    assert all(line["process"] == "scheduler" for line in lines)
    assert all({"ts", "level", "event", "process"} <= set(line) for line in lines)
    # The multiprocess metrics directory got this program's samples.
    assert any((tmp_path / "run" / "metrics").glob("counter_*.db"))
    assert metrics.MULTIPROC_ENV  # the variable name the re-exec sets


async def test_supervise_cancels_a_body_that_ignores_stop_after_the_drain_deadline(
    settings: dict[str, Any], migrated: str
) -> None:
    from appliance.programs.runner import supervise

    settings["appliance"]["stop_timeout"] = 0.5
    settings["appliance"]["instance"] = "drain-test"
    config = Config.model_validate(settings)
    cancelled = asyncio.Event()

    async def stubborn(res: Resources, stop: asyncio.Event) -> None:
        try:
            await asyncio.sleep(3600)  # never looks at `stop`
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def send_term() -> None:
        await asyncio.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)  # handled by supervise's loop signal handler

    started = time.monotonic()
    await asyncio.gather(supervise("flusher", config, stubborn), send_term())
    assert cancelled.is_set()
    assert time.monotonic() - started < 5


def test_worker_rides_out_unreachable_postgres_and_stops_cleanly(
    settings: dict[str, Any], tmp_path: Path
) -> None:
    """No PostgreSQL: the worker logs and retries with back-off instead of exiting (which would
    make supervisord give up on it and stop the whole container), and still stops on SIGTERM."""
    from tests.support import free_port

    settings["postgres"]["dsn"] = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    settings["postgres"]["connect_timeout"] = 1.0
    settings["appliance"]["run_dir"] = str(tmp_path / "run")
    config_file = write_toml(tmp_path / "c.toml", settings)
    out = tmp_path / "out.log"
    with out.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "run", "worker"],
            env={"APPLIANCE_CONFIG": str(config_file), "PATH": os.environ["PATH"]},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: out.read_text().count("worker_disconnected") >= 2, 30, "2 retries")
            assert proc.poll() is None, out.read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0, out.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    retries = [line for line in lines if line["event"] == "worker_disconnected"]
    assert retries[1]["retry_in_s"] > retries[0]["retry_in_s"]
    assert all(line["process"] == "worker" for line in lines)


async def test_supervise_propagates_a_crashing_body(
    settings: dict[str, Any], migrated: str
) -> None:
    """`appliance run` turns this into one `program_failed` JSON line and exit 1."""
    from appliance.programs.runner import supervise

    async def crash(res: Resources, stop: asyncio.Event) -> None:
        raise RuntimeError("body exploded")

    with pytest.raises(RuntimeError, match="body exploded"):
        await supervise("flusher", Config.model_validate(settings), crash)


async def test_scheduler_survives_postgres_being_unreachable(settings: dict[str, Any]) -> None:
    import structlog

    from appliance.programs.scheduler import run_tick
    from appliance.resources import open_resources
    from tests.support import free_port

    settings["postgres"]["dsn"] = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    settings["postgres"]["connect_timeout"] = 0.5
    entry = next(e for e in SCHEDULES if e.name == "prune_job_log")
    async with open_resources(Config.model_validate(settings), "test") as res:
        with structlog.testing.capture_logs() as logs:
            await run_tick(res, entry, datetime.now(UTC))
    failed = [entry for entry in logs if entry["event"] == "schedule_tick_failed"]
    assert len(failed) == 1
    assert failed[0]["schedule"] == "prune_job_log"


async def test_heartbeat_rides_out_a_redis_outage(
    settings: dict[str, Any], private_redis: tuple[int, Any, Any]
) -> None:
    import structlog

    from appliance.config.model import RedisSection
    from appliance.redis_keys import Keys, client

    port, start, kill = private_redis
    redis_client = client(
        RedisSection.model_validate({"url": f"redis://127.0.0.1:{port}/0", "connect_timeout": 0.3}),
        "test",
    )
    keys = Keys("hb-outage", 4)
    stop = asyncio.Event()
    try:
        with structlog.testing.capture_logs() as logs:
            task = await heartbeat.start_heartbeat(redis_client, keys, "worker", "i", 0.2, stop)
            kill()
            await asyncio.sleep(1.5)
            start()
            for _ in range(50):
                if await redis_client.exists(keys.heartbeat("worker", "i")):
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the heartbeat did not come back after Redis did")
            stop.set()
            await task
    finally:
        await redis_client.aclose()
    events = [entry["event"] for entry in logs]
    assert events.count("heartbeat_failed") == 1, events
    assert "heartbeat_recovered" in events


async def test_job_cut_off_by_the_drain_deadline_is_queued_again(
    resources: Resources, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = asyncio.Event()

    async def long_job(res: Resources, payload: bytes) -> None:
        started.set()
        await asyncio.sleep(3600)

    monkeypatch.setitem(jobs.ENTRYPOINTS, "test.long", long_job)
    monkeypatch.setattr(queue, "NAMES", (*queue.NAMES, "test.long"))
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(resources, stop))
    async with resources.connection() as conn:
        await queue.enqueue(conn, "test.long", b'{"n": 7}')
    await asyncio.wait_for(started.wait(), 15)
    stop.set()
    await asyncio.sleep(0.2)  # draining, the job still runs
    task.cancel()  # what supervise does at the drain deadline
    with pytest.raises(asyncio.CancelledError):
        await task
    async with resources.connection() as conn:
        cur = await conn.execute(
            "SELECT status::text, payload FROM pgqueuer WHERE entrypoint = 'test.long'"
        )
        rows = await cur.fetchall()
    assert rows == [("queued", b'{"n": 7}')]


async def test_worker_reconnects_when_its_listen_connection_dies(
    settings: dict[str, Any], migrated: str
) -> None:
    """A LISTEN connection killed by the server (a proxy timeout, a failover) is noticed by the
    worker's liveness check (every 2 s) long before its next poll (30 s here): it reconnects
    instead of silently falling back to polling. 15 s leaves the check several times its due."""
    import structlog

    from appliance.resources import open_resources

    settings["worker"]["poll_interval"] = 30.0
    settings["appliance"]["instance"] = "listen-kill"
    async with open_resources(Config.model_validate(settings), "test") as res:
        stop = asyncio.Event()
        with structlog.testing.capture_logs() as logs:
            task = asyncio.create_task(run_worker(res, stop))
            await ping_worker(res, timeout=15)
            async with res.connection() as conn:
                cur = await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = 'appliance-worker-listen'"
                    " AND datname = current_database()"
                )
                assert (await cur.fetchall()) == [(True,)]
            deadline = asyncio.get_running_loop().time() + 15
            while not any(e["event"] == "worker_disconnected" for e in logs):
                if asyncio.get_running_loop().time() > deadline:
                    pytest.fail("the worker did not notice its dead LISTEN connection in 15 s")
                await asyncio.sleep(0.1)
            answer = await ping_worker(res, timeout=30)
            stop.set()
            await asyncio.wait_for(task, 30)
    assert answer["instance"] == "listen-kill"
    assert sum(e["event"] == "worker_ready" for e in logs) >= 2


def test_granian_sees_a_worker_reaped_by_its_watcher_as_stopped() -> None:
    """The race behind "Killing worker-1 after it refused to gracefully stop" 0.1 s into a stop.

    granian's watcher thread and its stop both wait for a worker; when the watcher reaps it
    first, multiprocessing says the worker is still alive (waitpid fails with ECHILD), and granian
    SIGKILLs a worker that stopped gracefully. `_reap_once` asks the worker's sentinel instead.
    """
    import multiprocessing

    from granian.server.common import AbstractWorker
    from granian.server.mp import WorkerProcess

    from appliance.programs.api import _reap_once

    _reap_once()
    worker = WorkerProcess.__new__(WorkerProcess)
    worker.inner = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
    worker.inner.start()
    try:
        assert worker.is_alive()  # type: ignore[no-untyped-call]
    finally:
        os.kill(worker.inner.pid, signal.SIGTERM)
    os.waitpid(worker.inner.pid, 0)  # reaped elsewhere, as granian's watcher thread does
    assert AbstractWorker.is_alive(worker), "granian's own check would now say alive"  # type: ignore[no-untyped-call]
    assert not worker.is_alive()  # type: ignore[no-untyped-call]
