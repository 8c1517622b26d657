"""Routers whose every path answers OPTIONS with all of its methods, and whose routes refuse
query parameters they do not take.

litestar 2 makes a path's default OPTIONS handler when the first handler of that path is
registered and never updates it (litestar#4169, fixed in v3 only), so
`OPTIONS /v1/conversations/x` answered `Allow: GET, OPTIONS` beside PATCH and DELETE. `router()`
declares each path's OPTIONS first, with the methods of all the path's handlers, and litestar
then makes none of its own.

litestar ignores query parameters a handler does not declare, so a misspelt one (`?befor=9`)
was a silent 200 of another page; every route of these routers answers 400 naming it instead.
"""

from __future__ import annotations

from collections import defaultdict
from functools import cache
from typing import Any

from litestar import Request, Response, Router, route
from litestar.enums import HttpMethod
from litestar.handlers import HTTPRouteHandler
from litestar.params import QueryParameter
from litestar.types import ControllerRouterHandler

from appliance.errors import Invalid


def router(path: str, handlers: list[ControllerRouterHandler], **options: Any) -> Router:
    """A litestar Router of `handlers` under `path` (`options` as Router's keyword arguments)."""
    methods: dict[str, set[str]] = defaultdict(set)
    for handler in handlers:
        if isinstance(handler, HTTPRouteHandler):
            for handler_path in handler.paths:
                methods[handler_path] |= set(handler.http_methods)
    allow = [_options(p, sorted(m | {"OPTIONS"})) for p, m in methods.items()]
    return Router(
        path,
        route_handlers=[*allow, *handlers],
        before_request=_known_query_only,
        **options,
    )


@cache
def _query_names(handler: HTTPRouteHandler) -> frozenset[str]:
    """The query parameters `handler` declares (by their alias where they have one)."""
    return frozenset(
        field.kwarg_definition.query or name
        for name, field in handler.parsed_fn_signature.parameters.items()
        if isinstance(field.kwarg_definition, QueryParameter)
    )


def _known_query_only(request: Request[Any, Any, Any]) -> None:
    handler = request.route_handler
    if not isinstance(handler, HTTPRouteHandler):
        return
    known = _query_names(handler)
    for name in request.query_params:
        if name not in known:
            choices = f" (it takes {', '.join(sorted(known))})" if known else ""
            raise Invalid(
                f"is not a query parameter of this operation{choices}", field=name or "query"
            )


def _options(path: str, methods: list[str]) -> HTTPRouteHandler:
    allow = ", ".join(methods)

    def options() -> Response[None]:
        return Response(None, status_code=204, headers={"Allow": allow})

    return route(
        path, http_method=[HttpMethod.OPTIONS], include_in_schema=False, sync_to_thread=False
    )(options)
