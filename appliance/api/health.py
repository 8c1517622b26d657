"""Probes and metrics: `/livez`, `/readyz`, `/metrics` (no API auth; metrics may need a token)."""

from __future__ import annotations

import asyncio
import hmac
from typing import Any, Literal

import msgspec
from litestar import Request, Response, get
from litestar.datastructures import State

from appliance import metrics
from appliance.api.openapi import documented
from appliance.checks import readiness
from appliance.errors import Unauthorized
from appliance.resources import Resources


class Live(msgspec.Struct):
    status: Literal["ok"]


class CheckOut(msgspec.Struct):
    name: str
    ok: bool
    latency_ms: float
    detail: str


class Readiness(msgspec.Struct):
    status: Literal["ok", "fail"]
    checks: list[CheckOut]


@get("/livez", sync_to_thread=False, operation_class=documented(returns=Live))
def livez() -> dict[str, str]:
    """200 while this api process answers; checks nothing else."""
    return {"status": "ok"}


@get(
    "/readyz",
    operation_class=documented(
        returns=Readiness, also={503: (Readiness, "A check failed, or shutdown has begun")}
    ),
)
async def readyz(state: State) -> Response[dict[str, Any]]:
    """200 only when every dependency, the schema and every enabled program's heartbeat are fine."""
    res: Resources = state.resources
    checks = [c.as_dict() for c in await readiness(res)]
    ok = all(c["ok"] for c in checks)
    if state.shutting_down:
        checks.append(
            {"name": "shutdown", "ok": False, "latency_ms": 0.0, "detail": "shutting down"}
        )
        ok = False
    return Response(
        {"status": "ok" if ok else "fail", "checks": checks}, status_code=200 if ok else 503
    )


@get(
    "/metrics",
    media_type="text/plain; version=0.0.4",
    # 401 only when [api] metrics_token is set.
    operation_class=documented(returns=str, media_type="text/plain", errors=(401,)),
)
async def metrics_endpoint(request: Request[Any, Any, State], state: State) -> bytes:
    """Prometheus text for all programs of this container."""
    token = state.resources.config.api.metrics_token
    if token is not None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        expected = token.get_secret_value().encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise Unauthorized(
                "metrics_token", "metrics need `Authorization: Bearer <api.metrics_token>`"
            )
    return await asyncio.to_thread(metrics.render)


ROUTES = [livez, readyz, metrics_endpoint]
