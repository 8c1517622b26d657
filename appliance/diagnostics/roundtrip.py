"""Enqueue `diagnostics.ping` and wait for the worker's answer in Redis."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from pgqueuer.domain.settings import db_settings
from psycopg import sql

from appliance.diagnostics.jobs import PING
from appliance.queue import enqueue
from appliance.resources import Resources


async def ping_worker(res: Resources, timeout: float) -> dict[str, Any]:
    """The worker's answer with `latency_ms`; raises TimeoutError if none arrives in time."""
    token = uuid.uuid4().hex
    started = time.perf_counter()
    async with res.connection() as conn:
        job_id = await enqueue(conn, PING, json.dumps({"token": token}).encode())
    try:
        async with asyncio.timeout(timeout):
            while True:
                raw = await res.redis.get(res.keys.ping_result(token))
                if raw is not None:
                    answer: dict[str, Any] = json.loads(raw)
                    answer["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
                    await res.redis.delete(res.keys.ping_result(token))
                    return answer
                await asyncio.sleep(0.02)
    except TimeoutError:
        # Unanswered: take the job back so pings do not pile up for a worker that comes later.
        async with res.connection() as conn:
            await conn.execute(
                sql.SQL("DELETE FROM {} WHERE id = %s AND status = 'queued'").format(
                    sql.Identifier(db_settings().queue_table)
                ),
                (job_id,),
            )
        raise
