"""Bad input always gets a 4xx that names the field, never a 500.

Bodies (malformed, wrong types, unknown and missing fields, over the size limits), path
parameters, query parameters and headers, on every v1 HTTP route that takes them; idempotency
conflicts and replays; the rate limit. Each case asserts the status, the error code and the field.
Real PostgreSQL and Redis underneath.
"""

from __future__ import annotations

import base64
import copy
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import msgspec
import psycopg
import pytest
import pytest_asyncio
from litestar.testing import AsyncTestClient

from appliance.api.app import create_app
from appliance.api.errors import EXCEPTION_HANDLERS
from appliance.config import Config
from appliance.errors import Invalid, known
from appliance.resources import Resources, open_resources
from tests.messaging import bearer, issue_key, unique

Client = AsyncTestClient[Any]
# One app per configuration for the module; every test still makes its own keys and conversations.
pytestmark = pytest.mark.asyncio(loop_scope="module")

API_LIMIT = 4096  # [api] max_body_bytes of the `limited` app
BODY_LIMIT = 256  # [messages] max_body_bytes of the `limited` app
BATCH_LIMIT = 5  # [messages] max_batch of the `limited` app


@asynccontextmanager
async def app_with(
    base_settings: dict[str, Any], **sections: dict[str, Any]
) -> AsyncIterator[tuple[Client, Resources]]:
    """The full app (lifespan, real services) with some config sections changed."""
    settings = copy.deepcopy(base_settings)
    for section, values in sections.items():
        settings.setdefault(section, {}).update(values)
    config = Config.model_validate(settings)
    async with open_resources(config, "test") as resources:
        await resources.storage.init()
        async with AsyncTestClient(app=create_app(config)) as client:
            yield client, resources


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def default_app(
    base_settings: dict[str, Any], migrated: str
) -> AsyncIterator[tuple[Client, Resources]]:
    async with app_with(base_settings) as app:
        yield app


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def limited_app(
    base_settings: dict[str, Any], migrated: str
) -> AsyncIterator[tuple[Client, Resources]]:
    async with app_with(
        base_settings,
        api={"max_body_bytes": API_LIMIT},
        messages={"max_body_bytes": BODY_LIMIT, "max_batch": BATCH_LIMIT},
    ) as app:
        yield app


@dataclass
class Ctx:
    """One test's admin key, a conversation (seq 1 published) and its member `user`."""

    api: Client
    resources: Resources
    admin: str
    conversation: str
    user: str
    impersonator: str
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def as_admin(self) -> dict[str, str]:
        return bearer(self.admin)

    @property
    def as_user(self) -> dict[str, str]:
        return bearer(self.impersonator, **{"X-On-Behalf-Of": self.user})

    @property
    def messages(self) -> str:
        return f"/v1/conversations/{self.conversation}/messages"

    async def send(
        self,
        method: str,
        path: str,
        payload: Any = None,
        headers: dict[str, Any] | None = None,
        user: bool = False,
    ) -> Any:
        path = path.format(c=self.conversation)
        headers = {**(self.as_user if user else self.as_admin), **(headers or {})}
        if isinstance(payload, bytes):
            return await self.api.request(method, path, content=payload, headers=headers)
        return await self.api.request(method, path, json=payload, headers=headers)

    async def publish(self, payload: Any = None, **headers: Any) -> Any:
        payload = {"type": "text", "body": {"text": "hi"}} if payload is None else payload
        return await self.send("POST", self.messages, payload, headers)


async def make_ctx(api: Client, resources: Resources) -> Ctx:
    admin = await issue_key(resources, ["admin"])
    user = f"user:bob-{uuid.uuid4().hex[:8]}"
    conversation = unique("team")
    created = await api.post(
        "/v1/conversations",
        json={"conversation": conversation, "members": [{"principal": user, "role": "member"}]},
        headers=bearer(admin),
    )
    assert created.status_code == 201, created.text
    ctx = Ctx(
        api, resources, admin, conversation, user, await issue_key(resources, ["impersonate"])
    )
    first = await ctx.publish()
    assert first.status_code == 201, first.text
    assert first.json()["seq"] == 1
    return ctx


@pytest_asyncio.fixture(loop_scope="module")
async def ctx(default_app: tuple[Client, Resources]) -> Ctx:
    return await make_ctx(*default_app)


@pytest_asyncio.fixture(loop_scope="module")
async def limited(limited_app: tuple[Client, Resources]) -> Ctx:
    return await make_ctx(*limited_app)


