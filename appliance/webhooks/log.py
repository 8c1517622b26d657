"""The delivery log: one row per attempt in the monthly-partitioned `webhook_deliveries`, read
newest first in pages (a cursor names the last row shown). An attempt's row and its effect on
the endpoint's failure count are one statement: one round trip, atomic without a transaction."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated, Literal

import msgspec

from appliance.errors import Invalid
from appliance.resources import Conn
from appliance.webhooks.client import Result
from appliance.webhooks.endpoints import COUNT_FAILURE, RESET_FAILURES, disabled_now
from appliance.webhooks.events import Event

DEFAULT_LIMIT = 50
MAX_LIMIT = 500


class Attempt(msgspec.Struct):
    at: datetime
    delivery: str  # the Webhook-Id header
    attempt: int
    event_count: int
    event_types: list[str]
    outcome: str  # delivered, http_error, redirect, timeout, connection, refused
    status: int | None
    error: str | None
    duration_ms: float
    retry_at: datetime | None  # when the next attempt runs; null once the delivery is final


class Page(msgspec.Struct):
    deliveries: list[Attempt]
    next_cursor: str | None


class _Cursor(msgspec.Struct, array_like=True):
    at: datetime
    delivery: str
    attempt: int


Cursor = Annotated[str, msgspec.Meta(max_length=200)]


_INSERT = (
    "INSERT INTO webhook_deliveries (at, endpoint, delivery, attempt, event_count, event_types,"
    " outcome, status, error, duration_ms, retry_at)"
    " VALUES (now(), %(endpoint)s, %(delivery)s, %(attempt)s, %(event_count)s, %(event_types)s,"
    " %(outcome)s, %(status)s, %(error)s, %(duration_ms)s, %(retry_at)s)"
)
_RECORD = {
    "logged": _INSERT,
    "delivered": f"WITH reset AS ({RESET_FAILURES}) {_INSERT}",
    # Data-modifying WITH clauses run to completion whether or not the outer query reads them.
    "failed": f"WITH counted AS ({COUNT_FAILURE}), logged AS ({_INSERT})"
    " SELECT failures, disabled_reason FROM counted",
}


async def record(
    conn: Conn,
    endpoint: str,
    delivery: str,
    attempt: int,
    events: list[Event],
    result: Result,
    retry_at: datetime | None,
    *,
    then: Literal["logged", "delivered", "failed"] = "logged",
    disable_after: int = 0,
) -> bool:
    """Log one attempt; with then="delivered" also reset the endpoint's failure count, with
    "failed" (the delivery's last attempt failed) count one more, disabling the endpoint at
    `disable_after`. Returns whether this disabled the endpoint."""
    cur = await conn.execute(
        _RECORD[then],
        {
            "endpoint": endpoint,
            "delivery": delivery,
            "attempt": attempt,
            "event_count": len(events),
            "event_types": sorted({e.type for e in events}),
            "outcome": result.outcome,
            "status": result.status,
            "error": result.error,
            "duration_ms": result.duration * 1000,
            "retry_at": retry_at,
            "disable_after": disable_after,
        },
    )
    return then == "failed" and disabled_now(await cur.fetchone(), disable_after)


def _encode(last: Attempt) -> str:
    raw = msgspec.json.encode(_Cursor(last.at, last.delivery, last.attempt))
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(cursor: str) -> _Cursor:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return msgspec.json.decode(raw, type=_Cursor)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise Invalid("is not a cursor this API returned", field="cursor") from None


async def page(conn: Conn, endpoint: str, cursor: str | None, limit: int) -> Page:
    """Up to `limit` attempts of `endpoint`, newest first, after `cursor` (None: the newest)."""
    if not 1 <= limit <= MAX_LIMIT:
        raise Invalid(f"must be 1-{MAX_LIMIT}", field="limit")
    after = None if cursor is None else _decode(cursor)
    columns = ", ".join(Attempt.__struct_fields__)
    # (at, delivery, attempt) orders rows totally; the row comparison continues past the cursor.
    where = "endpoint = %s"
    params: list[object] = [endpoint]
    if after is not None:
        where += " AND (at, delivery, attempt) < (%s, %s, %s)"
        params += [after.at, after.delivery, after.attempt]
    cur = await conn.execute(
        f"SELECT {columns} FROM webhook_deliveries WHERE {where}"
        " ORDER BY at DESC, delivery DESC, attempt DESC LIMIT %s",
        (*params, limit + 1),
    )
    rows = [Attempt(*row) for row in await cur.fetchall()]
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, _encode(rows[-1]) if more and rows else None)
