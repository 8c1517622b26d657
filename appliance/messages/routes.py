"""`/v1/conversations/{c}/messages`: publish (single, batch) and history."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Response, get, post
from litestar.params import FromPath, FromQuery

from appliance import metrics
from appliance.api.body import decode
from appliance.api.deps import DEPENDENCIES, Req, Who, services
from appliance.api.json import json_response
from appliance.api.openapi import BEARER, CONVERSATION, ON_BEHALF_OF, SEQ, documented, link
from appliance.api.routing import router
from appliance.auth.principal import Principal
from appliance.messages import history
from appliance.messages.publish import Ack, BatchIn, Message, MessageIn, check_idempotency_key

BASE = "/v1/conversations/{conversation:str}/messages"
READ_ERRORS = (400, 401, 403, 404, 503)
# 409: the Idempotency-Key was used with another body; 429: the rate limit.
PUBLISH_ERRORS = (*READ_ERRORS, 409, 413, 429)
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "A repeat within [messages] idempotency_window answers the original ack (200)",
    "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"},
}
_POSITION: dict[str, Any] = {"type": "integer", "minimum": 0, "maximum": history.MAX_SEQ}
PARAMS: dict[str, dict[str, Any]] = {
    "conversation": CONVERSATION,
    "seq": SEQ,
    "before": _POSITION,
    "after": _POSITION,
    "limit": {"type": "integer", "minimum": 1, "maximum": history.MAX_LIMIT, "default": 50},
}


# From a publish to the message it made.
PUBLISHED_LINKS = {
    "get_message": link(
        "get_message", conversation="$request.path.conversation", seq="$response.body#/seq"
    )
}


class AckList(msgspec.Struct):
    messages: list[Ack]


class Page(msgspec.Struct):
    """The page History.page() writes as bytes."""

    messages: list[Message]
    next_cursor: str | None
    prev_cursor: str | None


async def _publish(
    request: Req, conversation: str, principal: Principal, batch: bool
) -> Response[bytes]:
    svc = services(request)
    await svc.access.require(principal, conversation, "publish")
    raw = await request.body()
    messages = decode(raw, BatchIn).messages if batch else [decode(raw, MessageIn)]
    idempotency_key = check_idempotency_key(request.headers.get("idempotency-key"))
    publisher = svc.publisher
    publisher.validate(messages, batch)
    await publisher.rate_limit(principal, len(messages), "batch" if batch else "single")
    result = await publisher.publish(conversation, principal, messages, idempotency_key, raw, batch)
    mode = "batch" if batch else "single"
    if not result.replayed:
        metrics.MESSAGES_PUBLISHED.labels(mode).inc(len(messages))
    status = 200 if result.replayed else 201
    return json_response(AckList(result.acks) if batch else result.acks[0], status)


@post(
    "/",
    operation_class=documented(
        returns=Ack,
        also={200: (Ack, "An Idempotency-Key repeat: the original acknowledgement")},
        body=MessageIn,
        errors=PUBLISH_ERRORS,
        params=PARAMS,
        headers=[IDEMPOTENCY_KEY, ON_BEHALF_OF],
        links=PUBLISHED_LINKS,
    ),
)
async def publish(request: Req, conversation: FromPath[str], principal: Who) -> Response[bytes]:
    """Publish one message → 201 `{conversation, seq, id, ts}` (200: an Idempotency-Key repeat)."""
    return await _publish(request, conversation, principal, batch=False)


@post(
    "/batch",
    operation_class=documented(
        returns=AckList,
        also={200: (AckList, "An Idempotency-Key repeat: the original acknowledgements")},
        body=BatchIn,
        errors=PUBLISH_ERRORS,
        params=PARAMS,
        headers=[IDEMPOTENCY_KEY, ON_BEHALF_OF],
    ),
)
async def publish_batch(
    request: Req, conversation: FromPath[str], principal: Who
) -> Response[bytes]:
    """Publish `{"messages": [...]}` in order, all or none → 201 `{"messages": [acks]}`."""
    return await _publish(request, conversation, principal, batch=True)


@get(
    "/",
    operation_class=documented(
        returns=Page, errors=READ_ERRORS, params=PARAMS, headers=[ON_BEHALF_OF]
    ),
)
async def list_messages(
    request: Req,
    conversation: FromPath[str],
    principal: Who,
    before: FromQuery[str | None] = None,
    after: FromQuery[str | None] = None,
    cursor: FromQuery[str | None] = None,
    limit: FromQuery[str | None] = None,
) -> Response[bytes]:
    """A page, newest first (`before`) or oldest first (`after`): `{messages, next_cursor,
    prev_cursor}`. Numbers are parsed here (ASCII digits only), not by the framework."""
    svc = services(request)
    await svc.access.require(principal, conversation, "read")
    at = history.position(_number(before, "before"), _number(after, "after"), cursor)
    size = history.DEFAULT_LIMIT if limit is None else history.number(limit, "limit")
    return json_response(await svc.history.page(conversation, at, size))


def _number(text: str | None, field: str) -> int | None:
    return None if text is None else history.number(text, field)


@get(
    "/{seq:str}",
    operation_class=documented(
        returns=Message, errors=READ_ERRORS, params=PARAMS, headers=[ON_BEHALF_OF]
    ),
)
async def get_message(
    request: Req, conversation: FromPath[str], seq: FromPath[str], principal: Who
) -> Response[bytes]:
    svc = services(request)
    await svc.access.require(principal, conversation, "read")
    number = history.number(seq, "seq")
    return json_response(await svc.history.one(conversation, number))


ROUTER = router(
    BASE,
    [publish, publish_batch, list_messages, get_message],
    dependencies=DEPENDENCIES,
    tags=["messages"],
    security=BEARER,
)