def expect(response: Any, status: int, code: str, field: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert (error["code"], error["field"]) == (code, field), error
    assert error["message"]
    return error


# Request size: [api] max_body_bytes, refused before parsing (and before auth).

SIZED_ROUTES = [
    ("POST", "/v1/conversations/{c}/messages"),
    ("POST", "/v1/conversations/{c}/messages/batch"),
    ("POST", "/v1/conversations/{c}/receipts"),
    ("POST", "/v1/conversations"),
    ("PATCH", "/v1/conversations/{c}"),
    ("PUT", "/v1/conversations/{c}/members/user:x"),
    ("POST", "/v1/keys"),
]


@pytest.mark.parametrize(("method", "path"), SIZED_ROUTES, ids=lambda v: v.split("/")[-1])
async def test_request_over_api_limit_is_413(limited: Ctx, method: str, path: str) -> None:
    big = b'{"title":"' + b"x" * API_LIMIT + b'"}'
    expect(await limited.send(method, path, big), 413, "too_large", "body")
    anonymous = await limited.api.request(method, path.format(c="x"), content=big)
    expect(anonymous, 413, "too_large", "body")


async def test_request_at_api_limit_is_parsed(limited: Ctx) -> None:
    padded = b'{"type":"text","body":{},"foo":"' + b"x" * API_LIMIT + b'"}'
    at_limit = padded[: API_LIMIT - 2] + b'"}'
    assert len(at_limit) == API_LIMIT
    expect(await limited.publish(at_limit), 400, "invalid", "foo")


async def test_streamed_request_over_api_limit_is_413(limited: Ctx) -> None:
    """No Content-Length (chunked): litestar's own limit refuses it while reading, same shape."""
    path = limited.messages
    chunks = [b'{"type":"text","body":"', *[b"x" * 1000] * 5, b'"}']
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"authorization", f"Bearer {limited.admin}".encode()),
            (b"transfer-encoding", b"chunked"),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }

    async def receive() -> dict[str, Any]:
        if chunks:
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}
        return {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await limited.api.app(scope, receive, send)  # type: ignore[arg-type]
    assert sent[0]["status"] == 413
    error = msgspec.json.decode(sent[1]["body"])["error"]
    assert (error["code"], error["field"]) == ("too_large", "body")


# Message body: [messages] max_body_bytes, per message.


async def test_message_body_over_limit(limited: Ctx) -> None:
    at_limit = {"type": "text", "body": "x" * (BODY_LIMIT - 2)}  # the quotes count
    assert (await limited.publish(at_limit)).status_code == 201
    over = {"type": "text", "body": "x" * (BODY_LIMIT - 1)}
    expect(await limited.publish(over), 400, "invalid", "body")
    batch = {"messages": [at_limit, over]}
    response = await limited.send("POST", f"{limited.messages}/batch", batch)
    expect(response, 400, "invalid", "messages[1].body")


async def test_batch_over_max_batch(limited: Ctx) -> None:
    one = {"type": "text", "body": 1}
    path = f"{limited.messages}/batch"
    assert (await limited.send("POST", path, {"messages": [one] * BATCH_LIMIT})).status_code == 201
    too_many = await limited.send("POST", path, {"messages": [one] * (BATCH_LIMIT + 1)})
    expect(too_many, 400, "invalid", "messages")


async def test_batch_over_default_max_batch(ctx: Ctx) -> None:
    limit = ctx.resources.config.messages.max_batch
    payload = {"messages": [{"type": "t", "body": 1}] * (limit + 1)}
    response = await ctx.send("POST", f"{ctx.messages}/batch", payload)
    expect(response, 400, "invalid", "messages")


# Bodies that do not decode: one table over every route that takes a body.


@dataclass(frozen=True)
class Bad:
    name: str
    method: str
    path: str
    payload: Any
    field: str
    user: bool = False  # send as the member user (receipts are members' own)


M = "/v1/conversations/{c}/messages"
B = "/v1/conversations/{c}/messages/batch"
MSG = {"type": "text", "body": {"text": "hi"}}
GOOD_ATTACHMENT = {"id": "a1", "name": "a.txt", "size": 3, "content_type": "text/plain"}
DEEP = b'{"type":"text","body":' + b"[" * 5000 + b"]" * 5000 + b"}"
BAD_BODIES = [
    # One message.
    Bad("publish_bad_json", "POST", M, b'{"type": "text", "body":', "body"),
    Bad("publish_not_utf8", "POST", M, b'{"type":"\xff\xfe"}', "body"),
    Bad("publish_body_not_utf8", "POST", M, b'{"type":"text","body":"\xc3\x28"}', "body"),
    Bad("batch_body_not_utf8", "POST", B,
        b'{"messages":[{"type":"text","body":1},{"type":"text","body":"\xc3\x28"}]}',
        "messages[1].body"),
    Bad("batch_not_utf8", "POST", B, b'{"messages":[{"type":"\xff","body":1}]}', "body"),
    Bad("publish_empty", "POST", M, b"", "body"),
    Bad("publish_array", "POST", M, [MSG], "body"),
    Bad("publish_nested_too_deep", "POST", M, DEEP, "body"),
    Bad("publish_type_int", "POST", M, {**MSG, "type": 1}, "type"),
    Bad("publish_type_pattern", "POST", M, {**MSG, "type": "Text!"}, "type"),
    Bad("publish_type_too_long", "POST", M, {**MSG, "type": "t" * 33}, "type"),
    Bad("publish_type_trailing_newline", "POST", M, {**MSG, "type": "text\n"}, "type"),
    Bad("publish_reply_to_str", "POST", M, {**MSG, "reply_to": "x"}, "reply_to"),
    Bad("publish_reply_to_zero", "POST", M, {**MSG, "reply_to": 0}, "reply_to"),
    Bad("publish_reply_to_float", "POST", M, {**MSG, "reply_to": 1.5}, "reply_to"),
    Bad("publish_reply_to_bool", "POST", M, {**MSG, "reply_to": True}, "reply_to"),
    Bad("publish_reply_to_beyond_head", "POST", M, {**MSG, "reply_to": 2}, "reply_to"),
    Bad("publish_reply_to_huge", "POST", M, {**MSG, "reply_to": 2**70}, "reply_to"),
    Bad("publish_unknown_field", "POST", M, {**MSG, "colour": "red"}, "colour"),
    Bad("publish_missing_type", "POST", M, {"body": 1}, "type"),
    Bad("publish_missing_body", "POST", M, {"type": "text"}, "body"),
    Bad("publish_attachments_not_list", "POST", M, {**MSG, "attachments": {}}, "attachments"),
    Bad("publish_attachment_missing_id", "POST", M,
        {**MSG, "attachments": [{"name": "a.txt", "size": 1, "content_type": "text/plain"}]},
        "attachments[0].id"),
    Bad("publish_attachment_unknown", "POST", M, {**MSG, "attachments": [GOOD_ATTACHMENT]},
        "attachments[0]"),
    Bad("publish_attachment_negative_size", "POST", M,
        {**MSG, "attachments": [GOOD_ATTACHMENT, {**GOOD_ATTACHMENT, "size": -1}]},
        "attachments[1].size"),
    Bad("publish_attachment_content_type_not_ascii", "POST", M,
        {**MSG, "attachments": [{**GOOD_ATTACHMENT, "content_type": "téxt/plain"}]},
        "attachments[0].content_type"),
    Bad("publish_too_many_attachments", "POST", M,
        {**MSG, "attachments": [GOOD_ATTACHMENT] * 21}, "attachments"),
    # Batches.
    Bad("batch_empty", "POST", B, {"messages": []}, "messages"),
    Bad("batch_missing_messages", "POST", B, {}, "messages"),
    Bad("batch_messages_not_list", "POST", B, {"messages": 5}, "messages"),
    Bad("batch_bad_type_inside", "POST", B,
        {"messages": [MSG, MSG, MSG, {**MSG, "type": 1}]}, "messages[3].type"),
    Bad("batch_unknown_field_inside", "POST", B,
        {"messages": [MSG, {**MSG, "colour": "red"}]}, "messages[1].colour"),
    Bad("batch_reply_to_beyond_head", "POST", B,
        {"messages": [MSG, {**MSG, "reply_to": 50}]}, "messages[1].reply_to"),
    Bad("batch_bad_json", "POST", B, b'{"messages": [', "body"),
    # Keys.
    Bad("key_bad_scope", "POST", "/v1/keys", {"name": "k1", "scopes": ["root"]}, "scopes[0]"),
    Bad("key_bad_name", "POST", "/v1/keys", {"name": "a b", "scopes": ["read"]}, "name"),
    Bad("key_name_trailing_newline", "POST", "/v1/keys", {"name": "k\n", "scopes": ["read"]},
        "name"),
    Bad("key_long_name", "POST", "/v1/keys", {"name": "k" * 65, "scopes": ["read"]}, "name"),
    Bad("key_missing_name", "POST", "/v1/keys", {"scopes": ["read"]}, "name"),
    Bad("key_past_expiry", "POST", "/v1/keys",
        {"name": "k1", "scopes": ["read"], "expires_at": "2000-01-01T00:00:00Z"}, "expires_at"),
    Bad("key_naive_expiry", "POST", "/v1/keys",
        {"name": "k1", "scopes": ["read"], "expires_at": "2999-01-01T00:00:00"}, "expires_at"),
    Bad("key_expiry_not_a_date", "POST", "/v1/keys",
        {"name": "k1", "scopes": ["read"], "expires_at": "soon"}, "expires_at"),
    Bad("key_bad_prefix", "POST", "/v1/keys",
        {"name": "k1", "scopes": ["read"], "conversation_prefix": "a b"}, "conversation_prefix"),
    Bad("key_unknown_field", "POST", "/v1/keys",
        {"name": "k1", "scopes": ["read"], "owner": "me"}, "owner"),
    Bad("rotate_negative_grace", "POST", "/v1/keys/{key}/rotate", {"grace": -1}, "grace"),
    Bad("rotate_grace_str", "POST", "/v1/keys/{key}/rotate", {"grace": "long"}, "grace"),
    # Conversations and members.
    Bad("create_bad_id", "POST", "/v1/conversations", {"conversation": "a b"}, "conversation"),
    Bad("create_long_id", "POST", "/v1/conversations", {"conversation": "c" * 129},
        "conversation"),
    Bad("create_id_trailing_newline", "POST", "/v1/conversations", {"conversation": "team\n"},
        "conversation"),
    Bad("create_member_trailing_newline", "POST", "/v1/conversations",
        {"conversation": "@new", "members": [{"principal": "user:bob\n", "role": "owner"}]},
        "members[0].principal"),
    Bad("create_missing_id", "POST", "/v1/conversations", {"title": "t"}, "conversation"),
    Bad("create_long_title", "POST", "/v1/conversations",
        {"conversation": "@new", "title": "t" * 201}, "title"),
    Bad("create_bad_member_principal", "POST", "/v1/conversations",
        {"conversation": "@new", "members": [{"principal": "bob", "role": "member"}]},
        "members[0].principal"),
    Bad("create_bad_member_role", "POST", "/v1/conversations",
        {"conversation": "@new", "members": [{"principal": "user:bob", "role": "king"}]},
        "members[0].role"),
    Bad("create_unknown_field", "POST", "/v1/conversations",
        {"conversation": "@new", "colour": "red"}, "colour"),
    Bad("patch_long_title", "PATCH", "/v1/conversations/{c}", {"title": "t" * 201}, "title"),
    Bad("patch_metadata_list", "PATCH", "/v1/conversations/{c}", {"metadata": []}, "metadata"),
    Bad("patch_unknown_field", "PATCH", "/v1/conversations/{c}", {"owner": "me"}, "owner"),
    Bad("patch_empty", "PATCH", "/v1/conversations/{c}", b"", "body"),
    Bad("member_bad_role", "PUT", "/v1/conversations/{c}/members/user:eve", {"role": "king"},
        "role"),
    Bad("member_missing_role", "PUT", "/v1/conversations/{c}/members/user:eve", {}, "role"),
    Bad("member_empty", "PUT", "/v1/conversations/{c}/members/user:eve", b"", "body"),
    # Receipts.
    Bad("receipt_bad_type", "POST", "/v1/conversations/{c}/receipts",
        {"type": "seen", "seq": 1}, "type", user=True),
    Bad("receipt_seq_str", "POST", "/v1/conversations/{c}/receipts",
        {"type": "read", "seq": "x"}, "seq", user=True),
    Bad("receipt_seq_beyond_head", "POST", "/v1/conversations/{c}/receipts",
        {"type": "read", "seq": 2}, "seq", user=True),
    Bad("receipt_seq_zero", "POST", "/v1/conversations/{c}/receipts",
        {"type": "read", "seq": 0}, "seq", user=True),
    Bad("receipt_seq_huge", "POST", "/v1/conversations/{c}/receipts",
        {"type": "read", "seq": 2**70}, "seq", user=True),
    Bad("receipt_missing_seq", "POST", "/v1/conversations/{c}/receipts",
        {"type": "read"}, "seq", user=True),
]  # fmt: skip


@pytest.mark.parametrize("bad", BAD_BODIES, ids=lambda b: b.name)
async def test_bad_body_names_the_field(ctx: Ctx, bad: Bad) -> None:
    payload = bad.payload
    if isinstance(payload, dict) and payload.get("conversation") == "@new":
        payload = {**payload, "conversation": unique("new")}
    path = bad.path
    if "{key}" in path:
        victim = await issue_key(ctx.resources, ["read"])
        path = path.replace("{key}", victim[3:15])
    response = await ctx.send(bad.method, path, payload, user=bad.user)
    expect(response, 400, "invalid", bad.field)


# Values PostgreSQL cannot store (NUL in text, \u0000 in jsonb; lone surrogates): every string
# field of every body, object keys included, at any depth; 400 naming the place, never a 500.

NUL = "a\u0000b"
C = "/v1/conversations"
P = "/v1/conversations/{c}"
MEMBER = "/v1/conversations/{c}/members/user:eve"
K = "/v1/keys"
R = "/v1/conversations/{c}/receipts"
KEY = {"name": "@name", "scopes": ["read"]}
NEW = {"conversation": "@new"}


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


UNSTORABLE = [
    # POST /v1/conversations
    Bad("create_title", "POST", C, {**NEW, "title": NUL}, "title"),
    Bad("create_title_only_nul", "POST", C, {**NEW, "title": "\u0000"}, "title"),
    Bad("create_conversation_id", "POST", C, {"conversation": NUL}, "conversation"),
    Bad("create_metadata_value", "POST", C, {**NEW, "metadata": {"k": "\u0000"}}, "metadata.k"),
    Bad("create_metadata_key", "POST", C, {**NEW, "metadata": {NUL: 1}}, "metadata"),
    Bad("create_metadata_nested_value", "POST", C,
        {**NEW, "metadata": {"a": {"b": [1, NUL]}}}, "metadata.a.b[1]"),
    Bad("create_metadata_nested_key", "POST", C,
        {**NEW, "metadata": {"a": [{"ok": 1}, {NUL: 1}]}}, "metadata.a[1]"),
    Bad("create_member_principal", "POST", C,
        {**NEW, "members": [{"principal": "user:a", "role": "member"},
                            {"principal": f"user:{NUL}", "role": "member"}]},
        "members[1].principal"),
    Bad("create_member_role", "POST", C,
        {**NEW, "members": [{"principal": "user:a", "role": NUL}]}, "members[0].role"),
    Bad("create_surrogate_title", "POST", C,
        b'{"conversation": "x", "title": "\\ud800"}', "body"),
    Bad("create_metadata_too_deep", "POST", C,
        {**NEW, "metadata": {"k": _nested(40)}}, "metadata.k" + "[0]" * 31),
    # PATCH /v1/conversations/{c}
    Bad("patch_title", "PATCH", P, {"title": NUL}, "title"),
    Bad("patch_metadata_value", "PATCH", P, {"metadata": {"k": "\u0000"}}, "metadata.k"),
    Bad("patch_metadata_key", "PATCH", P, {"metadata": {"x": {NUL: "v"}}}, "metadata.x"),
    Bad("patch_metadata_list_value", "PATCH", P, {"metadata": {"l": ["ok", NUL]}},
        "metadata.l[1]"),
    # PUT /v1/conversations/{c}/members/{principal}
    Bad("member_role", "PUT", MEMBER, {"role": NUL}, "role"),
    # POST /v1/keys, rotate
    Bad("key_name", "POST", K, {**KEY, "name": NUL}, "name"),
    Bad("key_scope", "POST", K, {**KEY, "scopes": ["read", NUL]}, "scopes[1]"),
    Bad("key_prefix", "POST", K, {**KEY, "conversation_prefix": NUL}, "conversation_prefix"),
    Bad("key_expires_at", "POST", K, {**KEY, "expires_at": f"2999-01-01T00:00:00Z{NUL}"},
        "expires_at"),
    Bad("rotate_grace", "POST", "/v1/keys/{key}/rotate", {"grace": NUL}, "grace"),
    # Publish, receipts
    Bad("publish_type", "POST", M, {**MSG, "type": NUL}, "type"),
    Bad("publish_attachment_name", "POST", M,
        {**MSG, "attachments": [{**GOOD_ATTACHMENT, "name": NUL}]}, "attachments[0].name"),
    Bad("batch_type", "POST", B, {"messages": [MSG, {**MSG, "type": NUL}]}, "messages[1].type"),
    Bad("receipt_type", "POST", R, {"type": NUL, "seq": 1}, "type", user=True),
]  # fmt: skip


@pytest.mark.parametrize("bad", UNSTORABLE, ids=lambda b: b.name)
async def test_unstorable_value_is_400_naming_the_field(ctx: Ctx, bad: Bad) -> None:
    payload = bad.payload
    if isinstance(payload, dict):
        payload = {
            k: unique(v[1:]) if isinstance(v, str) and v.startswith("@") else v
            for k, v in payload.items()
        }
    path = bad.path
    if "{key}" in path:
        victim = await issue_key(ctx.resources, ["read"])
        path = path.replace("{key}", victim[3:15])
    response = await ctx.send(bad.method, path, payload, user=bad.user)
    expect(response, 400, "invalid", bad.field)


async def test_unstorable_patch_changes_nothing(ctx: Ctx) -> None:
    before = (await ctx.send("GET", P)).json()
    refused = await ctx.send("PATCH", P, {"title": "fine", "metadata": {"k": NUL}})
    expect(refused, 400, "invalid", "metadata.k")
    assert (await ctx.send("GET", P)).json() == before


async def test_nul_in_json_text_is_still_a_message_body(ctx: Ctx) -> None:
    """Message bodies live in Redis as the client's bytes: a \u0000 in them is the client's JSON."""
    published = await ctx.publish({"type": "text", "body": {"text": NUL}})
    assert published.status_code == 201, published.text
    seq = published.json()["seq"]
    message = (await ctx.send("GET", f"{ctx.messages}/{seq}")).json()
    assert message["body"] == {"text": NUL}


async def test_nul_in_on_behalf_of_is_refused(ctx: Ctx) -> None:
    headers = bearer(ctx.impersonator, **{"X-On-Behalf-Of": f"user:{NUL}"})
    response = await ctx.api.get(f"/v1/conversations/{ctx.conversation}", headers=headers)
    expect(response, 403, "impersonate_denied", None)


async def test_metadata_at_the_depth_limit_is_stored(ctx: Ctx) -> None:
    deep = {"k": _nested(31)}  # the object itself is level 1
    response = await ctx.send("PATCH", P, {"metadata": deep})
    assert response.status_code == 200, response.text
    assert response.json()["metadata"] == deep


async def test_a_value_postgresql_refuses_is_400_never_500(ctx: Ctx) -> None:
    """The last line of defence: whatever DataError gets past validation maps to 400 invalid."""
    async with ctx.resources.connection() as conn:
        with pytest.raises(psycopg.DataError) as caught:
            await conn.execute("SELECT %s::jsonb", ('{"k": "\\u0000"}',))
    assert isinstance(known(caught.value), Invalid)
    handler = EXCEPTION_HANDLERS[psycopg.DataError]
    response = handler(None, caught.value)  # type: ignore[arg-type]
    assert response.status_code == 400
    assert response.content["error"]["code"] == "invalid"


# Path parameters.

BAD_CONVERSATIONS = {
    "too_long": "c" * 200,
    "space": "a%20b",
    "unicode": "caf%C3%A9",
    "not_utf8": "%FF",
    "star": "a*b",
    "at": "a@b",
    "trailing_newline": "team%0A",
    "nul": "a%00b",
}
PATH_ROUTES = [
    ("GET", "/v1/conversations/{c}", None),
    ("PATCH", "/v1/conversations/{c}", {"title": "t"}),
    ("DELETE", "/v1/conversations/{c}", None),
    ("GET", "/v1/conversations/{c}/members", None),
    ("PUT", "/v1/conversations/{c}/members/user:eve", {"role": "member"}),
    ("DELETE", "/v1/conversations/{c}/members/user:eve", None),
    ("POST", "/v1/conversations/{c}/messages", MSG),
    ("POST", "/v1/conversations/{c}/messages/batch", {"messages": [MSG]}),
    ("GET", "/v1/conversations/{c}/messages", None),
    ("GET", "/v1/conversations/{c}/messages/1", None),
    ("POST", "/v1/conversations/{c}/receipts", {"type": "read", "seq": 1}),
    ("GET", "/v1/conversations/{c}/receipts", None),
    ("GET", "/v1/conversations/{c}/presence", None),
]


def _route_id(route: Any) -> str:
    if isinstance(route, str):
        return route
    method, path, _ = route
    return f"{method}_{path.removeprefix('/v1/conversations/{c}').strip('/') or 'conversation'}"


@pytest.mark.parametrize("route", PATH_ROUTES, ids=_route_id)
@pytest.mark.parametrize("conversation", list(BAD_CONVERSATIONS))
async def test_bad_conversation_in_path(ctx: Ctx, route: Any, conversation: str) -> None:
    method, path, payload = route
    url = path.replace("{c}", BAD_CONVERSATIONS[conversation])
    response = await ctx.api.request(method, url, json=payload, headers=ctx.as_admin)
    expect(response, 400, "invalid", "conversation")


@pytest.mark.parametrize(
    ("seq", "status", "code", "field"),
    [
        ("abc", 400, "invalid", "seq"),
        ("1.5", 400, "invalid", "seq"),
        ("0", 400, "invalid", "seq"),
        ("-1", 400, "invalid", "seq"),
        (str(2**63), 400, "invalid", "seq"),
        ("9" * 30, 400, "invalid", "seq"),
        ("99", 404, "not_found", "seq"),
    ],
)
async def test_bad_seq_in_path(
    ctx: Ctx, seq: str, status: int, code: str, field: str | None
) -> None:
    response = await ctx.send("GET", f"{ctx.messages}/{seq}")
    expect(response, status, code, field)


# Python's int() takes any script's digits, signs, spaces and underscores: none of them is a
# number here (paths, query strings, cursors).
NOT_ASCII_DIGITS = {
    "fullwidth": "%EF%BC%91",  # U+FF11
    "arabic_indic": "%D9%A1",  # U+0661
    "devanagari": "%E0%A5%A7",  # U+0967
    "math_bold": "%F0%9D%9F%8F",  # U+1D7CF
    "superscript": "%C2%B9",  # U+00B9: str.isdigit() is true, int() refuses it
    "plus": "%2B1",
    "minus_zero": "-0",
    "underscore": "1_0",
    "leading_space": "%201",
    "trailing_newline": "1%0A",
    "hex": "0x1",
    "exponent": "1e1",
    "decimal": "1.0",
    "empty": "",
}


@pytest.mark.parametrize("form", list(NOT_ASCII_DIGITS))
async def test_numbers_are_ascii_digits_only(ctx: Ctx, form: str) -> None:
    text = NOT_ASCII_DIGITS[form]
    if text:  # an empty seq is the list route
        expect(await ctx.send("GET", f"{ctx.messages}/{text}"), 400, "invalid", "seq")
    for name in ("before", "after", "limit"):
        response = await ctx.send("GET", f"{ctx.messages}?{name}={text}")
        expect(response, 400, "invalid", name)
    raw = ("b" + urllib.parse.unquote(text)).encode()
    cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    expect(await ctx.send("GET", f"{ctx.messages}?cursor={cursor}"), 400, "invalid", "cursor")


async def test_ascii_digits_with_leading_zeros_are_numbers(ctx: Ctx) -> None:
    one = await ctx.send("GET", f"{ctx.messages}/0001")
    assert one.status_code == 200, one.text
    assert one.json()["seq"] == 1
    page = await ctx.send("GET", f"{ctx.messages}?after=00&limit=007")
    assert [m["seq"] for m in page.json()["messages"]] == [1]


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
@pytest.mark.parametrize(
    "principal",
    ["bob", "user:", "user:a%20b", "group:x", "user:" + "u" * 201, "user:eve%0A", "user:e%00"],
)
async def test_bad_principal_in_path(ctx: Ctx, method: str, principal: str) -> None:
    path = f"/v1/conversations/{ctx.conversation}/members/{principal}"
    response = await ctx.send(method, path, {"role": "member"} if method == "PUT" else None)
    expect(response, 400, "invalid", "principal")


async def test_removing_a_non_member_is_404(ctx: Ctx) -> None:
    response = await ctx.send("DELETE", f"/v1/conversations/{ctx.conversation}/members/user:no")
    expect(response, 404, "not_found", "principal")


@pytest.mark.parametrize("method", ["POST", "DELETE"])
async def test_unknown_key_id_is_404(ctx: Ctx, method: str) -> None:
    path = "/v1/keys/nosuchkey000/rotate" if method == "POST" else "/v1/keys/nosuchkey000"
    expect(await ctx.send(method, path), 404, "not_found", "id")


@pytest.mark.parametrize("key_id", ["ab%00cd", "short", "UPPERCASE000", "nosuchkey000%0A"])
@pytest.mark.parametrize("method", ["POST", "DELETE"])
async def test_malformed_key_id_is_400(ctx: Ctx, method: str, key_id: str) -> None:
    path = f"/v1/keys/{key_id}/rotate" if method == "POST" else f"/v1/keys/{key_id}"
    expect(await ctx.send(method, path), 400, "invalid", "id")


# Conflicts.


async def test_duplicate_conversation_is_409(ctx: Ctx) -> None:
    again = await ctx.send("POST", "/v1/conversations", {"conversation": ctx.conversation})
    expect(again, 409, "conflict", "conversation")


async def test_deleted_conversation_id_is_not_reused(ctx: Ctx) -> None:
    assert (await ctx.send("DELETE", "/v1/conversations/{c}")).status_code == 204
    again = await ctx.send("POST", "/v1/conversations", {"conversation": ctx.conversation})
    expect(again, 409, "conflict", "conversation")


async def test_duplicate_key_name_is_409(ctx: Ctx) -> None:
    spec = {"name": unique("dup"), "scopes": ["read"]}
    assert (await ctx.send("POST", "/v1/keys", spec)).status_code == 201
    expect(await ctx.send("POST", "/v1/keys", spec), 409, "conflict", "name")


# Idempotency-Key.


@pytest.mark.parametrize(
    "value",
    [b"k" * 256, "clé".encode(), "clé".encode("latin-1"), b"a b", b"tab\tkey", b""],
    ids=["too_long", "utf8", "latin1", "space", "control", "empty"],
)
async def test_bad_idempotency_key(ctx: Ctx, value: bytes) -> None:
    response = await ctx.publish(**{"Idempotency-Key": value})
    expect(response, 400, "invalid", "Idempotency-Key")


async def test_idempotency_key_of_255_printable_characters(ctx: Ctx) -> None:
    key = "".join(chr(c) for c in range(0x21, 0x7F)) * 3
    response = await ctx.publish(**{"Idempotency-Key": key[:255]})
    assert response.status_code == 201, response.text


async def test_idempotent_replay_and_conflict(ctx: Ctx) -> None:
    key = {"Idempotency-Key": unique("idem")}
    first = await ctx.publish(**key)
    assert first.status_code == 201, first.text
    replay = await ctx.publish(**key)
    assert replay.status_code == 200, replay.text
    assert replay.json() == first.json()
    assert replay.json()["seq"] == 2
    conflict = await ctx.publish({"type": "text", "body": {"text": "other"}}, **key)
    expect(conflict, 409, "conflict", "Idempotency-Key")
    fresh = await ctx.publish()
    assert fresh.json()["seq"] == 3, "neither the replay nor the conflict took a seq"


async def test_idempotent_batch_replay(ctx: Ctx) -> None:
    key = {"Idempotency-Key": unique("idem")}
    payload = {"messages": [MSG, MSG]}
    first = await ctx.send("POST", f"{ctx.messages}/batch", payload, key)
    assert first.status_code == 201, first.text
    replay = await ctx.send("POST", f"{ctx.messages}/batch", payload, key)
    assert replay.status_code == 200, replay.text
    assert replay.json() == first.json()
    assert [a["seq"] for a in replay.json()["messages"]] == [2, 3]
    conflict = await ctx.send("POST", f"{ctx.messages}/batch", {"messages": [MSG]}, key)
    expect(conflict, 409, "conflict", "Idempotency-Key")


async def test_idempotency_keys_are_per_principal(ctx: Ctx) -> None:
    key = {"Idempotency-Key": unique("idem")}
    mine = await ctx.publish(**key)
    theirs = await ctx.send("POST", ctx.messages, MSG, key, user=True)
    assert (mine.status_code, theirs.status_code) == (201, 201), theirs.text
    assert theirs.json()["seq"] == mine.json()["seq"] + 1


async def test_reply_to_head_is_accepted(ctx: Ctx) -> None:
    response = await ctx.publish({**MSG, "reply_to": 1})
    assert response.status_code == 201, response.text


# History query parameters.


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("before=1&after=2", "after"),
        ("before=1&cursor=YjE", "cursor"),
        ("after=1&cursor=YjE", "cursor"),
        ("cursor=zzz", "cursor"),
        ("cursor=%00", "cursor"),
        ("cursor=%C3%A9", "cursor"),  # not ASCII: base64 refuses it with ValueError
        ("cursor=eDU", "cursor"),  # base64 of "x5": no such direction
        ("cursor=Yi0x", "cursor"),  # "b-1"
        ("cursor=YjEwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAw", "cursor"),  # "b" and a 28-digit seq
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("limit=-1", "limit"),
        ("limit=abc", "limit"),
        ("before=-1", "before"),
        ("before=x", "before"),
        ("before=" + "9" * 30, "before"),
        ("after=" + str(2**63), "after"),
    ],
)
async def test_bad_history_query(ctx: Ctx, query: str, field: str) -> None:
    response = await ctx.send("GET", f"{ctx.messages}?{query}")
    expect(response, 400, "invalid", field)


