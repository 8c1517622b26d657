"""The worker: pgqueuer on its own autocommit connections, woken by LISTEN/NOTIFY.

Each entrypoint runs under `[worker] job_timeout` (pgqueuer has no per-job timeout), its log lines
carry the job's id, entrypoint and attempt, and it is counted and timed by entrypoint and status.
Attempts are counted before the handler runs (appliance/job_attempts.py), so a job that raises,
times out or kills its worker is retried after a jittered back-off up to its entrypoint's limit,
then parked as failed: never re-picked forever. A job whose heartbeat lapsed while the worker
running it still runs (a stalled event loop, a lost connection) is not run beside it: the worker
that picked it again sees that worker's heartbeat and puts the job back, uncounted, for a back-off.
A job still running when the drain deadline cancels it is enqueued again before pgqueuer drops it,
so shutdown never loses a job (at least once). Losing PostgreSQL (or the LISTEN connection) makes
the worker reconnect with back-off instead of exiting, so a database failover does not take the
container down. The LISTEN connection is checked every `LIVENESS_INTERVAL` seconds: a dead one is
noticed within a few seconds, not at the next poll.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import structlog
from pgqueuer import Job, QueueManager
from pgqueuer.domain.errors import FailingListenerError, RetryRequested
from pgqueuer.queries import Queries
from psycopg import Error as PgError
from redis.exceptions import RedisError

from appliance import heartbeat, job_attempts, metrics
from appliance.db.queue_driver import SplitDriver, connect_worker
from appliance.job_attempts import Attempt
from appliance.jobs import ENTRYPOINTS, Handler, entrypoint
from appliance.queue import enqueue
from appliance.resources import Resources
from appliance.webhooks.dispatch import run_dispatcher

log = structlog.get_logger()

MAX_BACKOFF = 30.0
LIVENESS_INTERVAL = 2.0  # seconds between checks of the LISTEN connection
LIVENESS_TIMEOUT = 5.0  # seconds it may take to answer one
SESSION_SERVED = 60.0  # seconds after which a lost session's reconnect back-off starts over
SWEEP_AFTER = 3600.0  # seconds before the count of a job pgqueuer no longer holds is forgotten


FORGET_INTERVAL = 0.05  # seconds successes gather before their counts are forgotten together


class Successes:
    """Attempts that succeeded, whose counts are forgotten together every `FORGET_INTERVAL`: one
    statement for all the jobs that ended meanwhile, off each job's path. A worker that dies
    first leaves their rows to the sweep (`_watch_queue`), once pgqueuer no longer holds their
    jobs: a success is never undone."""

    def __init__(self, res: Resources) -> None:
        self.res = res
        self.pending: list[Attempt] = []
        self._added = asyncio.Event()

    def add(self, attempt: Attempt) -> None:
        self.pending.append(attempt)
        self._added.set()

    async def run(self) -> None:
        """Until cancelled; the owner calls `forget` once more after it."""
        while True:
            await self._added.wait()
            await asyncio.sleep(FORGET_INTERVAL)
            self._added.clear()
            await self.forget()

    async def forget(self) -> None:
        done, self.pending = self.pending, []
        if not done:
            return
        try:
            async with self.res.connection() as conn:
                stale = await job_attempts.succeeded(conn, done)
        except PgError as exc:  # the sweep forgets the rows once the jobs are gone
            log.warning(
                "job_count_not_cleared",
                job_ids=[a.job_id for a in done],
                error=str(exc) or type(exc).__name__,
            )
            return
        for attempt in stale:
            # Counted as lost by another worker meanwhile, which runs a newer attempt: that one
            # keeps its own record.
            log.warning("job_attempt_superseded", job_id=attempt.job_id, attempt=attempt.number)


class JobParked(Exception):
    """Raised for a job out of attempts, so that pgqueuer logs it as an exception and deletes it
    from its queue; `job_attempts` keeps it (`appliance jobs failed`)."""


def _wrap(
    res: Resources,
    name: str,
    running: set[int] | None = None,
    successes: Successes | None = None,
) -> Callable[[Job], Coroutine[Any, Any, None]]:
    """The pgqueuer handler for entrypoint `name`. `running`: the ids of the jobs this worker is
    running now, shared by its entrypoints (it tells a lost attempt of this very process that
    still runs from one that ended unrecorded). `successes`: where succeeded attempts go to be
    forgotten together (None: each at once)."""
    entry = entrypoint(name)
    limit = entry.attempts_allowed(res.config)
    section = res.config.worker
    timeout = section.job_timeout
    worker = f"{res.config.appliance.instance} pid {os.getpid()}"
    mine: set[int] = set() if running is None else running

    async def requeue(job_id: int, payload: bytes) -> None:
        async with res.connection() as conn, conn.transaction():
            new_id = await enqueue(conn, name, payload)
            await job_attempts.carry_over(conn, job_id, new_id)

    def retry(attempt: int, reason: str) -> RetryRequested:
        delay = job_attempts.backoff(attempt, section.retry_delay, section.retry_max_delay)
        metrics.JOB_FAILURES.labels(name, "retried").inc()
        log.warning("job_retry", attempts=attempt, of=limit, retry_in_s=round(delay, 3))
        return RetryRequested(delay=timedelta(seconds=delay), reason=reason)

    async def record(attempt: Attempt, error: str, park: bool, payload: bytes) -> bool | None:
        """`failed`: True recorded, False not this attempt's row any more, None not written."""
        try:
            async with res.connection() as conn:
                return await job_attempts.failed(conn, attempt, error, park=park, payload=payload)
        except PgError as exc:
            # Not recorded: the attempt still reads as running, so the next pick counts it as
            # lost. Retry (parking needs the row), however many attempts it had.
            log.warning("job_attempt_not_recorded", error=str(exc) or type(exc).__name__)
            return None

    async def settle(attempt: Attempt, error: str, payload: bytes) -> NoReturn:
        """After failed `attempt`: park the job if it was the last, else retry it later."""
        recorded = await record(attempt, error, attempt.number >= limit, payload)
        if recorded is False:
            # Another worker counted this attempt as lost while it ran, and its record (and any
            # newer attempt) stands. Back to the queue: if pgqueuer dropped the job here, a
            # newer attempt that fails could not be retried.
            log.warning("job_attempt_superseded", attempt=attempt.number)
        elif recorded and attempt.number >= limit:
            metrics.JOB_FAILURES.labels(name, "parked").inc()
            log.error("job_parked", attempts=attempt.number, error=error)
            raise JobParked(
                f"{name} job {attempt.job_id} parked after {attempt.number} attempts: {error}"
            )
        raise retry(attempt.number, error)

    async def begin(job_id: int) -> job_attempts.Start:
        try:
            async with res.connection() as conn:
                return await job_attempts.begin(conn, job_id, name, worker)
        except PgError as exc:
            # Never run uncounted: back to the queue (pgqueuer's own connection may still work).
            log.warning("job_deferred", error=str(exc) or type(exc).__name__)
            raise RetryRequested(
                delay=timedelta(seconds=section.retry_delay),
                reason="its attempt could not be recorded",
            ) from exc

    async def run(job: Job) -> None:
        job_id = int(job.id)
        payload = job.payload or b""
        with structlog.contextvars.bound_contextvars(job_id=job_id, entrypoint=name):
            try:
                await process(job_id, payload)
            except asyncio.CancelledError:
                # Cancelled by the drain deadline: pgqueuer deletes the job as "canceled", so put
                # a copy back first; shielded, as the same cancellation would abort the enqueue.
                await asyncio.shield(requeue(job_id, payload))
                raise

    async def process(job_id: int, payload: bytes) -> None:
        start = await begin(job_id)
        if start.action == "parked":
            log.info("job_already_parked")
            return
        if start.action == "lost":
            lost, error = start.attempt, start.error or "lost"
            if await still_running(lost, start.started):
                # Its heartbeat lapsed, but its worker runs: running it here too would run it
                # twice at once. Wait, uncounted; that worker's outcome settles the job.
                delay = job_attempts.backoff(1, section.retry_delay, section.retry_max_delay)
                metrics.JOBS.labels(name, "deferred").inc()
                log.warning(
                    "job_still_running",
                    attempt=lost.number,
                    worker=lost.worker,
                    retry_in_s=round(delay, 3),
                )
                raise RetryRequested(delay=timedelta(seconds=delay), reason="still running")
            metrics.JOBS.labels(name, "lost").inc()
            log.error("job_lost", attempt=lost.number, error=error)
            if lost.number > 1 or lost.number >= limit:
                await settle(lost, error, payload)
            # A first attempt lost with its worker (a deploy, an OOM kill, a lost node) is
            # seldom the job's fault: run it again at once, so that it resumes within
            # seconds. A job that keeps killing workers waits a back-off from then on.
            if not await record(lost, error, False, payload):
                raise retry(lost.number, error)  # unrecorded, or its worker just settled it
            metrics.JOB_FAILURES.labels(name, "retried").inc()
            start = await begin(job_id)
            if start.action != "run":  # another worker began it in between
                raise retry(lost.number, error)
        attempt = start.attempt
        mine.add(job_id)
        try:
            with structlog.contextvars.bound_contextvars(attempt=attempt.number):
                failure = await _attempt(res, name, entry.handler, payload, timeout)
                if failure is not None:
                    await settle(attempt, failure, payload)
                if successes is not None:
                    successes.add(attempt)
                else:
                    once = Successes(res)
                    once.add(attempt)
                    await once.forget()
        finally:
            mine.discard(job_id)

    async def still_running(lost: Attempt, started: datetime | None) -> bool:
        """Whether `lost` demonstrably still runs. In this process: its job is in `running`.
        Elsewhere: its worker's heartbeat (appliance/heartbeat.py) names the same pid, from a
        process that started before the attempt did (a restarted container may reuse a pid),
        and the attempt is younger than its timeout (a live worker would have ended it).
        Unknown (Redis unreachable, no heartbeat) reads as not running."""
        if lost.worker == worker:
            return lost.job_id in mine
        instance, sep, pid = lost.worker.rpartition(" pid ")
        if not sep or not pid.isdigit() or started is None:
            return False
        if (datetime.now(UTC) - started).total_seconds() > timeout + section.heartbeat_timeout:
            return False
        try:
            beats = await heartbeat.read_instance(res.redis, res.keys, instance, ["worker"])
        except (RedisError, OSError):
            return False
        beat = beats.get("worker")
        return beat is not None and beat.pid == int(pid) and beat.started <= started.timestamp()

    return run


