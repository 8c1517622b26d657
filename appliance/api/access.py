"""Per-request plumbing around the whole app: request id, body limit, access log, HTTP metrics.

It wraps the router (not a route), so unmatched routes and early errors are logged and counted too.
"""

from __future__ import annotations

import re
import time
import uuid
from datetime import UTC, datetime

import msgspec
import structlog
from litestar.enums import ScopeType
from litestar.types import ASGIApp, HTTPResponseStartEvent, Message, Receive, Scope, Send

from appliance import metrics
from appliance.activity import ActivityRecord
from appliance.api.errors import error_body

log = structlog.get_logger()

PROBES = frozenset({"/livez", "/readyz", "/metrics"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}\Z")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def _reject_too_large(send: Send, limit: int, request_id: str) -> None:
    body = msgspec.json.encode(
        error_body("too_large", f"request body exceeds {limit} bytes", "body")
    )
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": 413,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode()),
        ],
    }
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})


def access_layer(app: ASGIApp, max_body_bytes: int) -> ASGIApp:
    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        request_id = given if given and _REQUEST_ID.match(given) else uuid.uuid4().hex
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", ()),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                length = _header(scope, b"content-length")
                if length is not None and length.isdigit() and int(length) > max_body_bytes:
                    status = 413
                    await _reject_too_large(send, max_body_bytes, request_id)
                else:
                    await app(scope, receive, send_wrapper)
            finally:
                elapsed = time.perf_counter() - started
                route = scope.get("path_template") or "unmatched"
                method = scope.get("method", "")
                metrics.HTTP_REQUESTS.labels(route, method, str(status)).inc()
                metrics.HTTP_LATENCY.labels(route, method).observe(elapsed)
                principal = (scope.get("state") or {}).get("principal")
                services = scope["app"].state.get("services")
                if principal is not None and services is not None:
                    client = scope.get("client")
                    services.activity.record(
                        ActivityRecord(
                            at=datetime.now(UTC),
                            principal=principal.id,
                            via=principal.via,
                            method=method,
                            route=route,
                            status=status,
                            duration_ms=elapsed * 1000,
                            ip=client[0] if client else None,
                            request_id=request_id,
                        )
                    )
                if scope["path"] not in PROBES:
                    log.info(
                        "request",
                        method=method,
                        route=route,
                        path=scope["path"],
                        status=status,
                        duration_ms=round(elapsed * 1000, 2),
                        request_id=request_id,
                    )

    return handle
