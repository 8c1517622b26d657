"""The worker: pgqueuer on its own autocommit connections, woken by LISTEN/NOTIFY.

Each entrypoint runs under `[worker] job_timeout` (pgqueuer has no per-job timeout) and is counted
and timed by entrypoint and status. A job still running when the drain deadline cancels it is
enqueued again before pgqueuer drops it, so shutdown never loses a job (at least once). Losing
PostgreSQL (or the LISTEN connection) makes the worker reconnect with back-off instead of exiting,
so a database failover does not take the container down. The LISTEN connection is checked every
`LIVENESS_INTERVAL` seconds: a dead one is noticed within a few seconds, not at the next poll.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any

import structlog
from pgqueuer import Job, QueueManager
from pgqueuer.domain.errors import FailingListenerError
from pgqueuer.queries import Queries
from psycopg import Error as PgError

from appliance import metrics
from appliance.db.queue_driver import SplitDriver, connect_worker
from appliance.jobs import ENTRYPOINTS, enqueue, entrypoint
from appliance.resources import Resources

log = structlog.get_logger()

MAX_BACKOFF = 30.0
LIVENESS_INTERVAL = 2.0  # seconds between checks of the LISTEN connection
LIVENESS_TIMEOUT = 5.0  # seconds it may take to answer one


def _wrap(res: Resources, name: str) -> Callable[[Job], Coroutine[Any, Any, None]]:
    handler = entrypoint(name).handler
    timeout = res.config.worker.job_timeout

    async def requeue(payload: bytes) -> None:
        async with res.connection() as conn:
            await enqueue(conn, name, payload)

    async def run(job: Job) -> None:
        started = time.perf_counter()
        status = "ok"
        payload = job.payload or b""
        try:
            async with asyncio.timeout(timeout):
                await handler(res, payload)
        except TimeoutError:
            status = "timeout"
            raise
        except asyncio.CancelledError:
            # Cancelled by the drain deadline: pgqueuer deletes the job as "canceled", so put a
            # copy back first; shielded, as the same cancellation would abort the enqueue.
            status = "requeued"
            await asyncio.shield(requeue(payload))
            raise
        except Exception:
            status = "error"
            raise
        finally:
            elapsed = time.perf_counter() - started
            metrics.JOBS.labels(name, status).inc()
            metrics.JOB_DURATION.labels(name).observe(elapsed)
            log.info(
                "job_done",
                entrypoint=name,
                job_id=int(job.id),
                status=status,
                duration_ms=round(elapsed * 1000, 2),
            )

    return run


async def _serve(res: Resources, stop: asyncio.Event) -> None:
    """One session: two connections, the queue manager, until stop or a lost connection."""
    section = res.config.worker
    conn = await connect_worker(res.config.postgres, "worker")
    try:
        listen = await connect_worker(res.config.postgres, "worker-listen")
        try:
            driver = SplitDriver(conn, listen)
            qm = QueueManager(Queries(driver))
            for name in ENTRYPOINTS:
                qm.entrypoint(name)(_wrap(res, name))
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
    failures = 0
    while not stop.is_set():
        try:
            await _serve(res, stop)
            failures = 0
        except (PgError, OSError, FailingListenerError) as exc:
            # FailingListenerError: pgqueuer's NOTIFY round-trip probe timed out (a dead LISTEN
            # connection, or a probe sent before LISTEN was in place at start): reconnect.
            failures += 1
            delay = min(MAX_BACKOFF, 0.5 * 2**failures)
            log.error("worker_disconnected", error=str(exc) or type(exc).__name__, retry_in_s=delay)
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                continue
