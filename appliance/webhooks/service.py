"""Webhook endpoints in PostgreSQL, and `emit`, which turns events into delivery jobs.

`emit` runs on the caller's connection, inside the caller's transaction: an event whose change
rolls back is never delivered, and one that commits has its jobs queued with it. It costs one
indexed query when no enabled endpoint takes the events' types. A delivery holds at most
`[webhooks] batch_max` events and `BATCH_BYTES` of them (an event larger than that goes alone),
so that no job payload, and no POST body, grows with the batch size times the message size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import timedelta

import msgspec
from ulid import ULID

from appliance import queue
from appliance.resources import Conn
from appliance.webhooks.events import Event

DELIVER = "webhooks.deliver"
BATCH_MAX = 100  # [webhooks] batch_max's default; the job splits larger batches by the config
BATCH_BYTES = 1_048_576  # bytes of events per delivery at most (one larger event goes alone)


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
    """Queue delivery jobs for every enabled endpoint subscribed to each event's type, in the
    events' order, in batches (`batches`: pass `[webhooks] batch_max`; the job splits larger
    ones by the worker's config anyway). Returns the number of jobs queued."""
    if not events:
        return 0
    types = sorted({e.type for e in events})
    cur = await conn.execute(_SUBSCRIBERS, (types,))
    endpoints = await cur.fetchall()
    payloads = []
    for endpoint, subscribed in endpoints:
        wanted = set(subscribed)
        for batch in batches([e for e in events if e.type in wanted], batch_max):
            payloads.append(msgspec.json.encode(Delivery(endpoint, new_delivery_id(), 1, batch)))
    # One statement for every job: a dispatcher read of 1,000 events is 10 jobs per endpoint.
    return len(await queue.enqueue_many(conn, DELIVER, payloads))


def batches(
    events: Sequence[Event], batch_max: int, max_bytes: int = BATCH_BYTES
) -> Iterator[list[Event]]:
    """`events` in order, cut into runs of at most `batch_max` events and `max_bytes` (as
    `Event.size` counts them); an event larger than `max_bytes` is a run of its own."""
    batch: list[Event] = []
    size = 0
    for e in events:
        grown = size + e.size()
        if batch and (len(batch) >= batch_max or grown > max_bytes):
            yield batch
            batch, grown = [], e.size()
        batch.append(e)
        size = grown
    if batch:
        yield batch


async def enqueue(conn: Conn, delivery: Delivery, *, after: float = 0.0) -> int:
    """Queue one attempt of `delivery`, `after` seconds from now (on `conn`'s transaction)."""
    return await queue.enqueue(
        conn,
        DELIVER,
        msgspec.json.encode(delivery),
        execute_after=timedelta(seconds=after) if after > 0 else None,
    )


def new_delivery_id() -> str:
    return str(ULID())
