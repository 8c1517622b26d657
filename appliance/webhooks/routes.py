"""`/v1/webhooks`: webhook endpoints and their delivery log over HTTP (admin scope). The CLI
calls the same functions."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from litestar import Response, delete, get, patch, post
from litestar.params import FromPath, FromQuery

from appliance.api.body import decode
from appliance.api.deps import DEPENDENCIES, Req, Who, require_scope, services
from appliance.api.json import json_response
from appliance.api.openapi import BEARER, ON_BEHALF_OF, documented, link
from appliance.api.routing import router
from appliance.errors import Invalid
from appliance.messages.history import number
from appliance.webhooks import endpoints, log
from appliance.webhooks.events import EVENT_TYPES

AUTH = (401, 403, 503)  # every route: credentials, the admin scope, PostgreSQL
BY_ID = (*AUTH, 400, 404)  # a malformed or unknown webhook id
PARAMS: dict[str, dict[str, Any]] = {
    "webhook": {"type": "string", "pattern": "^wh_[a-z0-9]{12}$"},
    "limit": {"type": "integer", "minimum": 1, "maximum": log.MAX_LIMIT, "default": 50},
    "cursor": {"type": "string", "maxLength": 200, "pattern": "^[A-Za-z0-9_-]*$"},
}
_CREATED = "$response.body#/id"
T = TypeVar("T")


def _decode(raw: bytes, type_: type[T]) -> T:
    """The body as `type_`; an unknown event type's error lists the types there are."""
    try:
        return decode(raw, type_)
    except Invalid as exc:
        if exc.field and exc.field.startswith("events[") and "enum" in exc.message:
            known = ", ".join(EVENT_TYPES)
            message = f"{exc.message}: an event type is one of {known}"
            raise Invalid(message, field=exc.field) from None
        raise


class WebhookList(msgspec.Struct):
    webhooks: list[endpoints.Webhook]


@post(
    "/",
    operation_class=documented(
        returns=endpoints.CreatedWebhook,
        body=endpoints.WebhookCreate,
        errors=(*AUTH, 400, 413),
        headers=[ON_BEHALF_OF],
        links={
            name: link(name, webhook=_CREATED)
            for name in ("get_webhook", "update_webhook", "delete_webhook", "list_deliveries")
        },
    ),
)
async def create_webhook(request: Req, principal: Who) -> Response[bytes]:
    """Register an endpoint; the response carries its signing `secret` once, never again."""
    svc = services(request)
    require_scope(principal, "admin")
    spec = _decode(await request.body(), endpoints.WebhookCreate)
    async with svc.connection() as conn:
        created = await endpoints.create(
            conn, spec, allow_private=svc.config.webhooks.allow_private
        )
    return json_response(created, 201)


@get("/", operation_class=documented(returns=WebhookList, errors=AUTH, headers=[ON_BEHALF_OF]))
async def list_webhooks(request: Req, principal: Who) -> Response[bytes]:
    svc = services(request)
    require_scope(principal, "admin")
    async with svc.connection() as conn:
        return json_response(WebhookList(await endpoints.list_all(conn)))


@get(
    "/{webhook:str}",
    operation_class=documented(
        returns=endpoints.Webhook, errors=BY_ID, params=PARAMS, headers=[ON_BEHALF_OF]
    ),
)
async def get_webhook(request: Req, webhook: FromPath[str], principal: Who) -> Response[bytes]:
    svc = services(request)
    require_scope(principal, "admin")
    async with svc.connection() as conn:
        return json_response(await endpoints.get(conn, webhook))


@patch(
    "/{webhook:str}",
    operation_class=documented(
        returns=endpoints.Webhook,
        body=endpoints.WebhookPatch,
        errors=(*BY_ID, 413),
        params=PARAMS,
        headers=[ON_BEHALF_OF],
    ),
)
async def update_webhook(request: Req, webhook: FromPath[str], principal: Who) -> Response[bytes]:
    """Change url, events, description; `enabled: true` re-enables and resets the failure count."""
    svc = services(request)
    require_scope(principal, "admin")
    endpoints.check_id(webhook)
    spec = _decode(await request.body(), endpoints.WebhookPatch)
    async with svc.connection() as conn:
        updated = await endpoints.update(
            conn, webhook, spec, allow_private=svc.config.webhooks.allow_private
        )
    return json_response(updated)


@delete(
    "/{webhook:str}",
    status_code=200,
    operation_class=documented(
        returns=endpoints.Webhook, errors=BY_ID, params=PARAMS, headers=[ON_BEHALF_OF]
    ),
)
async def delete_webhook(request: Req, webhook: FromPath[str], principal: Who) -> Response[bytes]:
    """Delete the endpoint and its delivery log; deliveries still queued for it are dropped."""
    svc = services(request)
    require_scope(principal, "admin")
    async with svc.connection() as conn:
        return json_response(await endpoints.delete(conn, webhook))


@get(
    "/{webhook:str}/deliveries",
    operation_class=documented(
        returns=log.Page, errors=BY_ID, params=PARAMS, headers=[ON_BEHALF_OF]
    ),
)
async def list_deliveries(
    request: Req,
    webhook: FromPath[str],
    principal: Who,
    cursor: FromQuery[str | None] = None,
    limit: FromQuery[str | None] = None,
) -> Response[bytes]:
    """Delivery attempts, newest first: `{deliveries, next_cursor}`; pass `next_cursor` back as
    `cursor` for the next page."""
    svc = services(request)
    require_scope(principal, "admin")
    size = log.DEFAULT_LIMIT if limit is None else number(limit, "limit")
    async with svc.connection() as conn:
        await endpoints.get(conn, webhook)  # 400 or 404 before an empty page
        return json_response(await log.page(conn, webhook, cursor, size))


ROUTER = router(
    "/v1/webhooks",
    [create_webhook, list_webhooks, get_webhook, update_webhook, delete_webhook, list_deliveries],
    dependencies=DEPENDENCIES,
    tags=["webhooks"],
    security=BEARER,
)
