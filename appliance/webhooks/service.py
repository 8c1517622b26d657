"""Webhook endpoints in PostgreSQL, and `emit`, which turns events into delivery jobs.

`emit` runs on the caller's connection, inside the caller's transaction: an event whose change
rolls back is never delivered, and one that commits has its jobs queued with it. It costs one
indexed query when no enabled endpoint takes the events' types.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import msgspec
from ulid import ULID

from appliance.resources import Conn
from appliance.webhooks.events import Event

DELIVER = "webhooks.deliver"
BATCH_MAX = 100  # [webhooks] batch_max's default; the job splits larger batches by the config


class Delivery(msgspec.Struct, forbid_unknown_fields=True):
    """The payload of a `webhooks.deliver` job: one POST of `events` to `endpoint`."""

    endpoint: str
    delivery: str  # the Webhook-Id header, the same on every attempt
    attempt: int  # 1 for the first
    events: list[Event]


_SUBSCRIBERS = """
SELECT id, events FROM webhook_endpoints WHERE enabled AND events && %s::text[] ORDER BY id
"""


async def emit(conn: Conn, events: Sequence[Event], *, batch_max: int = BATCH_MAX) -> int:
    """Queue delivery jobs for every enabled endpoint subscribed to each event's type, at most
    `batch_max` events a job (pass `[webhooks] batch_max`; the job splits larger ones by the
    worker's config anyway), in the events' order. Returns the number of jobs queued."""
    if not events:
        return 0
    types = sorted({e.type for e in events})
    cur = await conn.execute(_SUBSCRIBERS, (types,))
    endpoints = await cur.fetchall()
    queued = 0
    for endpoint, subscribed in endpoints:
        wanted = set(subscribed)
        mine = [e for e in events if e.type in wanted]
        for start in range(0, len(mine), max(1, batch_max)):
            batch = mine[start : start + batch_max]
            await enqueue(conn, Delivery(endpoint, new_delivery_id(), 1, batch))
            queued += 1
    return queued


async def enqueue(conn: Conn, delivery: Delivery, *, after: float = 0.0) -> int:
    """Queue one attempt of `delivery`, `after` seconds from now (on `conn`'s transaction)."""
    # Imported here: appliance.jobs imports this feature's job handler, which imports this.
    from appliance import jobs as queue

    return await queue.enqueue(
        conn,
        DELIVER,
        msgspec.json.encode(delivery),
        execute_after=timedelta(seconds=after) if after > 0 else None,
    )


def new_delivery_id() -> str:
    return str(ULID())
