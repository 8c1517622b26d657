"""The worker: pgqueuer on its own autocommit connections, woken by LISTEN/NOTIFY.

Each entrypoint runs under `[worker] job_timeout` (pgqueuer has no per-job timeout) and is counted
and timed by entrypoint and status.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any

import structlog
from pgqueuer import Job, QueueManager
from pgqueuer.queries import Queries

from appliance import metrics
from appliance.db.pool import connect
from appliance.db.queue_driver import SplitDriver
from appliance.jobs import ENTRYPOINTS, Handler
from appliance.resources import Resources

log = structlog.get_logger()


def _wrap(
    res: Resources, name: str, handler: Handler
) -> Callable[[Job], Coroutine[Any, Any, None]]:
    timeout = res.config.worker.job_timeout

    async def run(job: Job) -> None:
        started = time.perf_counter()
        status = "ok"
        try:
            async with asyncio.timeout(timeout):
                await handler(res, job.payload or b"")
        except TimeoutError:
            status = "timeout"
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


async def run_worker(res: Resources, stop: asyncio.Event) -> None:
    section = res.config.worker
    conn = await connect(res.config.postgres, "worker")
    listen = await connect(res.config.postgres, "worker-listen")
    try:
        qm = QueueManager(Queries(SplitDriver(conn, listen)))
        for name, handler in ENTRYPOINTS.items():
            qm.entrypoint(name)(_wrap(res, name, handler))
        runner = asyncio.create_task(
            qm.run(
                dequeue_timeout=timedelta(seconds=section.poll_interval),
                batch_size=max(1, section.concurrency // 2),
                max_concurrent_tasks=section.concurrency,
                heartbeat_timeout=timedelta(seconds=section.heartbeat_timeout),
            )
        )
        log.info("worker_ready", entrypoints=sorted(ENTRYPOINTS))
        await asyncio.wait(
            {runner, asyncio.create_task(stop.wait())}, return_when="FIRST_COMPLETED"
        )
        qm.shutdown.set()
        # pgqueuer waits for running jobs; the runner's drain deadline bounds that wait.
        await runner
    finally:
        await listen.close()
        await conn.close()
