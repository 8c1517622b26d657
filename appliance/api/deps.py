"""Request dependencies shared by the v1 routes: the services and the authenticated principal."""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.di import NamedDependency, Provide

from appliance.api.services import Services
from appliance.auth.principal import Principal
from appliance.errors import Forbidden


def services(request: Request[Any, Any, Any]) -> Services:
    svc: Services = request.app.state.services
    return svc


async def principal(request: Request[Any, Any, Any]) -> Principal:
    """Authenticates every v1 request; the access layer logs the principal in the activity log."""
    svc: Services = request.app.state.services
    headers = request.headers
    who = await svc.auth.authenticate(
        headers.get("authorization"), None, headers.get("x-on-behalf-of")
    )
    request.scope.setdefault("state", {})["principal"] = who
    return who


def require_scope(who: Principal, scope: str) -> None:
    if not who.has(scope):
        raise Forbidden("scope", f"this needs the '{scope}' scope")


Who = NamedDependency[Principal]
Req = Request[Any, Any, Any]

DEPENDENCIES = {
    "principal": Provide(principal),
}
