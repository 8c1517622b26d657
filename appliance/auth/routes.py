"""`/v1/keys`: API keys over HTTP (admin scope). The CLI calls the same functions."""

from __future__ import annotations

import msgspec
from litestar import Response, delete, get, post
from litestar.params import FromPath

from appliance.api.body import decode
from appliance.api.deps import DEPENDENCIES, Req, Who, require_scope, services
from appliance.api.json import json_response
from appliance.api.openapi import BEARER, KEY_ID, ON_BEHALF_OF, documented, link
from appliance.api.routing import router
from appliance.auth import keys
from appliance.invalidation import Invalidation

AUTH = (401, 403, 503)  # every route: credentials, the admin scope, PostgreSQL
BY_ID = (*AUTH, 400, 404)  # a malformed or unknown key id
PARAMS = {"key_id": KEY_ID}


class KeyList(msgspec.Struct):
    keys: list[keys.KeyInfo]


@post(
    "/",
    operation_class=documented(
        returns=keys.IssuedKey,
        body=keys.KeyCreate,
        errors=(*AUTH, 400, 409, 413),
        headers=[ON_BEHALF_OF],
        links={
            name: link(name, key_id="$response.body#/id") for name in ("rotate_key", "revoke_key")
        },
    ),
)
async def create_key(request: Req, principal: Who) -> Response[bytes]:
    """Create a key; the response carries the full key once (`key`), never again."""
    svc = services(request)
    require_scope(principal, "admin")
    spec = decode(await request.body(), keys.KeyCreate)
    async with svc.connection() as conn:
        issued = await keys.create(conn, spec)
    return json_response(issued, 201)


@get("/", operation_class=documented(returns=KeyList, errors=AUTH, headers=[ON_BEHALF_OF]))
async def list_keys(request: Req, principal: Who) -> Response[bytes]:
    svc = services(request)
    require_scope(principal, "admin")
    async with svc.connection() as conn:
        return json_response(KeyList(await keys.list_keys(conn)))


@post(
    "/{key_id:str}/rotate",
    status_code=200,
    operation_class=documented(
        returns=keys.IssuedKey,
        body=keys.KeyRotate,
        body_required=False,
        errors=(*BY_ID, 413),
        params=PARAMS,
        headers=[ON_BEHALF_OF],
    ),
)
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


@delete(
    "/{key_id:str}",
    status_code=200,
    operation_class=documented(
        returns=keys.KeyInfo, errors=BY_ID, params=PARAMS, headers=[ON_BEHALF_OF]
    ),
)
async def revoke_key(request: Req, key_id: FromPath[str], principal: Who) -> Response[bytes]:
    """Revoke at once, on every api process (within a second)."""
    svc = services(request)
    require_scope(principal, "admin")
    async with svc.connection() as conn:
        info = await keys.revoke(conn, key_id)
    await svc.announce(Invalidation("key", key_id))
    return json_response(info)


ROUTER = router(
    "/v1/keys",
    [create_key, list_keys, rotate_key, revoke_key],
    dependencies=DEPENDENCIES,
    tags=["keys"],
    security=BEARER,
)
