"""Webhook endpoints in PostgreSQL: create (the signing secret shown once), list, read, update,
delete, and the consecutive-failure count that disables an endpoint.

An endpoint is disabled by an admin (PATCH enabled=false) or after `[webhooks] disable_after`
consecutive failed deliveries; enabling it again resets the count. The HTTP routes and the CLI
both call these functions.
"""

from __future__ import annotations

import re
import secrets
from datetime import datetime
from typing import Annotated, Any

import msgspec
from psycopg.rows import dict_row

from appliance.errors import Invalid, NotFound
from appliance.resources import Conn
from appliance.webhooks.addresses import MAX_URL, check_url
from appliance.webhooks.events import EVENT_TYPES, EventType

WEBHOOK_ID = re.compile(r"^wh_[a-z0-9]{12}\Z")
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"

Url = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_URL)]
Events = Annotated[list[EventType], msgspec.Meta(min_length=1, max_length=len(EVENT_TYPES))]
Description = Annotated[str, msgspec.Meta(max_length=500)]


class WebhookCreate(msgspec.Struct, forbid_unknown_fields=True):
    url: Url
    events: Events
    description: Description | None = None


class WebhookPatch(msgspec.Struct, forbid_unknown_fields=True):
    url: Url | msgspec.UnsetType = msgspec.UNSET
    events: Events | msgspec.UnsetType = msgspec.UNSET
    # true re-enables a disabled endpoint and resets its failure count
    enabled: bool | msgspec.UnsetType = msgspec.UNSET
    description: Description | msgspec.UnsetType | None = msgspec.UNSET


class Webhook(msgspec.Struct):
    id: str
    url: str
    description: str | None
    events: list[str]
    enabled: bool
    disabled_reason: str | None  # "admin" or "failures"
    failures: int  # consecutive failed deliveries
    created_at: datetime
    updated_at: datetime


class CreatedWebhook(Webhook):
    secret: str  # signs every delivery; shown only in this response


_COLUMNS = (
    "id, url, description, events, enabled, disabled_reason, failures, created_at, updated_at"
)


def check_id(webhook_id: str) -> str:
    if not WEBHOOK_ID.match(webhook_id):
        raise Invalid("must be wh_ and 12 lowercase letters or digits", field="webhook")
    return webhook_id


def _events(events: list[EventType]) -> list[str]:
    return sorted(set(events))


def _row(row: dict[str, Any]) -> Webhook:
    return Webhook(**row)


async def create(conn: Conn, spec: WebhookCreate, *, allow_private: bool) -> CreatedWebhook:
    check_url(spec.url, allow_private=allow_private)
    webhook_id = "wh_" + "".join(secrets.choice(_ALPHABET) for _ in range(12))
    secret = "whsec_" + secrets.token_urlsafe(32)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"INSERT INTO webhook_endpoints (id, url, description, events, secret)"
            f" VALUES (%s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
            (webhook_id, spec.url, spec.description, _events(spec.events), secret),
        )
        row = await cur.fetchone()
    assert row is not None
    return CreatedWebhook(**row, secret=secret)


async def list_all(conn: Conn) -> list[Webhook]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(f"SELECT {_COLUMNS} FROM webhook_endpoints ORDER BY created_at, id")
        return [_row(r) for r in await cur.fetchall()]


async def get(conn: Conn, webhook_id: str) -> Webhook:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} FROM webhook_endpoints WHERE id = %s", (check_id(webhook_id),)
        )
        row = await cur.fetchone()
    if row is None:
        raise NotFound(f"no webhook {webhook_id}", field="webhook")
    return _row(row)


