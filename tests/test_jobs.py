"""Jobs: attempts counted, jittered back-off, parking, re-queueing, transactional enqueue, log
context, metrics; a job taken for lost while its worker still runs it (in-process steps); and,
with real worker processes, a job whose worker is killed and one that keeps killing its worker."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import structlog
from click.testing import CliRunner, Result
from pgqueuer import Job
from pgqueuer.domain.errors import RetryRequested

from appliance import heartbeat, job_attempts, jobs, metrics, queue
from appliance.cli import main
from appliance.config import Config
from appliance.job_attempts import Attempt
from appliance.programs.worker import JobParked, _wrap, run_worker
from appliance.resources import Resources, open_resources
from tests import job_worker
from tests.conftest import REDIS_URL
from tests.support import eventually, wait_for, write_toml

ROOT = Path(__file__).resolve().parent.parent


def sample(name: str, labels: dict[str, str]) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


async def attempts_row(res: Resources, job_id: int) -> dict[str, Any] | None:
    async with res.connection() as conn:
        cur = await conn.execute(
            "SELECT attempts, running, last_error, parked_at, payload, first_attempt_at,"
            " last_attempt_at FROM job_attempts WHERE job_id = %s",
            (job_id,),
        )
        row = await cur.fetchone()
    if row is None:
        return None
    keys = ("attempts", "running", "last_error", "parked_at", "payload", "first", "last")
    return dict(zip(keys, row, strict=True))


async def queue_row(res: Resources, job_id: int) -> tuple[str, datetime] | None:
    async with res.connection() as conn:
        cur = await conn.execute(
            "SELECT status::text, execute_after FROM pgqueuer WHERE id = %s", (job_id,)
        )
        return await cur.fetchone()


async def enqueue(res: Resources, entrypoint: str, payload: bytes) -> int:
    async with res.connection() as conn:
        return await queue.enqueue(conn, entrypoint, payload)


def serve(monkeypatch: pytest.MonkeyPatch, name: str, handler: Any) -> None:
    """A test entrypoint: in the worker's registry, and a name `queue.enqueue` takes."""
    monkeypatch.setitem(jobs.ENTRYPOINTS, name, handler)
    monkeypatch.setattr(queue, "NAMES", (*queue.NAMES, name))


@pytest.fixture
def worker_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Short delays, so that a job's attempts run within a second or two."""
    settings["worker"].update(retry_delay=0.2, retry_max_delay=1.0, max_attempts=3)
    settings["worker"]["poll_interval"] = 0.5
    return settings


@pytest.fixture
async def res(worker_settings: dict[str, Any], migrated: str) -> AsyncIterator[Resources]:
    async with open_resources(Config.model_validate(worker_settings), "test") as res:
        yield res


