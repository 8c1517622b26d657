"""Conversations and membership in PostgreSQL. Callers announce changes (see routes).

Each change emits its webhook event (`conversation.*`, `member.*`) in the change's own
transaction: a change that rolls back queues no delivery, one that commits has its jobs queued
with it. An event's `data` is the conversation or member as the API returns it.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from appliance.auth.principal import PRINCIPAL
from appliance.errors import Conflict, Invalid, NotFound
from appliance.webhooks import service as webhooks
from appliance.webhooks.events import EventType, event

Conn = psycopg.AsyncConnection[Any]
Role = Literal["owner", "member", "reader"]
CONVERSATION = re.compile(r"^[A-Za-z0-9._:-]{1,128}\Z")
ConversationId = Annotated[str, msgspec.Meta(pattern=CONVERSATION.pattern)]
PrincipalId = Annotated[str, msgspec.Meta(pattern=PRINCIPAL.pattern)]
Title = Annotated[str, msgspec.Meta(max_length=200)]
Metadata = Annotated[dict[str, Any], msgspec.Meta(max_length=64)]


class MemberIn(msgspec.Struct, forbid_unknown_fields=True):
    principal: PrincipalId
    role: Role


class ConversationCreate(msgspec.Struct, forbid_unknown_fields=True):
    conversation: ConversationId
    title: Title | None = None
    metadata: Metadata = {}
    members: Annotated[list[MemberIn], msgspec.Meta(max_length=1000)] = []


class ConversationPatch(msgspec.Struct, forbid_unknown_fields=True):
    title: Title | None = None
    metadata: Metadata | None = None


class RoleIn(msgspec.Struct, forbid_unknown_fields=True):
    role: Role


class Member(msgspec.Struct):
    principal: str
    role: str
    added_at: datetime


class Conversation(msgspec.Struct):
    conversation: str
    title: str | None
    metadata: dict[str, Any]
    created_by: str
    created_at: datetime
    updated_at: datetime


async def _emit(conn: Conn, type: EventType, conversation: str, data: dict[str, Any]) -> None:
    """Queue the event on `conn`, inside the caller's open transaction."""
    await webhooks.emit(conn, [event(type, data, conversation=conversation)])


def _wire(value: msgspec.Struct) -> dict[str, Any]:
    """`value` as the API encodes it (datetimes as RFC 3339 strings)."""
    data: dict[str, Any] = msgspec.to_builtins(value)
    return data


def check_id(conversation: str) -> str:
    if not CONVERSATION.match(conversation):
        raise Invalid("must match [A-Za-z0-9._:-]{1,128}", field="conversation")
    return conversation


def check_principal(principal: str) -> str:
    if not PRINCIPAL.match(principal):
        raise Invalid("must be 'user:<id>' or 'key:<name>'", field="principal")
    return principal


_COLUMNS = "id AS conversation, title, metadata, created_by, created_at, updated_at"


async def create(conn: Conn, spec: ConversationCreate, creator: str) -> Conversation:
    """The creator becomes an owner when it is a user (a managing key stays outside)."""
    members = {m.principal: m.role for m in spec.members}
    if creator.startswith("user:"):
        members[creator] = "owner"
    async with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"""INSERT INTO conversations (id, title, metadata, created_by)
                VALUES (%s, %s, %s, %s) ON CONFLICT (id) DO NOTHING RETURNING {_COLUMNS}""",
            (spec.conversation, spec.title, Jsonb(spec.metadata), creator),
        )
        row = await cur.fetchone()
        if row is None:
            raise Conflict(
                f"conversation {spec.conversation!r} exists (or was deleted and awaits purge)",
                field="conversation",
            )
        await cur.execute(
            """INSERT INTO conversation_members (conversation, principal, role)
               SELECT %s, p, r FROM unnest(%s::text[], %s::text[]) AS m(p, r)""",
            (spec.conversation, list(members), list(members.values())),
        )
        created = Conversation(**row)
        listed = await _members(cur, spec.conversation)
        data = {**_wire(created), "members": [_wire(m) for m in listed]}
        await _emit(conn, "conversation.created", spec.conversation, data)
    return created