async def test_history_limits_at_the_edges_are_accepted(ctx: Ctx) -> None:
    for query in ("limit=1", "limit=200", f"before={2**63 - 1}", "after=0"):
        response = await ctx.send("GET", f"{ctx.messages}?{query}")
        assert response.status_code == 200, (query, response.text)


# Rate limit.


async def test_rate_limit_is_429_with_retry_after(
    base_settings: dict[str, Any], migrated: str
) -> None:
    async with app_with(
        # A token per 100 s: no refill can come between the steps, however slow the machine.
        base_settings,
        messages={"rate_per_second": 0.01, "rate_burst": 3, "max_batch": 3},
    ) as app:
        ctx = await make_ctx(*app)  # publishes once as the admin key
        user = [await ctx.send("POST", ctx.messages, MSG, user=True) for _ in range(3)]
        assert [r.status_code for r in user] == [201, 201, 201]
        fourth = await ctx.send("POST", ctx.messages, MSG, user=True)
        expect(fourth, 429, "rate_limited", None)
        assert int(fourth.headers["retry-after"]) >= 1
        # Per principal: the admin key has burst left; a batch costs one token per message and
        # is refused whole (3 needed, 2 left).
        assert (await ctx.publish()).status_code == 201
        batch = await ctx.send("POST", f"{ctx.messages}/batch", {"messages": [MSG] * 3})
        expect(batch, 429, "rate_limited", None)
        too_big = await ctx.send("POST", f"{ctx.messages}/batch", {"messages": [MSG] * 4})
        expect(too_big, 400, "invalid", "messages")
