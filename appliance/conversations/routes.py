"""`/v1/conversations`: create, read, update, delete; members and their roles."""

from __future__ import annotations

from typing import Any

import structlog
from litestar import Response, Router, delete, get, patch, post, put
from litestar.params import FromPath
from litestar.status_codes import HTTP_204_NO_CONTENT
from redis.exceptions import RedisError

from appliance.api.body import decode
from appliance.api.deps import DEPENDENCIES, Req, Who, require_scope, services
from appliance.api.json import json_response
from appliance.conversations import service
from appliance.errors import Forbidden
from appliance.invalidation import Invalidation

log = structlog.get_logger()


@post("/")
async def create_conversation(request: Req, principal: Who) -> Response[bytes]:
    svc = services(request)
    require_scope(principal, "manage")
    spec = decode(await request.body(), service.ConversationCreate)
    if not principal.may_touch(spec.conversation):
        raise Forbidden("prefix", f"this key is limited to conversations '{principal.prefix}*'")
    async with svc.connection() as conn:
        created = await service.create(conn, spec, principal.id)
        members = await service.members(conn, spec.conversation)
    # Another process may have cached "no such conversation" a moment ago.
    await svc.announce(Invalidation("conversation", spec.conversation))
    return json_response({**_as_dict(created), "members": members}, 201)


def _as_dict(conversation: service.Conversation) -> dict[str, Any]:
    return {f: getattr(conversation, f) for f in conversation.__struct_fields__}


@get("/{conversation:str}")
async def get_conversation(
    request: Req, conversation: FromPath[str], principal: Who
) -> Response[bytes]:
    svc = services(request)
    await svc.access.require(principal, conversation, "view")
    async with svc.connection() as conn:
        return json_response(await service.get(conn, conversation))


@patch("/{conversation:str}")
async def update_conversation(
    request: Req, conversation: FromPath[str], principal: Who
) -> Response[bytes]:
    svc = services(request)
    await svc.access.require(principal, conversation, "manage")
    spec = decode(await request.body(), service.ConversationPatch)
    async with svc.connection() as conn:
        return json_response(await service.update(conn, conversation, spec))


@delete("/{conversation:str}", status_code=HTTP_204_NO_CONTENT)
async def delete_conversation(request: Req, conversation: FromPath[str], principal: Who) -> None:
    """History becomes unreadable at once, on every api process; retention purges it later."""
    svc = services(request)
    await svc.access.require(principal, conversation, "manage")
    async with svc.connection() as conn:
        await service.delete(conn, conversation)
    await svc.announce(Invalidation("conversation", conversation))
    try:
        await svc.redis.delete(
            svc.keys.receipts(conversation, "delivered"),
            svc.keys.receipts(conversation, "read"),
            svc.keys.presence(conversation),
        )
    except RedisError as exc:
        # Unreachable anyway (a deleted id is never re-created); their TTLs remove them.
        log.warning("conversation_state_not_deleted", conversation=conversation, error=str(exc))


@get("/{conversation:str}/members")
async def list_members(
    request: Req, conversation: FromPath[str], principal: Who
) -> Response[bytes]:
    svc = services(request)
    await svc.access.require(principal, conversation, "view")
    async with svc.connection() as conn:
        return json_response({"members": await service.members(conn, conversation)})


@put("/{conversation:str}/members/{member:str}")
async def put_member(
    request: Req,
    conversation: FromPath[str],
    member: FromPath[str],
    principal: Who,
) -> Response[bytes]:
    svc = services(request)
    await svc.access.require(principal, conversation, "manage")
    service.check_principal(member)
    spec = decode(await request.body(), service.RoleIn)
    async with svc.connection() as conn:
        result = await service.put_member(conn, conversation, member, spec.role)
    await svc.announce(Invalidation("member", conversation, member))
    return json_response(result)


@delete("/{conversation:str}/members/{member:str}", status_code=HTTP_204_NO_CONTENT)
async def remove_member(
    request: Req, conversation: FromPath[str], member: FromPath[str], principal: Who
) -> None:
    svc = services(request)
    await svc.access.require(principal, conversation, "manage")
    service.check_principal(member)
    async with svc.connection() as conn:
        await service.remove_member(conn, conversation, member)
    await svc.announce(Invalidation("member", conversation, member))


ROUTER = Router(
    "/v1/conversations",
    route_handlers=[
        create_conversation,
        get_conversation,
        update_conversation,
        delete_conversation,
        list_members,
        put_member,
        remove_member,
    ],
    dependencies=DEPENDENCIES,
    tags=["conversations"],
)
