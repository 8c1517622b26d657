"""The product app plus one no-op route, the same-run reference of `bench/publish.py`.

granian serves `noop_app:create` (with bench/ on PYTHONPATH) exactly as it serves
`appliance.api.app:create_app`: same flags, same access layer (request id, access log, metrics),
same litestar app. `POST /bench/noop` reads the body and answers a small JSON, so the difference
between it and `POST /v1/conversations/{c}/messages` is the publish route's own work: auth,
access check, validation, rate limit and the Lua script.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar, Request, Response, post

from appliance.api.app import create_app
from appliance.api.json import json_response

NOOP_PATH = "/bench/noop"


@post(NOOP_PATH)
async def noop(request: Request[Any, Any, Any]) -> Response[bytes]:
    await request.body()
    return json_response(b'{"ok":true}', 201)


def create() -> Litestar:
    app = create_app()
    app.register(noop)
    return app


async def _bare(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Plain ASGI: 200 `{}` to any HTTP request; a WebSocket that answers every text frame with
    `{"event":"subscribed"}` and otherwise waits. No framework, no app state."""
    if scope["type"] == "lifespan":
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "http":
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
    elif scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while (event := await receive())["type"] != "websocket.disconnect":
            if event.get("text"):
                await send({"type": "websocket.send", "text": '{"event":"subscribed"}'})


def bare() -> Any:
    """Factory of the bare ASGI app: the floor of granian's own per-socket memory in fanout.py."""
    return _bare
