"""`webhooks.deliver`: one attempt of one delivery, then its outcome recorded in one transaction.

The job keeps its own attempts: a failed attempt (timeout, connection error, refused address,
non-2xx) queues the next one with a jittered exponential delay in the same transaction that logs
it, up to `[webhooks] max_attempts`. A delivery whose last attempt fails counts against its
endpoint, which `[webhooks] disable_after` consecutive failed deliveries disable. Receiver
failures never raise: only the appliance's own (PostgreSQL down) do, and then the worker's retry
runs the same attempt again (receivers deduplicate on Webhook-Id and event ids).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import msgspec
import structlog

from appliance import metrics
from appliance.config.model import WebhooksSection
from appliance.resources import Resources
from appliance.webhooks import endpoints, log
from appliance.webhooks.client import post
from appliance.webhooks.service import DELIVER, Delivery, enqueue, new_delivery_id

__all__ = ["DELIVER", "deliver"]

logger = structlog.get_logger()
MAX_DELAY = 3600.0


def backoff(attempt: int, cfg: WebhooksSection) -> float:
    """Seconds before attempt `attempt + 1`: retry_delay doubled per attempt, at most an hour,
    then a random 50-100 % of it (so that retries after an outage spread out)."""
    full = min(MAX_DELAY, cfg.retry_delay * 2.0 ** min(attempt - 1, 30))
    jitter: float = random.uniform(0.5, 1.0)  # noqa: S311 (spreading load, not a secret)
    return full * jitter


async def deliver(res: Resources, payload: bytes) -> None:
    job = msgspec.json.decode(payload, type=Delivery)
    cfg = res.config.webhooks
    bound = logger.bind(webhook=job.endpoint, delivery=job.delivery, attempt=job.attempt)
    if len(job.events) > cfg.batch_max:
        await _split(res, job, cfg.batch_max)
        bound.info("webhook_batch_split", events=len(job.events), batch_max=cfg.batch_max)
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
    async with res.connection() as conn, conn.transaction():
        if result.ok:
            await endpoints.delivered(conn, job.endpoint)
        elif job.attempt < cfg.max_attempts:
            delay = backoff(job.attempt, cfg)
            retry_at = datetime.now(UTC) + timedelta(seconds=delay)
            again = msgspec.structs.replace(job, attempt=job.attempt + 1)
            await enqueue(conn, again, after=delay)
        else:
            disabled = await endpoints.failed(conn, job.endpoint, cfg.disable_after)
        await log.record(
            conn, job.endpoint, job.delivery, job.attempt, job.events, result, retry_at
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


async def _split(res: Resources, job: Delivery, batch_max: int) -> None:
    """Queue `job`'s events as deliveries of at most `batch_max` (the config may be lower than
    the size the emitter used)."""
    async with res.connection() as conn, conn.transaction():
        for start in range(0, len(job.events), batch_max):
            part = job.events[start : start + batch_max]
            await enqueue(conn, Delivery(job.endpoint, new_delivery_id(), 1, part))