@contextlib.asynccontextmanager
async def worker(res: Resources) -> AsyncIterator[None]:
    """A worker in this process (register test entrypoints before entering)."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(res, stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def test_backoff_doubles_is_capped_and_jittered() -> None:
    def backoff(n: int, rand: float) -> float:
        return job_attempts.backoff(n, 10.0, 3600.0, lambda: rand)

    assert [backoff(n, 1.0) for n in (1, 2, 3)] == [10, 20, 40]
    assert [backoff(n, 0.0) for n in (1, 2, 3)] == [5, 10, 20]
    assert backoff(30, 1.0) == 3600.0
    assert backoff(1000, 0.0) == 1800.0


def test_every_registered_entrypoint_can_be_enqueued_and_no_other() -> None:
    """appliance/queue.py (a leaf, which features import) and the registry list the same names."""
    assert sorted(queue.NAMES) == sorted(jobs.ENTRYPOINTS)


def test_enqueueing_and_attempt_bookkeeping_import_no_feature() -> None:
    """Features import appliance.queue (and webhooks job_attempts) at module level: neither may
    import a feature package back, or the function-local imports would have to return."""
    code = "import sys, appliance.queue, appliance.job_attempts; print(*sorted(sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    features = {p.name for p in (ROOT / "appliance").iterdir() if (p / "__init__.py").exists()}
    features -= {"config", "db"}  # plumbing packages
    assert "appliance.queue" in loaded
    assert [m for m in loaded if m.startswith("appliance.") and m.split(".")[1] in features] == []


def test_entrypoint_limits(config: Config) -> None:
    async def handler(res: Resources, payload: bytes) -> None:
        return None

    assert jobs.Entrypoint(handler).attempts_allowed(config) == config.worker.max_attempts
    assert jobs.Entrypoint(handler, max_attempts=7).attempts_allowed(config) == 7
    by_config = jobs.Entrypoint(handler, max_attempts=lambda c: c.webhooks.max_attempts)
    assert by_config.attempts_allowed(config) == config.webhooks.max_attempts
    assert jobs.entrypoint("diagnostics.ping").attempts_allowed(config) == 1


async def test_failing_job_is_retried_with_backoff_then_parked(
    monkeypatch: pytest.MonkeyPatch, worker_settings: dict[str, Any], migrated: str
) -> None:
    runs: list[float] = []

    async def broken(res: Resources, payload: bytes) -> None:
        runs.append(time.monotonic())
        raise RuntimeError(f"receiver said no to {payload.decode()}")

    serve(monkeypatch, "test.broken", broken)  # 3 attempts ([worker])
    worker_settings["worker"].update(retry_delay=0.4, retry_max_delay=0.4)  # waits of 0.2-0.4 s
    labels = {"entrypoint": "test.broken"}
    before = {
        action: sample("appliance_job_failures_total", {**labels, "action": action})
        for action in ("retried", "parked")
    }
    async with open_resources(Config.model_validate(worker_settings), "test") as res, worker(res):
        job_id = await enqueue(res, "test.broken", b"order-7")

        async def first_waits() -> tuple[Any, ...] | None:
            """Both tables in one snapshot, once attempt 1 failed and the job waits again."""
            async with res.connection() as conn:
                cur = await conn.execute(
                    "SELECT a.attempts, a.running, a.last_error, a.parked_at, a.last_attempt_at,"
                    " q.execute_after FROM job_attempts a JOIN pgqueuer q ON q.id = a.job_id"
                    " WHERE a.job_id = %s AND q.status = 'queued'",
                    (job_id,),
                )
                return await cur.fetchone()

        waiting = await eventually(first_waits, "the first attempt's back-off", 15)
        attempts, running, last_error, parked_at, last_attempt, execute_after = waiting
        assert (attempts, running, parked_at) == (1, False, None)
        assert last_error == "RuntimeError: receiver said no to order-7"
        assert execute_after - last_attempt >= timedelta(seconds=0.2)

        async def parked() -> dict[str, Any] | None:
            row = await attempts_row(res, job_id)
            return row if row and row["parked_at"] else None

        row = await eventually(parked, "the job to be parked", 20)

        async def forgotten() -> bool:
            return await queue_row(res, job_id) is None

        await eventually(forgotten, "pgqueuer to drop the parked job", 10)  # we keep it
        async with res.connection() as conn:
            listed = await job_attempts.parked(conn, 1000)
    assert len(runs) == 3
    assert runs[1] - runs[0] >= 0.2 and runs[2] - runs[1] >= 0.2  # each waited its back-off
    assert row["attempts"] == 3
    assert row["payload"] == b"order-7"
    assert row["last_error"] == "RuntimeError: receiver said no to order-7"
    assert row["first"] < row["last"] <= row["parked_at"]
    assert [(p.attempts, p.payload_bytes) for p in listed if p.id == job_id] == [(3, 7)]
    for action, more in (("retried", 2), ("parked", 1)):
        after = sample("appliance_job_failures_total", {**labels, "action": action})
        assert after == before[action] + more


async def test_timed_out_attempts_count_and_park(
    monkeypatch: pytest.MonkeyPatch, worker_settings: dict[str, Any], migrated: str
) -> None:
    async def slow(res: Resources, payload: bytes) -> None:
        await asyncio.sleep(30)

    serve(monkeypatch, "test.slow2", jobs.Entrypoint(slow, max_attempts=2))
    worker_settings["worker"]["job_timeout"] = 0.3
    labels = {"entrypoint": "test.slow2", "status": "timeout"}
    before = sample("appliance_jobs_total", labels)
    async with open_resources(Config.model_validate(worker_settings), "test") as res, worker(res):
        job_id = await enqueue(res, "test.slow2", b"{}")

        async def parked() -> dict[str, Any] | None:
            row = await attempts_row(res, job_id)
            return row if row and row["parked_at"] else None

        row = await eventually(parked, "the job to be parked", 20)
    assert row["attempts"] == 2
    assert row["last_error"] == "timed out after 0.3 s"
    assert sample("appliance_jobs_total", labels) == before + 2


async def test_handler_log_lines_carry_job_id_entrypoint_and_attempt(
    monkeypatch: pytest.MonkeyPatch, res: Resources
) -> None:
    done = asyncio.Event()

    async def chatty(res: Resources, payload: bytes) -> None:
        structlog.get_logger().info("inside_handler", detail=payload.decode())
        done.set()

    serve(monkeypatch, "test.chatty", chatty)
    before = sample("appliance_job_attempts_total", {"entrypoint": "test.chatty"})
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as logs:
        async with worker(res):
            job_id = await enqueue(res, "test.chatty", b"hello")
            await asyncio.wait_for(done.wait(), 15)

            async def cleared() -> bool:
                return await attempts_row(res, job_id) is None

            await eventually(cleared, "the count of a finished job to be cleared", 10)
    context = {"job_id": job_id, "entrypoint": "test.chatty", "attempt": 1}
    inside = [e for e in logs if e["event"] == "inside_handler"]
    assert len(inside) == 1 and inside[0]["detail"] == "hello"
    assert context.items() <= inside[0].items()
    finished = [e for e in logs if e["event"] == "job_done" and e.get("job_id") == job_id]
    assert len(finished) == 1 and context.items() <= finished[0].items()
    assert finished[0]["status"] == "ok"
    assert sample("appliance_job_attempts_total", {"entrypoint": "test.chatty"}) == before + 1
    # Nothing leaks into lines logged outside the job.
    assert not any("job_id" in e for e in logs if e["event"] == "worker_ready")


async def test_queue_depth_gauge_counts_queued_and_parked(
    monkeypatch: pytest.MonkeyPatch, res: Resources
) -> None:
    """The worker refreshes the gauge every [appliance] heartbeat_interval (1 s in tests)."""

    async def never(res: Resources, payload: bytes) -> None:
        raise AssertionError("a job deferred by an hour ran")

    serve(monkeypatch, "test.later", never)
    async with res.connection() as conn:
        later = await queue.enqueue(conn, "test.later", b"", execute_after=timedelta(hours=1))
        await conn.execute(
            "INSERT INTO job_attempts (job_id, entrypoint, attempts, running, worker, last_error,"
            " parked_at, payload) VALUES (-1, 'test.later', 5, false, 'w', 'boom', now(), '')"
        )
    try:
        async with worker(res):

            async def counted() -> bool:
                queued = sample(
                    "appliance_job_queue_depth", {"entrypoint": "test.later", "status": "queued"}
                )
                parked = sample(
                    "appliance_job_queue_depth", {"entrypoint": "test.later", "status": "parked"}
                )
                return queued == 1 and parked == 1

            await eventually(counted, "the queue depth gauge", 10)
        text = metrics.render().decode()
        for name in ("appliance_job_queue_depth", "appliance_job_attempts_total",
                     "appliance_jobs_total", "appliance_job_duration_seconds"):  # fmt: skip
            assert name in text
    finally:
        async with res.connection() as conn:
            await conn.execute("DELETE FROM pgqueuer WHERE id = %s", (later,))
            await conn.execute("DELETE FROM job_attempts WHERE job_id = -1")


async def test_enqueue_is_transactional_on_a_pooled_connection(
    monkeypatch: pytest.MonkeyPatch, res: Resources
) -> None:
    async def count() -> int:
        async with res.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM pgqueuer WHERE entrypoint = 'test.tx'")
            row = await cur.fetchone()
            return int(row[0]) if row else -1

    serve(monkeypatch, "test.tx", jobs.entrypoint("diagnostics.noop").handler)
    try:
        async with res.connection() as conn:
            with pytest.raises(RuntimeError):
                async with conn.transaction():
                    await queue.enqueue(conn, "test.tx", b"", execute_after=timedelta(hours=1))
                    assert await count() == 0  # not visible outside before commit
                    raise RuntimeError("the business step failed")
        assert await count() == 0
        async with res.connection() as conn, conn.transaction():
            job_id = await queue.enqueue(conn, "test.tx", b"", execute_after=timedelta(hours=1))
        assert await count() == 1
        status, execute_after = await queue_row(res, job_id) or ("", datetime.now(UTC))
        assert status == "queued"
        assert execute_after > datetime.now(UTC) + timedelta(minutes=59)
    finally:
        async with res.connection() as conn:
            await conn.execute("DELETE FROM pgqueuer WHERE entrypoint = 'test.tx'")


async def test_enqueue_many_is_one_statement_in_order_and_names_are_checked(
    monkeypatch: pytest.MonkeyPatch, res: Resources
) -> None:
    serve(monkeypatch, "test.many", jobs.entrypoint("diagnostics.noop").handler)
    try:
        async with res.connection() as conn:
            with pytest.raises(RuntimeError):
                async with conn.transaction():
                    await queue.enqueue_many(conn, "test.many", [b"x", b"y"])
                    raise RuntimeError("the business step failed")
            assert await queue.enqueue_many(conn, "test.many", []) == []
            with pytest.raises(ValueError, match="unknown job entrypoint"):
                await queue.enqueue_many(conn, "test.nobody", [b"x"])
            async with conn.transaction():
                ids = await queue.enqueue_many(conn, "test.many", [b"a", b"b", b"c"])
            cur = await conn.execute(
                "SELECT id, payload FROM pgqueuer WHERE entrypoint = 'test.many' ORDER BY id"
            )
            rows = await cur.fetchall()
        assert [(i, bytes(p)) for i, p in rows] == list(zip(ids, [b"a", b"b", b"c"], strict=True))
    finally:
        async with res.connection() as conn:
            await conn.execute("DELETE FROM pgqueuer WHERE entrypoint = 'test.many'")


async def test_job_cut_off_at_drain_keeps_its_count_under_its_new_id(
    monkeypatch: pytest.MonkeyPatch, res: Resources
) -> None:
    started = asyncio.Event()

    async def long_job(res: Resources, payload: bytes) -> None:
        started.set()
        await asyncio.sleep(3600)

    serve(monkeypatch, "test.long2", long_job)
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(res, stop))
    job_id = await enqueue(res, "test.long2", b"x")
    await asyncio.wait_for(started.wait(), 15)
    stop.set()
    await asyncio.sleep(0.2)
    task.cancel()  # the drain deadline
    with pytest.raises(asyncio.CancelledError):
        await task
    async with res.connection() as conn:
        cur = await conn.execute(
            "SELECT q.id, a.attempts, a.running FROM pgqueuer q"
            " JOIN job_attempts a ON a.job_id = q.id WHERE q.entrypoint = 'test.long2'"
        )
        rows = await cur.fetchall()
        await conn.execute("DELETE FROM pgqueuer WHERE entrypoint = 'test.long2'")
    assert len(rows) == 1
    new_id, attempts, running = rows[0]
    assert new_id != job_id
    assert (attempts, running) == (0, False)  # the cut-off attempt is not the job's fault
    assert await attempts_row(res, job_id) is None


def a_job_id() -> int:
    """An id no pgqueuer job has (theirs count up from 1), for bookkeeping-only steps."""
    return -(time.time_ns() // 1000)


def picked(job_id: int, entrypoint: str, payload: bytes) -> Job:
    """The job as pgqueuer hands it to a handler."""
    now = datetime.now(UTC)
    return Job(
        id=job_id, priority=0, created=now, updated=now, heartbeat=now, execute_after=now,
        status="picked", entrypoint=entrypoint, payload=payload, queue_manager_id=None,
        headers=None,
    )  # fmt: skip


async def test_a_stale_attempt_changes_nothing_of_the_newer_one(res: Resources) -> None:
    """Worker A's attempt 1 is taken for lost; B counts it and runs attempt 2. A's late success
    or failure leaves B's row alone, and B's failure parks the job where `jobs failed` shows it.
    And a late success of an attempt counted as lost, with no newer attempt yet, ends the job."""
    job_id, a, b = a_job_id(), "host-a pid 1", "host-b pid 2"
    async with res.connection() as conn:
        first = await job_attempts.begin(conn, job_id, "test.x", a)
        assert (first.action, first.attempt) == ("run", Attempt(job_id, 1, a))
        lost = await job_attempts.begin(conn, job_id, "test.x", b)
        assert (lost.action, lost.attempt) == ("lost", first.attempt)
        assert lost.started is not None and lost.error and a in lost.error
        assert (await attempts_row(res, job_id) or {})["running"] is True  # nothing written
        assert await job_attempts.failed(conn, lost.attempt, lost.error, park=False, payload=b"")
        second = await job_attempts.begin(conn, job_id, "test.x", b)
        assert (second.action, second.attempt) == ("run", Attempt(job_id, 2, b))

        assert await job_attempts.succeeded(conn, [first.attempt]) == [first.attempt]  # A back
        assert not await job_attempts.failed(conn, first.attempt, "late", park=True, payload=b"")
        row = await attempts_row(res, job_id) or {}
        assert (row["attempts"], row["running"], row["parked_at"]) == (2, True, None)

        assert await job_attempts.failed(conn, second.attempt, "E: no", park=True, payload=b"p")
        [shown] = [p for p in await job_attempts.parked(conn, 1000) if p.id == job_id]
        assert (shown.attempts, shown.last_error, shown.payload_bytes) == (2, "E: no", 1)
        await job_attempts.discard(conn, job_id)

        other = a_job_id()
        mine = (await job_attempts.begin(conn, other, "test.x", a)).attempt
        taken = await job_attempts.begin(conn, other, "test.x", b)
        assert await job_attempts.failed(conn, taken.attempt, "lost", park=False, payload=b"")
        assert await job_attempts.succeeded(conn, [mine]) == []
        assert await attempts_row(res, other) is None


async def test_a_job_taken_for_lost_waits_while_its_worker_still_runs_it(
    monkeypatch: pytest.MonkeyPatch, res: Resources
) -> None:
    """The review's sequence through the worker's handler (`_wrap`), without a real stall:
    attempt 1 runs; pgqueuer hands the job out again (its heartbeat lapsed). While the worker
    running attempt 1 demonstrably runs (this process's running set; another process's fresh
    heartbeat), the job goes back, uncounted. Once the evidence is gone (a heartbeat from a
    process started after the attempt: a reused pid), attempt 2 runs beside it; attempt 1's late
    success then leaves attempt 2's row alone, and attempt 2's failure parks the job."""
    name, job_id = "test.held", a_job_id()
    calls: list[int] = []
    release = [asyncio.Event(), asyncio.Event()]

    async def held(res: Resources, payload: bytes) -> None:
        calls.append(len(calls) + 1)
        n = len(calls)
        await release[n - 1].wait()
        if n == 2:
            raise RuntimeError("the second run failed")

    serve(monkeypatch, name, jobs.Entrypoint(held, max_attempts=2))
    job = picked(job_id, name, b"p")
    running: set[int] = set()
    instance = res.config.appliance.instance
    elsewhere = dataclasses.replace(
        res, config=res.config.model_copy(update={"appliance": res.config.appliance.model_copy(
            update={"instance": "elsewhere"})})
    )  # fmt: skip

    async def beat(started: float) -> None:
        await heartbeat.beat(res.redis, res.keys, "worker", instance, 1.0, started)

    async def row() -> tuple[int, bool, Any]:
        found = await attempts_row(res, job_id) or {}
        return found["attempts"], found["running"], found["parked_at"]

    with structlog.testing.capture_logs() as logs:
        first = asyncio.create_task(_wrap(res, name, running)(job))
        await eventually(lambda: asyncio.sleep(0, bool(calls)), "attempt 1 to start", 10)
        # Picked again by another worker of this process: attempt 1 is in its running set.
        with pytest.raises(RetryRequested):
            await asyncio.wait_for(_wrap(res, name, running)(job), 10)
        # Picked by a worker elsewhere; this process's worker heartbeat is fresh.
        await beat(time.time() - 60)
        with pytest.raises(RetryRequested):
            await asyncio.wait_for(_wrap(elsewhere, name)(job), 10)
        assert calls == [1] and await row() == (1, True, None)
        # The heartbeat now comes from a process that started after attempt 1 began.
        await beat(time.time() + 60)
        second = asyncio.create_task(_wrap(elsewhere, name)(job))
        await eventually(lambda: asyncio.sleep(0, len(calls) == 2), "attempt 2 to start", 10)
        assert await row() == (2, True, None)
        release[0].set()
        await asyncio.wait_for(first, 10)  # a success no longer the job's running attempt
        assert await row() == (2, True, None)
        release[1].set()
        with pytest.raises(JobParked):
            await asyncio.wait_for(second, 10)
    await res.redis.delete(res.keys.heartbeat("worker", instance))
    attempts, running_now, parked_at = await row()
    assert (attempts, running_now) == (2, False) and parked_at is not None
    async with res.connection() as conn:
        [shown] = [p for p in await job_attempts.parked(conn, 1000) if p.id == job_id]
        await job_attempts.discard(conn, job_id)
    assert shown.last_error == "RuntimeError: the second run failed"
    events = [e["event"] for e in logs]
    assert events.count("job_still_running") == 2
    assert events.count("job_lost") == 1 and "job_attempt_superseded" in events
    assert not running  # nothing left marked as running here


def cli(config: Path, *args: str) -> Result:
    """`appliance ARGS` in this process (call it in a thread: the CLI runs its own event loop)."""
    return CliRunner().invoke(main, list(args), env={"APPLIANCE_CONFIG": str(config)})


async def park(res: Resources, job_id: int, entrypoint: str, payload: bytes) -> None:
    """A job parked as the worker parks one (say, pings that failed through an outage)."""
    async with res.connection() as conn:
        await conn.execute(
            "INSERT INTO job_attempts (job_id, entrypoint, attempts, running, worker, last_error,"
            " first_attempt_at, last_attempt_at, parked_at, payload) VALUES (%s, %s, 5, false,"
            " 'test pid 1', 'OperationalError: the outage', now() - interval '1 hour',"
            " now() - interval '1 minute', now() - interval '1 minute', %s)",
            (job_id, entrypoint, payload),
        )


async def test_cli_lists_failed_jobs_retries_and_discards_them(
    settings: dict[str, Any], fresh_database: Any, tmp_path: Path
) -> None:
    """On a database of its own, so that `--all` sees only these parked jobs."""
    from tests.support import migrated_db

    settings["postgres"]["dsn"] = fresh_database()
    await migrated_db(settings["postgres"]["dsn"])
    config = write_toml(tmp_path / "c.toml", settings)
    run = functools.partial(asyncio.to_thread, cli, config)
    async with open_resources(Config.model_validate(settings), "test") as res:
        tokens = {9001: "tok-a", 9002: "tok-b", 9003: "tok-c"}
        for job_id, token in tokens.items():
            await park(res, job_id, "diagnostics.ping", json.dumps({"token": token}).encode())
        await park(res, 9004, "gone.away", b"")  # an entrypoint this version no longer has

        done, text, status, gone, usage, unknown = [
            await run(*args)
            for args in (
                ("jobs", "failed", "--json"),
                ("jobs", "failed"),
                ("status",),
                ("jobs", "retry", "9004"),
                ("jobs", "retry"),
                ("jobs", "discard", "424242"),
            )
        ]
        assert done.exit_code == 0, done.output
        failed = {j["id"]: j for j in json.loads(done.stdout)}
        assert sorted(failed) == [9001, 9002, 9003, 9004]
        assert failed[9001]["attempts"] == 5
        assert failed[9001]["last_error"] == "OperationalError: the outage"
        assert failed[9001]["entrypoint"] == "diagnostics.ping"
        assert "OperationalError: the outage" in text.stdout and "9004" in text.stdout
        assert "failed jobs (parked): 4" in status.stdout, status.output
        assert gone.exit_code == 1 and "gone.away" in gone.stderr  # it stays parked
        assert usage.exit_code == 2 and "JOB_ID or --all" in usage.stderr
        assert unknown.exit_code == 1 and "no parked job 424242" in unknown.stderr

        one = await run("jobs", "retry", "9001", "--json")
        assert one.exit_code == 0, one.output
        [requeued] = json.loads(one.stdout)
        assert requeued["id"] == 9001 and requeued["new_id"] > 0
        listed = await run("jobs", "list", "--json")
        listed_text = await run("jobs", "list")
        missing = await run("jobs", "retry", "9001")  # queued again already: no longer parked
        assert listed.exit_code == 0, listed.output
        [queued] = [j for j in json.loads(listed.stdout) if j["id"] == requeued["new_id"]]
        assert (queued["entrypoint"], queued["status"], queued["attempts"]) == (
            "diagnostics.ping", "queued", 0
        )  # fmt: skip
        assert f"{requeued['new_id']} " in listed_text.stdout
        assert missing.exit_code == 1 and "no parked job 9001" in missing.stderr

        every = await run("jobs", "retry", "--all", "--json")
        assert every.exit_code == 1  # one job could not be queued again: said, not hidden
        outcome = {r["id"]: r for r in json.loads(every.stdout)}
        assert sorted(outcome) == [9002, 9003, 9004]
        assert outcome[9004]["new_id"] is None
        assert outcome[9004]["skipped"] == "unknown entrypoint"
        async with res.connection() as conn:
            assert [p.id for p in await job_attempts.parked(conn, 10)] == [9004]
        discarded = await run("jobs", "discard", "9004", "--json")
        assert json.loads(discarded.stdout) == [9004], discarded.output
        async with res.connection() as conn:
            assert await job_attempts.parked(conn, 10) == []

        async with worker(res):  # the re-queued jobs run

            async def answered() -> bool:
                keys = [res.keys.ping_result(t) for t in tokens.values()]
                return all(await asyncio.gather(*(res.redis.exists(k) for k in keys)))

            await eventually(answered, "the three re-queued pings to run", 20)


def start_worker(config: Path, out: Path) -> subprocess.Popen[bytes]:
    with out.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.job_worker"],
            cwd=ROOT,
            env={"APPLIANCE_CONFIG": str(config), "PATH": os.environ["PATH"]},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def starts(client: redis.Redis, key: str) -> list[tuple[int, float]]:
    """(pid, time) of each attempt the test handlers recorded."""
    return [(int(p), float(t)) for p, t in (e.decode().split() for e in client.lrange(key, 0, -1))]


def process_settings(settings: dict[str, Any], tmp_path: Path, instance: str) -> Path:
    settings["appliance"]["instance"] = instance
    settings["appliance"]["run_dir"] = str(tmp_path / "run")
    return write_toml(tmp_path / "c.toml", settings)


def ready(out: Path, count: int) -> bool:
    return out.exists() and out.read_text().count('"worker_ready"') >= count


@pytest.mark.process
async def test_job_of_a_killed_worker_runs_again_within_seconds(
    settings: dict[str, Any], migrated: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker process running a job gets SIGKILL; another worker (in this process, started
    meanwhile) runs the job again, once the dead worker's heartbeat key has expired (until then
    it may be only stalled). Short timings: [worker] heartbeat_timeout 1 s, poll_interval 0.5 s,
    [appliance] heartbeat_interval 0.5 s (its key lives 2 s). The seconds from the kill to the
    second start are printed, not asserted."""
    serve(monkeypatch, "test.hang", job_worker.hang)
    settings["worker"].update(heartbeat_timeout=1.0, poll_interval=0.5, retry_delay=0.5)
    settings["appliance"]["heartbeat_interval"] = 0.5
    config = process_settings(settings, tmp_path, "jobs-kill")
    key = f"{settings['redis']['key_prefix']}:test:hang:{time.time_ns()}"
    log = tmp_path / "w.log"
    async with open_resources(Config.model_validate(settings), "test") as res:

        async def started(count: int) -> list[tuple[int, float]]:
            entries = await res.redis.lrange(key, 0, -1)
            return [(int(p), float(t)) for p, t in (e.decode().split() for e in entries)][count:]

        with processes() as procs:
            procs.append(start_worker(config, log))
            await asyncio.to_thread(wait_for, lambda: ready(log, 1), 30, "the worker")
            job_id = await enqueue(res, "test.hang", key.encode())
            [(pid, _)] = await eventually(lambda: started(0), "the first attempt", 15)
            assert pid == procs[0].pid
            stop = asyncio.Event()
            survivor = asyncio.create_task(run_worker(res, stop))
            killed = time.time()
            os.kill(pid, signal.SIGKILL)
            [(other, again)] = await eventually(lambda: started(1), "the job to run again", 60)
            row = await attempts_row(res, job_id)
            stop.set()
            await asyncio.sleep(0.2)
            survivor.cancel()  # the drain deadline: the hanging job is queued again
            with pytest.raises(asyncio.CancelledError):
                await survivor
        await forget(settings, "test.hang")
    assert other == os.getpid()
    assert row is not None and (row["attempts"], row["running"]) == (2, True)  # lost, then 2
    assert "died or lost its heartbeat" in row["last_error"]
    print(f"\ndead-worker recovery: {again - killed:.2f} s from SIGKILL to the job's next start")