async def get(conn: Conn, conversation: str) -> Conversation:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} FROM conversations WHERE id = %s AND deleted_at IS NULL",
            (conversation,),
        )
        row = await cur.fetchone()
    if row is None:
        raise NotFound(f"no conversation {conversation!r}", field="conversation")
    return Conversation(**row)


async def exists(conn: Conn, conversation: str) -> bool:
    cur = await conn.execute(
        "SELECT 1 FROM conversations WHERE id = %s AND deleted_at IS NULL", (conversation,)
    )
    return await cur.fetchone() is not None


async def update(conn: Conn, conversation: str, patch: ConversationPatch) -> Conversation:
    async with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"""UPDATE conversations
                   SET title = coalesce(%s, title),
                       metadata = coalesce(%s, metadata),
                       updated_at = now()
                 WHERE id = %s AND deleted_at IS NULL RETURNING {_COLUMNS}""",
            (
                patch.title,
                Jsonb(patch.metadata) if patch.metadata is not None else None,
                conversation,
            ),
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"no conversation {conversation!r}", field="conversation")
        updated = Conversation(**row)
        await _emit(conn, "conversation.updated", conversation, _wire(updated))
    return updated


async def delete(conn: Conn, conversation: str) -> None:
    """Tombstone: reads fail at once; the history itself is purged by retention. The event
    carries the conversation as it was; its members go with it (no `member.removed` each)."""
    async with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"""UPDATE conversations SET deleted_at = now()
                 WHERE id = %s AND deleted_at IS NULL RETURNING {_COLUMNS}""",
            (conversation,),
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"no conversation {conversation!r}", field="conversation")
        await cur.execute(
            "DELETE FROM conversation_members WHERE conversation = %s", (conversation,)
        )
        await _emit(conn, "conversation.deleted", conversation, _wire(Conversation(**row)))


async def role_of(conn: Conn, conversation: str, principal: str) -> str | None:
    cur = await conn.execute(
        "SELECT role FROM conversation_members WHERE conversation = %s AND principal = %s",
        (conversation, principal),
    )
    row = await cur.fetchone()
    return str(row[0]) if row else None


async def members(conn: Conn, conversation: str) -> list[Member]:
    async with conn.cursor(row_factory=dict_row) as cur:
        return await _members(cur, conversation)


async def _members(cur: psycopg.AsyncCursor[dict[str, Any]], conversation: str) -> list[Member]:
    await cur.execute(
        """SELECT principal, role, added_at FROM conversation_members
            WHERE conversation = %s ORDER BY added_at, principal""",
        (conversation,),
    )
    return [Member(**row) for row in await cur.fetchall()]


async def put_member(conn: Conn, conversation: str, principal: str, role: str) -> Member:
    """Add a member or change its role: either is a `member.added` event carrying the role it
    has now. A PUT of the role it already has changes nothing and emits nothing."""
    async with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        # The conflict's WHERE leaves an unchanged row alone: no row comes back for it.
        await cur.execute(
            """INSERT INTO conversation_members AS m (conversation, principal, role)
               VALUES (%s, %s, %s)
               ON CONFLICT (conversation, principal) DO UPDATE SET role = excluded.role
               WHERE m.role IS DISTINCT FROM excluded.role
               RETURNING principal, role, added_at""",
            (conversation, principal, role),
        )
        row = await cur.fetchone()
        if row is not None:
            member = Member(**row)
            await _emit(conn, "member.added", conversation, _wire(member))
            return member
        await cur.execute(
            """SELECT principal, role, added_at FROM conversation_members
                WHERE conversation = %s AND principal = %s""",
            (conversation, principal),
        )
        row = await cur.fetchone()
    assert row is not None
    return Member(**row)


async def remove_member(conn: Conn, conversation: str, principal: str) -> None:
    """The `member.removed` event carries the member as it was."""
    async with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            """DELETE FROM conversation_members WHERE conversation = %s AND principal = %s
               RETURNING principal, role, added_at""",
            (conversation, principal),
        )
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"{principal!r} is not a member", field="principal")
        await _emit(conn, "member.removed", conversation, _wire(Member(**row)))
