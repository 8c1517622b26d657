"""Job pick-up latency on an idle worker: enqueue → the handler's answer in Redis.

Runs the worker's queue manager twice in one process against the same database, once over the
appliance's SplitDriver (LISTEN on its own connection) and once over pgqueuer's PsycopgDriver
(one connection for LISTEN and queries) as the reference, with the same poll interval, and
prints p50/p99 of each and their ratio. Needs the config's PostgreSQL (migrated) and Redis:

    make bench                      # or, with options:
    APPLIANCE_CONFIG=config.example.toml .venv/bin/python bench/job_pickup.py --jobs 20 --idle 1.5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from datetime import timedelta
from typing import Any

from pgqueuer import PsycopgDriver, QueueManager
from pgqueuer.queries import Queries

from appliance import logs
from appliance.config import load_config
from appliance.db.pool import connect
from appliance.db.queue_driver import SplitDriver
from appliance.diagnostics.roundtrip import ping_worker
from appliance.jobs import ENTRYPOINTS
from appliance.programs.worker import _wrap
from appliance.resources import Resources, open_resources


async def measure(res: Resources, driver: Any, jobs: int, idle: float) -> list[float]:
    qm = QueueManager(Queries(driver))
    for name in ENTRYPOINTS:
        qm.entrypoint(name)(_wrap(res, name))
    runner = asyncio.create_task(
        qm.run(dequeue_timeout=timedelta(seconds=30), batch_size=5, max_concurrent_tasks=10)
    )
    await ping_worker(res, 60)  # warm: the worker listens
    latencies = []
    for _ in range(jobs):
        await asyncio.sleep(idle)  # idle worker: waiting on NOTIFY or its 30 s poll
        latencies.append((await ping_worker(res, 60))["latency_ms"])
    qm.shutdown.set()
    await runner
    return latencies


def summary(name: str, values: list[float]) -> float:
    p50 = statistics.median(values)
    p99 = statistics.quantiles(values, n=100)[98] if len(values) > 1 else values[0]
    print(f"{name:<28} p50 {p50:8.1f} ms   p99 {p99:8.1f} ms   (n={len(values)})")
    return p50


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--idle", type=float, default=1.5, help="seconds idle before each job")
    args = parser.parse_args()
    config = load_config()
    logs.configure("cli", "warning", "console", to_stderr=True)
    async with open_resources(config, "bench") as res:
        queries, listen, single = [await connect(config.postgres, "bench") for _ in range(3)]
        try:
            split = await measure(res, SplitDriver(queries, listen), args.jobs, args.idle)
            shared = await measure(res, PsycopgDriver(single), args.jobs, args.idle)
        finally:
            for conn in (queries, listen, single):
                await conn.close()
    split_p50 = summary("SplitDriver (appliance)", split)
    shared_p50 = summary("PsycopgDriver (reference)", shared)
    print(f"p50 ratio reference/appliance: {shared_p50 / split_p50:.1f}x")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