async def _attempt(
    res: Resources,
    name: str,
    handler: Handler,
    payload: bytes,
    timeout: float,
) -> str | None:
    """Run the handler once: None when it succeeded, else what went wrong."""
    metrics.JOB_ATTEMPTS.labels(name).inc()
    started = time.perf_counter()
    status = "ok"
    error: str | None = None
    failure: Exception | None = None
    try:
        async with asyncio.timeout(timeout) as deadline:
            await handler(res, payload)
    except asyncio.CancelledError:
        status = "requeued"  # by the caller
        raise
    except Exception as exc:
        failure = exc
        if isinstance(exc, TimeoutError) and deadline.expired():
            status, error = "timeout", f"timed out after {timeout:g} s"
        else:
            status, error = "error", job_attempts.error_text(exc)
    finally:
        elapsed = time.perf_counter() - started
        metrics.JOBS.labels(name, status).inc()
        metrics.JOB_DURATION.labels(name).observe(elapsed)
        fields: dict[str, Any] = {"error": error} if error else {}
        if status == "error":
            fields["exc_info"] = failure  # the traceback: where the handler failed
        done = log.info if status == "ok" else log.warning
        done("job_done", status=status, duration_ms=round(elapsed * 1000, 2), **fields)
    return error


async def _serve(res: Resources, stop: asyncio.Event, successes: Successes) -> None:
    """One session: two connections, the queue manager, until stop or a lost connection."""
    section = res.config.worker
    conn = await connect_worker(res.config.postgres, "worker")
    try:
        listen = await connect_worker(res.config.postgres, "worker-listen")
        try:
            driver = SplitDriver(conn, listen)
            qm = QueueManager(Queries(driver))
            running: set[int] = set()  # jobs of this session (the runner waits for them)
            for name in ENTRYPOINTS:
                qm.entrypoint(name)(_wrap(res, name, running, successes))
            runner = asyncio.create_task(
                qm.run(
                    dequeue_timeout=timedelta(seconds=section.poll_interval),
                    batch_size=max(1, section.concurrency // 2),
                    max_concurrent_tasks=section.concurrency,
                    heartbeat_timeout=timedelta(seconds=section.heartbeat_timeout),
                    # A dead LISTEN connection ends the session, and we reconnect.
                    shutdown_on_listener_failure=True,
                )
            )
            log.info("worker_ready", entrypoints=sorted(ENTRYPOINTS))
            stopper = asyncio.create_task(stop.wait())
            liveness = asyncio.create_task(driver.watch_listen(LIVENESS_INTERVAL, LIVENESS_TIMEOUT))
            try:
                await asyncio.wait({runner, stopper, liveness}, return_when="FIRST_COMPLETED")
                stopper.cancel()
                lost = liveness.done()
                liveness.cancel()
                if lost:
                    # Ends what still waits on it (an unanswered probe, pgqueuer's watcher), so
                    # that the runner can stop.
                    await listen.close()
                qm.shutdown.set()
                # pgqueuer waits for running jobs; the runner's drain deadline bounds that wait.
                await runner
                if lost:
                    liveness.result()  # raises: the LISTEN connection is gone, reconnect
            finally:
                for task in (stopper, liveness):
                    task.cancel()
                await asyncio.gather(stopper, liveness, return_exceptions=True)
        finally:
            await listen.close()
    finally:
        await conn.close()


async def run_worker(res: Resources, stop: asyncio.Event) -> None:
    """pgqueuer, and the loops that run beside it for the worker's whole life: each is
    `async def (res, stop)`, rides out outages itself and returns once `stop` is set. One that
    raises ends the worker (supervisord restarts it)."""
    successes = Successes(res)
    forgetting = asyncio.create_task(successes.run())
    loops = [
        _consume(res, stop, successes),
        _watch_queue(res, stop),
        run_dispatcher(res, stop),  # message.created events (appliance/webhooks/dispatch.py)
    ]
    tasks = [asyncio.create_task(loop) for loop in loops]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in (*tasks, forgetting):
            task.cancel()
        await asyncio.gather(*tasks, forgetting, return_exceptions=True)
        await successes.forget()  # the jobs that ended last


async def _consume(res: Resources, stop: asyncio.Event, successes: Successes) -> None:
    failures = 0
    while not stop.is_set():
        began = time.monotonic()
        try:
            await _serve(res, stop, successes)
            failures = 0
        except (PgError, OSError, FailingListenerError) as exc:
            # FailingListenerError: pgqueuer's NOTIFY round-trip probe timed out (a dead LISTEN
            # connection): reconnect. A session that served a while starts the back-off over.
            failures = 1 if time.monotonic() - began > SESSION_SERVED else failures + 1
            delay = min(MAX_BACKOFF, 0.5 * 2**failures)
            log.error("worker_disconnected", error=str(exc) or type(exc).__name__, retry_in_s=delay)
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                continue


async def _watch_queue(res: Resources, stop: asyncio.Event) -> None:
    """Every heartbeat interval: the queue depth gauge (queued, running, parked by entrypoint;
    0 for what emptied) and the sweep of counts of jobs pgqueuer no longer holds."""
    shown: set[tuple[str, str]] = set()
    interval = res.config.appliance.heartbeat_interval
    while not stop.is_set():
        try:
            async with res.connection() as conn:
                rows = await job_attempts.depth(conn)
                await job_attempts.sweep(conn, SWEEP_AFTER)
        except PgError:
            pass  # the consumer logs the outage; the gauge keeps its last figures
        else:
            now = {(e, s): n for e, s, n in rows}
            for entry, status in shown - now.keys():
                metrics.JOB_QUEUE.labels(entry, status).set(0)
            for (entry, status), n in now.items():
                metrics.JOB_QUEUE.labels(entry, status).set(n)
            shown |= now.keys()
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except TimeoutError:
            continue
