"""Per-request plumbing around the whole app: request id, body limit and deadline, access log,
HTTP metrics.

It wraps the router (not a route), so unmatched routes and early errors are logged and counted too.

Two outcomes are the client's doing, never a 5xx:
- 408: the request body did not arrive within `api.body_timeout` (the time the app spends waiting
  for body bytes); the answer carries `Connection: close`, so the slow client's connection (and
  granian's permit for it) is released at once;
- 499 ("client closed request", as nginx counts it): the body ended before it was complete, by
  an abort or by broken chunked framing (granian reports both as a disconnect, so they cannot be
  told apart). The app's answer is dropped; a 400 with `Connection: close` goes out instead,
  which only a client still reading (the broken framing) receives.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog
from litestar.enums import ScopeType
from litestar.types import (
    ASGIApp,
    HTTPDisconnectEvent,
    HTTPResponseStartEvent,
    Message,
    Receive,
    ReceiveMessage,
    Scope,
    Send,
)

from appliance import metrics
from appliance.activity import ActivityRecord
from appliance.api.errors import error_body

log = structlog.get_logger()

PROBES = frozenset({"/livez", "/readyz", "/metrics"})
CLIENT_CLOSED = 499
_DISCONNECT: HTTPDisconnectEvent = {"type": "http.disconnect"}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}\Z")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def _reject(
    send: Send,
    status: int,
    body: dict[str, object],
    request_id: str,
    close: bool = False,
) -> None:
    encoded = msgspec.json.encode(body)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(encoded)).encode()),
        (b"x-request-id", request_id.encode()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": status,
        "headers": headers,
    }
    await send(start)
    await send({"type": "http.response.body", "body": encoded, "more_body": False})


class BodyDeadlines:
    """Cancels the tasks whose request body is overdue, checked every `TICK` seconds.

    One sweeping task per event loop (started on demand, gone once nothing waits) rather than a
    timer per body: on the publish path a timer (asyncio.timeout or call_at) cost 12-20 us per
    request, a dict entry well under 1. A body is cut within `TICK` after its deadline.
    """

    TICK = 0.25

    def __init__(self) -> None:
        self.waiting: dict[asyncio.Task[Any], float] = {}
        self.expired: set[asyncio.Task[Any]] = set()
        self.sweeper: asyncio.Task[None] | None = None

    def watch(self, task: asyncio.Task[Any], deadline: float) -> None:
        self.waiting[task] = deadline
        sweeper = self.sweeper
        if sweeper is None or sweeper.done() or sweeper.get_loop() is not task.get_loop():
            self.sweeper = task.get_loop().create_task(self._sweep())

    def unwatch(self, task: asyncio.Task[Any]) -> bool:
        """Stop watching `task`; True when its deadline passed and it was cancelled for it."""
        self.waiting.pop(task, None)
        if task in self.expired:
            self.expired.discard(task)
            return True
        return False

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while self.waiting:
            await asyncio.sleep(self.TICK)
            now = loop.time()
            for task, deadline in list(self.waiting.items()):
                if deadline <= now and task.get_loop() is loop:
                    del self.waiting[task]
                    self.expired.add(task)
                    task.cancel()


def access_layer(app: ASGIApp, max_body_bytes: int, body_timeout: float = 10.0) -> ASGIApp:
    deadlines = BodyDeadlines()

    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        request_id = given if given and _REQUEST_ID.match(given) else uuid.uuid4().hex
        started = time.perf_counter()
        status = 500
        # The body's state: still to come (with the waiting time it has left), complete, or cut
        # short (timed out or the client gone); once cut short the app's answer is not sent.
        body_pending = True
        budget = body_timeout
        cut_short = False

        async def receive_wrapper() -> ReceiveMessage:
            nonlocal body_pending, budget, cut_short, status
            if not body_pending:
                return await receive()
            task = asyncio.current_task()
            if task is None:  # not run by an asyncio task: no deadline to enforce
                return await receive()
            loop = task.get_loop()
            waited = loop.time()
            deadlines.watch(task, waited + budget)
            try:
                message = await receive()
            except asyncio.CancelledError:
                if not deadlines.unwatch(task):
                    raise
                task.uncancel()
                body_pending, cut_short = False, True
                status = 408
                log.info("request_body_timeout", body_timeout=body_timeout)
                await _reject(
                    send,
                    408,
                    error_body("timeout", f"request body not received within {body_timeout:g}s"),
                    request_id,
                    close=True,
                )
                return _DISCONNECT
            if deadlines.unwatch(task):
                # Expired just as the body came, which counts as in time: take the cancellation
                # here (it is pending for the task's next await), not somewhere in the app.
                try:
                    await asyncio.sleep(0)
                except asyncio.CancelledError:
                    task.uncancel()
            budget -= loop.time() - waited
            if message["type"] == "http.disconnect":
                body_pending, cut_short = False, True
                status = CLIENT_CLOSED
                # Heard only by a client whose chunked framing broke (one that left hears nothing);
                # without it, granian would answer 500 for the app.
                await _reject(
                    send,
                    400,
                    error_body("invalid", "request body ended before it was complete", "body"),
                    request_id,
                    close=True,
                )
            elif not message.get("more_body", False):
                body_pending = False
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if cut_short:
                return
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
                if (
                    length is not None
                    and length.isascii()
                    and length.isdigit()
                    and int(length) > max_body_bytes
                ):
                    status = 413
                    await _reject(
                        send,
                        413,
                        error_body(
                            "too_large", f"request body exceeds {max_body_bytes} bytes", "body"
                        ),
                        request_id,
                    )
                else:
                    await app(scope, receive_wrapper, send_wrapper)
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