async def update(
    conn: Conn, webhook_id: str, spec: WebhookPatch, *, allow_private: bool
) -> Webhook:
    """Apply the fields `spec` sets. enabled=true (even on an enabled endpoint) resets the
    failure count; enabled=false disables it as the admin's choice."""
    check_id(webhook_id)
    sets: list[str] = []
    values: list[Any] = []
    if not isinstance(spec.url, msgspec.UnsetType):
        check_url(spec.url, allow_private=allow_private)
        sets.append("url = %s")
        values.append(spec.url)
    if not isinstance(spec.events, msgspec.UnsetType):
        sets.append("events = %s")
        values.append(_events(spec.events))
    if not isinstance(spec.description, msgspec.UnsetType):
        sets.append("description = %s")
        values.append(spec.description)
    if spec.enabled is True:
        sets.append("enabled = true, disabled_reason = NULL, failures = 0")
    elif spec.enabled is False:
        # An endpoint the failures disabled stays "failures" (the reason an admin needs to see).
        sets.append("enabled = false, disabled_reason = coalesce(disabled_reason, 'admin')")
    if not sets:
        return await get(conn, webhook_id)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"UPDATE webhook_endpoints SET {', '.join(sets)}, updated_at = now()"
            f" WHERE id = %s RETURNING {_COLUMNS}",
            (*values, webhook_id),
        )
        row = await cur.fetchone()
    if row is None:
        raise NotFound(f"no webhook {webhook_id}", field="webhook")
    return _row(row)


async def delete(conn: Conn, webhook_id: str) -> Webhook:
    """Delete the endpoint and its delivery log; its queued deliveries find it gone and stop."""
    async with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"DELETE FROM webhook_endpoints WHERE id = %s RETURNING {_COLUMNS}",
            (check_id(webhook_id),),
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"no webhook {webhook_id}", field="webhook")
        await cur.execute("DELETE FROM webhook_deliveries WHERE endpoint = %s", (webhook_id,))
    return _row(row)


class Target(msgspec.Struct, frozen=True):
    """What a delivery needs of its endpoint (the secret never leaves the worker)."""

    url: str
    secret: str
    enabled: bool


async def target(conn: Conn, webhook_id: str) -> Target | None:
    cur = await conn.execute(
        "SELECT url, secret, enabled FROM webhook_endpoints WHERE id = %s", (webhook_id,)
    )
    row = await cur.fetchone()
    return None if row is None else Target(*row)


# The endpoint's side of an attempt's outcome, as statements that log.record() runs in the same
# statement as the attempt's row (parameters: endpoint, disable_after).
RESET_FAILURES = (
    "UPDATE webhook_endpoints SET failures = 0 WHERE id = %(endpoint)s AND failures <> 0"
)
COUNT_FAILURE = (
    "UPDATE webhook_endpoints SET failures = failures + 1,"
    " enabled = CASE WHEN failures + 1 >= %(disable_after)s THEN false ELSE enabled END,"
    " disabled_reason = CASE WHEN enabled AND failures + 1 >= %(disable_after)s THEN 'failures'"
    "                        ELSE disabled_reason END,"
    " updated_at = now()"
    " WHERE id = %(endpoint)s RETURNING failures, disabled_reason"
)


async def delivered(conn: Conn, webhook_id: str) -> None:
    """A delivery succeeded: the consecutive-failure count starts again."""
    await conn.execute(RESET_FAILURES, {"endpoint": webhook_id})


async def failed(conn: Conn, webhook_id: str, disable_after: int) -> bool:
    """A delivery failed for good (its last attempt); True if that disabled the endpoint."""
    cur = await conn.execute(
        COUNT_FAILURE, {"endpoint": webhook_id, "disable_after": disable_after}
    )
    return disabled_now(await cur.fetchone(), disable_after)


def disabled_now(row: tuple[Any, ...] | None, disable_after: int) -> bool:
    """Whether COUNT_FAILURE's row says that this failure disabled the endpoint."""
    return row is not None and row[0] == disable_after and row[1] == "failures"


async def summary(conn: Conn) -> dict[str, int]:
    """Endpoint counts for `appliance status`: enabled, failing (enabled with failed deliveries
    since the last success), disabled by an admin, disabled after failures."""
    cur = await conn.execute(
        "SELECT count(*) FILTER (WHERE enabled),"
        " count(*) FILTER (WHERE enabled AND failures > 0),"
        " count(*) FILTER (WHERE disabled_reason = 'admin'),"
        " count(*) FILTER (WHERE disabled_reason = 'failures')"
        " FROM webhook_endpoints"
    )
    row = await cur.fetchone()
    names = ("enabled", "failing", "disabled_admin", "disabled_failures")
    return dict(zip(names, row or (0, 0, 0, 0), strict=True))
