"""`/v1/conversations/{c}/messages`: publish (single, batch) and history."""

from __future__ import annotations

from litestar import Response, Router, get, post
from litestar.params import FromPath, FromQuery

from appliance import metrics
from appliance.api.body import decode
from appliance.api.deps import DEPENDENCIES, Req, Who, services
from appliance.api.json import json_response
from appliance.auth.principal import Principal
from appliance.messages import history
from appliance.messages.publish import BatchIn, MessageIn, check_idempotency_key

BASE = "/v1/conversations/{conversation:str}/messages"


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
    return json_response({"messages": result.acks} if batch else result.acks[0], status)


@post("/")
async def publish(request: Req, conversation: FromPath[str], principal: Who) -> Response[bytes]:
    """Publish one message → 201 `{conversation, seq, id, ts}` (200: an Idempotency-Key repeat)."""
    return await _publish(request, conversation, principal, batch=False)


@post("/batch")
async def publish_batch(
    request: Req, conversation: FromPath[str], principal: Who
) -> Response[bytes]:
    """Publish `{"messages": [...]}` in order, all or none → 201 `{"messages": [acks]}`."""
    return await _publish(request, conversation, principal, batch=True)


@get("/")
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
    return json_response(await history.page(svc.redis, svc.keys, conversation, at, size))


def _number(text: str | None, field: str) -> int | None:
    return None if text is None else history.number(text, field)


@get("/{seq:str}")
async def get_message(
    request: Req, conversation: FromPath[str], seq: FromPath[str], principal: Who
) -> Response[bytes]:
    svc = services(request)
    await svc.access.require(principal, conversation, "read")
    number = history.number(seq, "seq")
    return json_response(await history.one(svc.redis, svc.keys, conversation, number))


ROUTER = Router(
    BASE,
    route_handlers=[publish, publish_batch, list_messages, get_message],
    dependencies=DEPENDENCIES,
    tags=["messages"],
)
