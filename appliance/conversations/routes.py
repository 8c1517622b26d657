"""`/v1/conversations`: create, read, update, delete; members and their roles."""

from __future__ import annotations

import msgspec
import structlog
from litestar import Response, delete, get, patch, post, put
from litestar.params import FromPath
from litestar.status_codes import HTTP_204_NO_CONTENT
from redis.exceptions import RedisError

from appliance.api.body import decode
from appliance.api.deps import DEPENDENCIES, Req, Who, require_scope, services
from appliance.api.json import json_response
from appliance.api.openapi import BEARER, CONVERSATION, MEMBER, ON_BEHALF_OF, documented, link
from appliance.api.routing import router
from appliance.conversations import service
from appliance.errors import Forbidden
from appliance.invalidation import Invalidation

log = structlog.get_logger()
# Every route authenticates (401), may refuse (403: scope, prefix, impersonation) and needs
# PostgreSQL (503); a conversation in the path may be malformed (400) or unknown (404).
AUTH = (401, 403, 503)
IN_PATH = (400, 401, 403, 404, 503)
PATH = {"conversation": CONVERSATION, "member": MEMBER}
_CREATED = "$response.body#/conversation"
# From a created conversation to what can be done with it.
CREATED_LINKS = {
    name: link(name, conversation=_CREATED)
    for name in (
        "get_conversation",
        "update_conversation",
        "list_members",
        "publish",
        "publish_batch",
        "list_messages",
        "get_receipts",
        "get_presence",
        "delete_conversation",
    )
}


class ConversationCreated(service.Conversation):
    members: list[service.Member]


class MemberList(msgspec.Struct):
    members: list[service.Member]


@post(
    "/",
    operation_class=documented(
        returns=ConversationCreated,
        body=service.ConversationCreate,
        errors=(*AUTH, 400, 409, 413),
        headers=[ON_BEHALF_OF],
        links=CREATED_LINKS,
    ),
)
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
    fields = {f: getattr(created, f) for f in created.__struct_fields__}
    return json_response(ConversationCreated(**fields, members=members), 201)


@get(
    "/{conversation:str}",
    operation_class=documented(
        returns=service.Conversation, errors=IN_PATH, params=PATH, headers=[ON_BEHALF_OF]
    ),
)
async def get_conversation(
    request: Req, conversation: FromPath[str], principal: Who
) -> Response[bytes]:
    svc = services(request)
    await svc.access.require(principal, conversation, "view")
    async with svc.connection() as conn:
        return json_response(await service.get(conn, conversation))


@patch(
    "/{conversation:str}",
    operation_class=documented(
        returns=service.Conversation,
        body=service.ConversationPatch,
        errors=(*IN_PATH, 413),
        params=PATH,
        headers=[ON_BEHALF_OF],
    ),
)
async def update_conversation(
    request: Req, conversation: FromPath[str], principal: Who
) -> Response[bytes]:
    svc = services(request)
    await svc.access.require(principal, conversation, "manage")
    spec = decode(await request.body(), service.ConversationPatch)
    async with svc.connection() as conn:
        return json_response(await service.update(conn, conversation, spec))


@delete(
    "/{conversation:str}",
    status_code=HTTP_204_NO_CONTENT,
    operation_class=documented(errors=IN_PATH, params=PATH, headers=[ON_BEHALF_OF]),
)
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


@get(
    "/{conversation:str}/members",
    operation_class=documented(
        returns=MemberList, errors=IN_PATH, params=PATH, headers=[ON_BEHALF_OF]
    ),
)
async def list_members(
    request: Req, conversation: FromPath[str], principal: Who
) -> Response[bytes]:
    svc = services(request)
    await svc.access.require(principal, conversation, "view")
    async with svc.connection() as conn:
        return json_response(MemberList(await service.members(conn, conversation)))


@put(
    "/{conversation:str}/members/{member:str}",
    operation_class=documented(
        returns=service.Member,
        body=service.RoleIn,
        errors=(*IN_PATH, 413),
        params=PATH,
        headers=[ON_BEHALF_OF],
        links={
            "remove_member": link(
                "remove_member",
                conversation="$request.path.conversation",
                member="$response.body#/principal",
            )
        },
    ),
)
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


@delete(
    "/{conversation:str}/members/{member:str}",
    status_code=HTTP_204_NO_CONTENT,
    operation_class=documented(errors=IN_PATH, params=PATH, headers=[ON_BEHALF_OF]),
)
async def remove_member(
    request: Req, conversation: FromPath[str], member: FromPath[str], principal: Who
) -> None:
    svc = services(request)
    await svc.access.require(principal, conversation, "manage")
    service.check_principal(member)
    async with svc.connection() as conn:
        await service.remove_member(conn, conversation, member)
    await svc.announce(Invalidation("member", conversation, member))


ROUTER = router(
    "/v1/conversations",
    [
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
    security=BEARER,
)
