"""`/v1/keys`: API keys over HTTP (admin scope). The CLI calls the same functions."""

from __future__ import annotations

from litestar import Response, Router, delete, get, post
from litestar.params import FromPath

from appliance.api.body import decode
from appliance.api.deps import DEPENDENCIES, Req, Who, require_scope, services
from appliance.api.json import json_response
from appliance.auth import keys
from appliance.invalidation import Invalidation


@post("/")
async def create_key(request: Req, principal: Who) -> Response[bytes]:
    """Create a key; the response carries the full key once (`key`), never again."""
    svc = services(request)
    require_scope(principal, "admin")
    spec = decode(await request.body(), keys.KeyCreate)
    async with svc.connection() as conn:
        issued = await keys.create(conn, spec)
    return json_response(issued, 201)


@get("/")
async def list_keys(request: Req, principal: Who) -> Response[bytes]:
    svc = services(request)
    require_scope(principal, "admin")
    async with svc.connection() as conn:
        return json_response({"keys": await keys.list_keys(conn)})


@post("/{key_id:str}/rotate")
async def rotate_key(request: Req, key_id: FromPath[str], principal: Who) -> Response[bytes]:
    """A new secret; the old one keeps working for `grace` seconds (default [auth] rotate_grace)."""
    svc = services(request)
    require_scope(principal, "admin")
    raw = await request.body()
    spec = decode(raw, keys.KeyRotate) if raw.strip() else keys.KeyRotate()
    grace = svc.config.auth.rotate_grace if spec.grace is None else spec.grace
    async with svc.connection() as conn:
        issued = await keys.rotate(conn, key_id, grace)
    await svc.announce(Invalidation("key", key_id))
    return json_response(issued, 200)


@delete("/{key_id:str}", status_code=200)
async def revoke_key(request: Req, key_id: FromPath[str], principal: Who) -> Response[bytes]:
    """Revoke at once, on every api process (within a second)."""
    svc = services(request)
    require_scope(principal, "admin")
    async with svc.connection() as conn:
        info = await keys.revoke(conn, key_id)
    await svc.announce(Invalidation("key", key_id))
    return json_response(info)


ROUTER = Router(
    "/v1/keys",
    route_handlers=[create_key, list_keys, rotate_key, revoke_key],
    dependencies=DEPENDENCIES,
    tags=["keys"],
)