@pytest.mark.process
def test_a_job_that_kills_its_worker_is_parked_after_its_attempts(
    settings: dict[str, Any], migrated: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`test.die` calls os._exit in its worker (2 attempts). Each time a worker dies, the test
    starts another, as supervisord would; the third finds the second attempt lost too and parks
    the job instead of running it again."""
    serve(monkeypatch, "test.die", job_worker.die)
    settings["worker"].update(heartbeat_timeout=1.0, poll_interval=0.5, retry_delay=0.1)
    config = process_settings(settings, tmp_path, "jobs-die")
    key = f"{settings['redis']['key_prefix']}:test:die:{time.time_ns()}"
    client = redis.Redis.from_url(REDIS_URL)
    out = tmp_path / "w.log"
    job_id = asyncio.run(enqueue_on(settings, "test.die", key.encode()))

    def parked() -> Any:
        row = asyncio.run(attempts_of(settings, job_id))
        return row if row and row[3] else None

    with processes() as procs:
        procs.append(start_worker(config, out))
        deadline = time.monotonic() + 90
        while not (row := parked()):
            assert time.monotonic() < deadline, out.read_text()[-3000:]
            if procs[-1].poll() is not None:  # it died running the job: restart it
                assert procs[-1].returncode == 3
                procs.append(start_worker(config, out))
            time.sleep(0.2)
        wait_for(lambda: ready(out, len(procs)), 30, "the last worker")
        assert procs[-1].poll() is None  # the one that parked it did not run it
    client_starts = starts(client, key)
    client.close()
    assert len(procs) == 3, out.read_text()[-3000:]
    assert [pid for pid, _ in client_starts] == [procs[0].pid, procs[1].pid]
    attempts, running, last_error, _ = row
    assert (attempts, running) == (job_worker.DIE_ATTEMPTS, False)
    assert "died or lost its heartbeat" in last_error
    lines = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
    ours = [line for line in lines if line.get("job_id") == job_id]
    lost = [line for line in ours if line["event"] == "job_lost"]
    assert [line["attempt"] for line in lost] == [1, 2]
    assert all(line["entrypoint"] == "test.die" for line in lost)
    assert [line["attempts"] for line in ours if line["event"] == "job_parked"] == [2]


async def enqueue_on(settings: dict[str, Any], entrypoint: str, payload: bytes) -> int:
    conn = await psycopg.AsyncConnection.connect(settings["postgres"]["dsn"], autocommit=True)
    try:
        return await queue.enqueue(conn, entrypoint, payload)
    finally:
        await conn.close()


async def attempts_of(settings: dict[str, Any], job_id: int) -> tuple[Any, ...] | None:
    conn = await psycopg.AsyncConnection.connect(settings["postgres"]["dsn"], autocommit=True)
    try:
        cur = await conn.execute(
            "SELECT attempts, running, last_error, parked_at FROM job_attempts WHERE job_id = %s",
            (job_id,),
        )
        return await cur.fetchone()
    finally:
        await conn.close()


async def forget(settings: dict[str, Any], entrypoint: str) -> None:
    """Drop what a test left queued, so that later workers on this database do not run it."""
    conn = await psycopg.AsyncConnection.connect(settings["postgres"]["dsn"], autocommit=True)
    try:
        await conn.execute(
            "DELETE FROM job_attempts WHERE job_id IN (SELECT id FROM pgqueuer"
            " WHERE entrypoint = %s)",
            (entrypoint,),
        )
        await conn.execute("DELETE FROM pgqueuer WHERE entrypoint = %s", (entrypoint,))
    finally:
        await conn.close()


async def test_bookkeeping_failures_neither_lose_nor_run_a_job_uncounted(
    monkeypatch: pytest.MonkeyPatch, worker_settings: dict[str, Any], fresh_database: Any
) -> None:
    """The attempts table made unreachable (renamed away: a real PostgreSQL error) at each step
    of a job's bookkeeping, on a database of its own. Before the attempt: the job goes back to
    the queue uncounted and runs once the table is back. After a failed attempt: the job is
    retried anyway, and the next pick counts the attempt as lost. After a success: the count is
    left behind, and the sweep forgets it once pgqueuer has dropped the job."""
    from tests.support import migrated_db

    worker_settings["postgres"]["dsn"] = fresh_database()
    await migrated_db(worker_settings["postgres"]["dsn"])
    runs: list[tuple[str, int]] = []
    away = asyncio.Event()

    async def rename(res: Resources, gone: bool) -> None:
        names = ("job_attempts", "job_attempts_away")
        async with res.connection() as conn:
            await conn.execute(f"ALTER TABLE {names[gone is False]} RENAME TO {names[gone]}")

    async def step(res: Resources, payload: bytes) -> None:
        runs.append((payload.decode(), structlog.contextvars.get_contextvars()["attempt"]))
        if payload == b"fail-unrecorded" and len(runs) == 1:
            await rename(res, gone=True)
            away.set()
            raise RuntimeError("first run fails, and its failure cannot be recorded")
        if payload == b"ok-uncleared":
            await rename(res, gone=True)
            away.set()

    serve(monkeypatch, "test.step", step)

    async def events() -> list[str]:
        return [e["event"] for e in logs]

    async with open_resources(Config.model_validate(worker_settings), "test") as res:
        with structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars]
        ) as logs:
            async with worker(res):
                # 1. Nothing can be counted: the job waits, uncounted.
                await rename(res, gone=True)
                deferred = await enqueue(res, "test.step", b"deferred")

                async def was_deferred() -> bool:
                    return "job_deferred" in await events()

                await eventually(was_deferred, "the job to be deferred", 15)
                assert runs == []
                assert (await queue_row(res, deferred) or ("",))[0] in ("queued", "picked")
                await rename(res, gone=False)

                async def ran(count: int) -> bool:
                    return len(runs) >= count

                await eventually(lambda: ran(1), "the deferred job to run", 15)
                assert runs == [("deferred", 1)]

                # 2. A failure that cannot be recorded: retried, then counted as lost.
                runs.clear()
                away.clear()
                job_id = await enqueue(res, "test.step", b"fail-unrecorded")
                await asyncio.wait_for(away.wait(), 15)

                async def not_recorded() -> bool:
                    return "job_attempt_not_recorded" in await events()

                await eventually(not_recorded, "the failed bookkeeping", 15)
                await rename(res, gone=False)
                await eventually(lambda: ran(2), "the job to run again", 20)
                assert runs == [("fail-unrecorded", 1), ("fail-unrecorded", 2)]
                lost = [e for e in logs if e["event"] == "job_lost" and e["job_id"] == job_id]
                assert [e["attempt"] for e in lost] == [1]

                # 3. A success whose count cannot be cleared.
                away.clear()
                done_id = await enqueue(res, "test.step", b"ok-uncleared")
                await asyncio.wait_for(away.wait(), 15)

                async def not_cleared() -> bool:
                    return any(
                        e["event"] == "job_count_not_cleared" and done_id in e["job_ids"]
                        for e in logs
                    )

                await eventually(not_cleared, "the uncleared count", 15)
                await rename(res, gone=False)

                async def dropped() -> bool:
                    return await queue_row(res, done_id) is None

                await eventually(dropped, "pgqueuer to drop the finished job", 10)
        assert await attempts_row(res, done_id) is not None
        # Every success whose count could not be cleared (a batch may hold earlier jobs too).
        uncleared = {i for e in logs if e["event"] == "job_count_not_cleared" for i in e["job_ids"]}
        async with res.connection() as conn:
            assert await job_attempts.sweep(conn, 0) == len(uncleared)
        assert await attempts_row(res, done_id) is None
        assert await attempts_row(res, job_id) is None  # finished: cleared


async def test_a_parked_job_picked_again_is_not_run(
    monkeypatch: pytest.MonkeyPatch, res: Resources
) -> None:
    """Parked, but its worker died before pgqueuer dropped it: the next pick drops it unrun."""

    async def never(res: Resources, payload: bytes) -> None:
        raise AssertionError("a parked job ran")

    serve(monkeypatch, "test.parked", never)
    job_id = await enqueue(res, "test.parked", b"p")
    await park(res, job_id, "test.parked", b"p")
    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as logs:
        async with worker(res):

            async def dropped() -> bool:
                return await queue_row(res, job_id) is None

            await eventually(dropped, "the parked job to be dropped", 15)
    assert [e["job_id"] for e in logs if e["event"] == "job_already_parked"] == [job_id]
    row = await attempts_row(res, job_id)
    assert row is not None and row["parked_at"] is not None and row["attempts"] == 5
    async with res.connection() as conn:
        await conn.execute("DELETE FROM job_attempts WHERE job_id = %s", (job_id,))
