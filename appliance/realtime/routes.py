"""`/v1/stream` (WebSocket), receipts and presence."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import Response, WebSocket, get, post, websocket
from litestar.params import FromPath

from appliance import metrics
from appliance.activity import ActivityRecord
from appliance.api.body import decode
from appliance.api.deps import DEPENDENCIES, Req, Who, services
from appliance.api.json import json_response
from appliance.api.openapi import BEARER, CONVERSATION, ON_BEHALF_OF, documented
from appliance.api.routing import router
from appliance.api.services import Services
from appliance.auth.authenticate import bearer
from appliance.errors import Invalid, known
from appliance.realtime import transport
from appliance.realtime.presence import Receipt, ReceiptIn, ReceiptKind
from appliance.realtime.slots import TooManySockets
from appliance.realtime.stream import (
    CLOSE_FORBIDDEN,
    CLOSE_GOING_AWAY,
    CLOSE_TOO_BIG,
    CLOSE_TOO_MANY_SOCKETS,
    CLOSE_TRY_AGAIN,
    CLOSE_UNAUTHORIZED,
    Session,
    error_frame,
)

BASE = "/v1/conversations/{conversation:str}"
ERRORS = (400, 401, 403, 404, 503)
PARAMS = {"conversation": CONVERSATION}


class Mark(msgspec.Struct):
    principal: str
    type: ReceiptKind
    seq: int


class ReceiptList(msgspec.Struct):
    receipts: list[Receipt]


class Online(msgspec.Struct):
    online: list[str]


@post(
    f"{BASE}/receipts",
    status_code=200,
    operation_class=documented(
        returns=Mark, body=ReceiptIn, errors=(*ERRORS, 413), params=PARAMS, headers=[ON_BEHALF_OF]
    ),
)
async def post_receipt(
    request: Req, conversation: FromPath[str], principal: Who
) -> Response[bytes]:
    """Raise this member's `delivered` or `read` mark to `seq` (never lowers it)."""
    svc = services(request)
    await svc.access.require(principal, conversation, "receipt")
    spec = decode(await request.body(), ReceiptIn)
    head = await svc.history.head(conversation)
    if not 1 <= spec.seq <= head:
        raise Invalid(f"must be between 1 and the head seq {head}", field="seq")
    mark = await svc.presence.receipt(conversation, principal.id, spec.type, spec.seq)
    return json_response(Mark(principal.id, spec.type, mark))


@get(
    f"{BASE}/receipts",
    operation_class=documented(
        returns=ReceiptList, errors=ERRORS, params=PARAMS, headers=[ON_BEHALF_OF]
    ),
)
async def get_receipts(
    request: Req, conversation: FromPath[str], principal: Who
) -> Response[bytes]:
    svc = services(request)
    await svc.access.require(principal, conversation, "read")
    return json_response(ReceiptList(await svc.presence.receipts(conversation)))


@get(
    f"{BASE}/presence",
    operation_class=documented(
        returns=Online, errors=ERRORS, params=PARAMS, headers=[ON_BEHALF_OF]
    ),
)
async def get_presence(
    request: Req, conversation: FromPath[str], principal: Who
) -> Response[bytes]:
    svc = services(request)
    await svc.access.require(principal, conversation, "read")
    return json_response(Online(await svc.presence.online(conversation)))


@websocket("/v1/stream")
async def stream(socket: WebSocket[Any, Any, Any]) -> None:
    """Realtime: auth by `Authorization` or `?token=`; JSON ops subscribe, unsubscribe, ping."""
    svc: Services = socket.app.state.services
    started = time.perf_counter()
    await socket.accept()
    try:
        credential = bearer(socket.headers.get("authorization"), socket.query_params.get("token"))
        principal = await svc.auth.authenticate(
            f"Bearer {credential}", None, socket.headers.get("x-on-behalf-of")
        )
        session = Session(socket, svc, principal, credential)
        if not await svc.slots.take(principal.id, session.id):
            raise TooManySockets(svc.slots.limit)
    except Exception as exc:
        error = known(exc)
        if error is None:
            raise
        metrics.count_refused(error)
        codes = {
            401: CLOSE_UNAUTHORIZED,
            403: CLOSE_FORBIDDEN,
            429: CLOSE_TOO_MANY_SOCKETS,
            503: CLOSE_TRY_AGAIN,
        }
        timeout = svc.config.realtime.close_timeout
        with contextlib.suppress(Exception):  # the peer may be gone already
            await asyncio.wait_for(
                socket.send_data(error_frame(error.code, error.message, error.field)), timeout
            )
        await transport.close(
            socket, codes.get(error.status, 1011), error.code, timeout, svc.resets
        )
        return
    if socket.app.state.shutting_down:  # past close_all (realtime/drain.py): none is left open
        timeout = svc.config.realtime.close_timeout
        await transport.close(socket, CLOSE_GOING_AWAY, "server shutting down", timeout, svc.resets)
        await svc.slots.give_back(principal.id, session.id)
        return
    svc.sessions.add(session)
    metrics.WS_CONNECTIONS.inc()
    try:
        await session.run()
    finally:
        metrics.WS_CONNECTIONS.dec()
        code, reason = session.closing or (1000, "")
        metrics.WS_CLOSED.labels(str(code)).inc()
        try:
            if code != 1000:
                await transport.close(
                    socket, code, reason, svc.config.realtime.close_timeout, svc.resets
                )
            elif session.peer_code == 1005:
                # A close without a code, or a frame granian refused (over 16 MiB, a message
                # over 64 MiB, malformed) of which the app hears only "disconnected" with 1005:
                # answer 1009. After a real close frame granian has answered it, and drops this.
                await transport.close(
                    socket,
                    CLOSE_TOO_BIG,
                    "frame too large or malformed",
                    svc.config.realtime.close_timeout,
                    svc.resets,
                )
        finally:
            svc.sessions.discard(session)
            session.ended.set()  # after the close: a shutdown waits for it
            await svc.slots.give_back(principal.id, session.id)
        client = socket.scope.get("client")
        svc.activity.record(
            ActivityRecord(
                at=datetime.now(UTC),
                principal=principal.id,
                via=principal.via,
                method="WS",
                route="/v1/stream",
                status=101,
                duration_ms=(time.perf_counter() - started) * 1000,
                ip=client[0] if client else None,
                request_id=session.id,
            )
        )


ROUTER = router(
    "/",
    [post_receipt, get_receipts, get_presence, stream],
    dependencies=DEPENDENCIES,
    tags=["realtime"],
    security=BEARER,
)
