"""Routers whose every path answers OPTIONS with all of its methods.

litestar 2 makes a path's default OPTIONS handler when the first handler of that path is
registered and never updates it (litestar#4169, fixed in v3 only), so
`OPTIONS /v1/conversations/x` answered `Allow: GET, OPTIONS` beside PATCH and DELETE. `router()`
declares each path's OPTIONS first, with the methods of all the path's handlers, and litestar
then makes none of its own.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from litestar import Response, Router, route
from litestar.enums import HttpMethod
from litestar.handlers import HTTPRouteHandler
from litestar.types import ControllerRouterHandler


def router(path: str, handlers: list[ControllerRouterHandler], **options: Any) -> Router:
    """A litestar Router of `handlers` under `path` (`options` as Router's keyword arguments)."""
    methods: dict[str, set[str]] = defaultdict(set)
    for handler in handlers:
        if isinstance(handler, HTTPRouteHandler):
            for handler_path in handler.paths:
                methods[handler_path] |= set(handler.http_methods)
    allow = [_options(p, sorted(m | {"OPTIONS"})) for p, m in methods.items()]
    return Router(path, route_handlers=[*allow, *handlers], **options)


def _options(path: str, methods: list[str]) -> HTTPRouteHandler:
    allow = ", ".join(methods)

    def options() -> Response[None]:
        return Response(None, status_code=204, headers={"Allow": allow})

    return route(
        path, http_method=[HttpMethod.OPTIONS], include_in_schema=False, sync_to_thread=False
    )(options)
