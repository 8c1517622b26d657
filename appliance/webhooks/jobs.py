"""`webhooks.deliver`: one attempt of one delivery, then its outcome recorded atomically.

The job keeps its own attempts: a failed attempt (timeout, connection error, refused address,
non-2xx) queues the next one with a jittered exponential delay in the same transaction that logs
it, up to `[webhooks] max_attempts`. A delivery whose last attempt fails counts against its
endpoint, which `[webhooks] disable_after` consecutive failed deliveries disable. A success or a
final failure is one statement (the attempt's row and the endpoint's failure count, log.record),
a retry one transaction; with the endpoint's read, a delivery costs two or three PostgreSQL round
trips of its own besides the worker's bookkeeping. Receiver
failures never raise: only the appliance's own (PostgreSQL down) do, and then the worker's retry
runs the same attempt again (receivers deduplicate on Webhook-Id and event ids).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import structlog

from appliance import job_attempts, metrics
from appliance.config.model import WebhooksSection
from appliance.resources import Resources
from appliance.webhooks import endpoints, log
from appliance.webhooks.client import post
from appliance.webhooks.events import Event
from appliance.webhooks.service import DELIVER, Delivery, batches, enqueue, new_delivery_id

__all__ = ["DELIVER", "deliver"]

logger = structlog.get_logger()
MAX_DELAY = 3600.0


def backoff(attempt: int, cfg: WebhooksSection) -> float:
    """Seconds before attempt `attempt + 1`: retry_delay doubled per attempt, at most an hour,
    then a random 50-100 % of it (so that retries after an outage spread out); the worker's
    formula (appliance/job_attempts.py)."""
    return job_attempts.backoff(attempt, cfg.retry_delay, MAX_DELAY)


async def deliver(res: Resources, payload: bytes) -> None:
    job = msgspec.json.decode(payload, type=Delivery)
    cfg = res.config.webhooks
    bound = logger.bind(webhook=job.endpoint, delivery=job.delivery, attempt=job.attempt)
    parts = list(batches(job.events, cfg.batch_max))
    if len(parts) > 1:
        await _split(res, job, parts)
        bound.info("webhook_batch_split", events=len(job.events), parts=len(parts))
        return
    async with res.connection() as conn:
        endpoint = await endpoints.target(conn, job.endpoint)
    if endpoint is None or not endpoint.enabled:
        # Deleted or disabled since the events were queued: they are dropped, not kept.
        bound.info("webhook_delivery_dropped", reason="deleted" if endpoint is None else "disabled")
        metrics.WEBHOOK_DELIVERIES.labels("dropped").inc()
        return
    body = msgspec.json.encode({"events": job.events})
    result = await post(endpoint.url, job.delivery, endpoint.secret, body, cfg)
    retry_at = None
    disabled = False
    record = (job.endpoint, job.delivery, job.attempt, job.events, result)
    if result.ok:
        async with res.connection() as conn:
            await log.record(conn, *record, None, then="delivered")
    elif job.attempt < cfg.max_attempts:
        delay = backoff(job.attempt, cfg)
        retry_at = datetime.now(UTC) + timedelta(seconds=delay)
        again = msgspec.structs.replace(job, attempt=job.attempt + 1)
        async with res.connection() as conn, conn.transaction():
            await enqueue(conn, again, after=delay)
            await log.record(conn, *record, retry_at)
    else:
        async with res.connection() as conn:
            disabled = await log.record(
                conn, *record, None, then="failed", disable_after=cfg.disable_after
            )
    metrics.WEBHOOK_DELIVERIES.labels(result.outcome).inc()
    metrics.WEBHOOK_DURATION.observe(result.duration)
    fields = {
        "outcome": result.outcome,
        "status": result.status,
        "events": len(job.events),
        "duration_ms": round(result.duration * 1000, 1),
    }
    if result.ok:
        bound.info("webhook_delivered", **fields)
    else:
        bound.warning("webhook_attempt_failed", error=result.error, retry_at=retry_at, **fields)
    if disabled:
        bound.warning("webhook_disabled", failures=cfg.disable_after)


async def _split(res: Resources, job: Delivery, parts: list[list[Event]]) -> None:
    """Queue `job`'s events as one delivery per part: a job larger than this worker's
    `batch_max` (lower than the emitter's) or `BATCH_BYTES` (queued before the cap)."""
    async with res.connection() as conn, conn.transaction():
        for part in parts:
            await enqueue(conn, Delivery(job.endpoint, new_delivery_id(), 1, part))
