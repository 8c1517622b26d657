"""Who may call what: every v1 HTTP route against every kind of caller.

One table of routes (method, path, a valid body, the success status, the scope and the least
membership role that grant it) crossed with the callers: no, malformed, unknown, revoked and
expired credentials (401), a key whose scopes do not grant the route and a user who is not a
member (403), and the callers that may (the success status). Then the role rules (reader <
member < owner), the key prefix restriction, unknown conversations (404), impersonation, and the
auth-failure metric. Real PostgreSQL and Redis underneath; each test gets its own keys, users and
conversations.
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from appliance.api.app import create_app
from appliance.auth import keys
from appliance.config import Config
from appliance.invalidation import Invalidation, announce
from appliance.resources import Resources, open_resources
from tests.messaging import bearer, issue_key, unique

Client = AsyncTestClient[Any]
# One app for the module (starting one per test would triple the run time); every test still
# gets its own keys, users and conversations from `world`, so no test sees another's state.
pytestmark = pytest.mark.asyncio(loop_scope="module")
ROLES = ("reader", "member", "owner")


@dataclass(frozen=True)
class Route:
    name: str
    method: str
    # Placeholders: {c} the conversation, {key} a key id, {member} a removable member.
    path: str
    ok: int
    body: dict[str, Any] | None = None
    # A scope that grants the route without membership (None: membership only).
    scope: str | None = None
    # The least role that grants it (None: not a conversation route, roles do not apply).
    role: str | None = None
    # Scopes that do not grant it, and the 403 code such a key gets.
    wrong_scopes: tuple[str, ...] = ()
    wrong_code: str = "not_member"

    @property
    def in_conversation(self) -> bool:
        return "{c}" in self.path


_NOT_ADMIN = ("manage", "publish", "read", "subscribe", "impersonate")
C = "/v1/conversations/{c}"
ROUTES = [
    Route("keys_create", "POST", "/v1/keys", 201, {"name": "@name", "scopes": ["read"]},
          scope="admin", wrong_scopes=_NOT_ADMIN, wrong_code="scope"),
    Route("keys_list", "GET", "/v1/keys", 200,
          scope="admin", wrong_scopes=_NOT_ADMIN, wrong_code="scope"),
    Route("keys_rotate", "POST", "/v1/keys/{key}/rotate", 200,
          scope="admin", wrong_scopes=_NOT_ADMIN, wrong_code="scope"),
    Route("keys_revoke", "DELETE", "/v1/keys/{key}", 200,
          scope="admin", wrong_scopes=_NOT_ADMIN, wrong_code="scope"),
    Route("conversation_create", "POST", "/v1/conversations", 201,
          {"conversation": "@conversation"},
          scope="manage", wrong_scopes=("publish", "read", "subscribe", "impersonate"),
          wrong_code="scope"),
    # `view` is granted by any of read/manage/publish/subscribe: only `impersonate` lacks it.
    Route("conversation_get", "GET", C, 200,
          scope="read", role="reader", wrong_scopes=("impersonate",)),
    Route("conversation_patch", "PATCH", C, 200, {"title": "renamed"},
          scope="manage", role="owner", wrong_scopes=("read", "publish", "subscribe")),
    Route("conversation_delete", "DELETE", C, 204,
          scope="manage", role="owner", wrong_scopes=("read", "publish", "subscribe")),
    Route("members_list", "GET", f"{C}/members", 200,
          scope="subscribe", role="reader", wrong_scopes=("impersonate",)),
    Route("member_put", "PUT", f"{C}/members/user:newcomer", 200, {"role": "member"},
          scope="manage", role="owner", wrong_scopes=("read", "publish", "subscribe")),
    Route("member_delete", "DELETE", f"{C}/members/{{member}}", 204,
          scope="manage", role="owner", wrong_scopes=("read", "publish", "subscribe")),
    Route("publish", "POST", f"{C}/messages", 201, {"type": "text", "body": {"text": "hi"}},
          scope="publish", role="member", wrong_scopes=("read", "subscribe", "manage")),
    Route("publish_batch", "POST", f"{C}/messages/batch", 201,
          {"messages": [{"type": "text", "body": 1}, {"type": "text", "body": 2}]},
          scope="publish", role="member", wrong_scopes=("read", "subscribe", "manage")),
    Route("attachment_create", "POST", f"{C}/attachments", 201,
          {"filename": "a.txt", "content_type": "text/plain", "size": 1},
          scope="publish", role="member", wrong_scopes=("read", "subscribe", "manage")),
    Route("history", "GET", f"{C}/messages", 200,
          scope="read", role="reader", wrong_scopes=("publish", "subscribe", "manage")),
    Route("message", "GET", f"{C}/messages/1", 200,
          scope="read", role="reader", wrong_scopes=("publish", "subscribe", "manage")),
    # Receipts are a member's own marks: no scope grants them, not even admin.
    Route("receipt_post", "POST", f"{C}/receipts", 200, {"type": "read", "seq": 1},
          role="reader", wrong_scopes=("admin",)),
    # Reading them is like reading history: members, or the read scope.
    Route("receipts_get", "GET", f"{C}/receipts", 200,
          scope="read", role="reader", wrong_scopes=("publish", "subscribe", "manage")),
    Route("presence", "GET", f"{C}/presence", 200,
          scope="read", role="reader", wrong_scopes=("publish", "subscribe", "manage")),
]  # fmt: skip
# Routes on an existing conversation (create names its conversation in the body instead).
IN_CONVERSATION = [r for r in ROUTES if r.in_conversation]
ON_CONVERSATIONS = [r for r in ROUTES if r.in_conversation or r.name == "conversation_create"]


@dataclass
class World:
    """One test's callers and conversations: `team-…` and `other-…`, each with an owner, a
    member, a reader and an extra member (removable), and one message (seq 1)."""

    api: Client
    resources: Resources
    admin: str
    impersonator: str
    conversation: str
    other: str
    users: dict[str, str]  # role → user principal
    extra: str
    victim: str  # a key id for the key routes

    def as_user(self, user: str, key: str | None = None) -> dict[str, str]:
        return bearer(key or self.impersonator, **{"X-On-Behalf-Of": user})

    async def key(self, scopes: list[str], prefix: str | None = None) -> str:
        return await issue_key(self.resources, scopes, prefix)

    async def call(
        self, route: Route, headers: dict[str, str], conversation: str | None = None
    ) -> Any:
        conversation = conversation or self.conversation
        path = route.path.format(c=conversation, key=self.victim, member=self.extra)
        body = None
        if route.body is not None:
            fill = {"@name": unique("key"), "@conversation": unique(conversation)}
            body = {k: fill.get(v, v) if isinstance(v, str) else v for k, v in route.body.items()}
        return await self.api.request(route.method, path, json=body, headers=headers)


def key_id(key: str) -> str:
    match = keys.KEY.match(key)
    assert match is not None
    return match["id"]


async def make_conversation(api: Client, admin: str, name: str, members: dict[str, str]) -> None:
    created = await api.post(
        "/v1/conversations",
        json={
            "conversation": name,
            "members": [{"principal": p, "role": r} for p, r in members.items()],
        },
        headers=bearer(admin),
    )
    assert created.status_code == 201, created.text
    first = await api.post(
        f"/v1/conversations/{name}/messages",
        json={"type": "text", "body": {"text": "first"}},
        headers=bearer(admin),
    )
    assert first.status_code == 201, first.text
    assert first.json()["seq"] == 1


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(
    base_settings: dict[str, Any], migrated: str
) -> AsyncIterator[tuple[Client, Resources]]:
    config = Config.model_validate(copy.deepcopy(base_settings))
    async with open_resources(config, "test") as resources:
        await resources.storage.init()
        async with AsyncTestClient(app=create_app(config)) as client:
            yield client, resources


@pytest_asyncio.fixture(loop_scope="module")
async def world(shared: tuple[Client, Resources]) -> World:
    api, resources = shared
    admin = await issue_key(resources, ["admin"])
    tag = uuid.uuid4().hex[:8]
    users = {role: f"user:{role}-{tag}" for role in ROLES}
    extra = f"user:extra-{tag}"
    members = {**{user: role for role, user in users.items()}, extra: "member"}
    conversation, other = unique("team"), unique("other")
    for name in (conversation, other):
        await make_conversation(api, admin, name, members)
    return World(
        api=api,
        resources=resources,
        admin=admin,
        impersonator=await issue_key(resources, ["impersonate"]),
        conversation=conversation,
        other=other,
        users=users,
        extra=extra,
        victim=key_id(await issue_key(resources, ["read"])),
    )


async def auth_failures(api: Client, reason: str) -> float:
    """`appliance_auth_failures_total{reason=…}` as `/metrics` shows it."""
    response = await api.get("/metrics")
    assert response.status_code == 200
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "appliance_auth_failures_total" and sample.labels == {
                "reason": reason
            }:
                return float(sample.value)
    return 0.0


async def assert_refused(
    world: World, route: Route, headers: dict[str, str], status: int, code: str, **kw: Any
) -> None:
    """The route refuses with `status`/`code`, carries the right headers and counts the reason."""
    before = await auth_failures(world.api, code)
    response = await world.call(route, headers, **kw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["field"] is None
    assert error["message"]
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"
    else:
        assert "www-authenticate" not in response.headers
    assert await auth_failures(world.api, code) == before + 1


# The matrix: every route x every kind of caller.


async def _revoked(world: World) -> dict[str, str]:
    key = await world.key(["admin"])
    async with world.resources.connection() as conn:
        await keys.revoke(conn, key_id(key))
    await announce(world.resources.redis, world.resources.keys, Invalidation("key", key_id(key)))
    return bearer(key)


async def _expired(world: World) -> dict[str, str]:
    key = await world.key(["admin"])
    async with world.resources.connection() as conn:
        await conn.execute(
            "UPDATE api_keys SET expires_at = now() - interval '1 minute' WHERE id = %s",
            (key_id(key),),
        )
    await announce(world.resources.redis, world.resources.keys, Invalidation("key", key_id(key)))
    return bearer(key)


UNAUTHENTICATED = {
    "no_credentials": "missing_credentials",
    "basic_scheme": "malformed_credentials",
    "short_key": "malformed_credentials",
    "bearer_without_token": "malformed_credentials",
    "unknown_key": "invalid_key",
    "revoked_key": "key_revoked",
    "expired_key": "key_expired",
}


async def _unauthenticated_headers(world: World, case: str) -> dict[str, str]:
    match case:
        case "no_credentials":
            return {}
        case "basic_scheme":
            return {"Authorization": "Basic x"}
        case "short_key":
            return bearer("ak_short")
        case "bearer_without_token":
            return {"Authorization": "Bearer "}
        case "unknown_key":
            return bearer("ak_" + "0" * 12 + "_" + "A" * 43)
        case "revoked_key":
            return await _revoked(world)
        case "expired_key":
            return await _expired(world)
    raise AssertionError(case)


@pytest.mark.parametrize("case", list(UNAUTHENTICATED))
@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
async def test_unauthenticated_is_401(world: World, route: Route, case: str) -> None:
    headers = await _unauthenticated_headers(world, case)
    await assert_refused(world, route, headers, 401, UNAUTHENTICATED[case])


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
async def test_wrong_scope_is_403(world: World, route: Route) -> None:
    key = await world.key(list(route.wrong_scopes))
    await assert_refused(world, route, bearer(key), 403, route.wrong_code)


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
async def test_non_member_user_is_403(world: World, route: Route) -> None:
    """A user has no scopes: key routes and create need one; the rest need membership."""
    stranger = world.as_user(f"user:stranger-{uuid.uuid4().hex[:8]}")
    code = "not_member" if route.in_conversation else "scope"
    await assert_refused(world, route, stranger, 403, code)


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
async def test_allowed_caller_succeeds(world: World, route: Route) -> None:
    """The least role (as a user) where roles apply, otherwise a key with the route's scope."""
    if route.role is not None:
        headers = world.as_user(world.users[route.role])
    else:
        assert route.scope is not None
        headers = bearer(await world.key([route.scope]))
    response = await world.call(route, headers)
    assert response.status_code == route.ok, response.text


@pytest.mark.parametrize(
    "route", [r for r in IN_CONVERSATION if r.scope is not None], ids=lambda r: r.name
)
async def test_scoped_key_succeeds_without_membership(world: World, route: Route) -> None:
    assert route.scope is not None
    response = await world.call(route, bearer(await world.key([route.scope])))
    assert response.status_code == route.ok, response.text


@pytest.mark.parametrize("route", ON_CONVERSATIONS, ids=lambda r: r.name)
async def test_admin_key_succeeds(world: World, route: Route) -> None:
    """`admin` implies manage, publish, read and subscribe (receipts still need membership)."""
    response = await world.call(route, bearer(world.admin))
    if route.scope is None:
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "not_member"
    else:
        assert response.status_code == route.ok, response.text


# Roles: reader < member < owner.


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("route", IN_CONVERSATION, ids=lambda r: r.name)
async def test_role_rules(world: World, route: Route, role: str) -> None:
    assert route.role is not None
    response = await world.call(route, world.as_user(world.users[role]))
    if ROLES.index(role) >= ROLES.index(route.role):
        assert response.status_code == route.ok, response.text
    else:
        assert response.status_code == 403, response.text
        error = response.json()["error"]
        assert (error["code"], error["field"]) == ("role", None)


async def test_removed_member_is_refused_at_once(world: World) -> None:
    member = world.as_user(world.users["member"])
    publish = next(r for r in ROUTES if r.name == "publish")
    assert (await world.call(publish, member)).status_code == 201
    removed = await world.api.delete(
        f"/v1/conversations/{world.conversation}/members/{world.users['member']}",
        headers=bearer(world.admin),
    )
    assert removed.status_code == 204, removed.text
    await assert_refused(world, publish, member, 403, "not_member")


async def test_demoted_member_is_refused_at_once(world: World) -> None:
    member = world.as_user(world.users["member"])
    publish = next(r for r in ROUTES if r.name == "publish")
    assert (await world.call(publish, member)).status_code == 201
    demoted = await world.api.put(
        f"/v1/conversations/{world.conversation}/members/{world.users['member']}",
        json={"role": "reader"},
        headers=bearer(world.admin),
    )
    assert demoted.status_code == 200, demoted.text
    await assert_refused(world, publish, member, 403, "role")


# Key prefix restriction.


@pytest.mark.parametrize("route", ON_CONVERSATIONS, ids=lambda r: r.name)
async def test_prefix_key_outside_its_prefix_is_403(world: World, route: Route) -> None:
    # Every scope a prefix may go with (admin may not: test_keys).
    key = await world.key(["manage", "publish", "read", "subscribe"], prefix="team-")
    await assert_refused(world, route, bearer(key), 403, "prefix", conversation=world.other)


@pytest.mark.parametrize(
    "route", [r for r in ON_CONVERSATIONS if r.scope is not None], ids=lambda r: r.name
)
async def test_prefix_key_inside_its_prefix_succeeds(world: World, route: Route) -> None:
    assert route.scope is not None
    key = await world.key([route.scope], prefix="team-")
    response = await world.call(route, bearer(key))
    assert response.status_code == route.ok, response.text


@pytest.mark.parametrize("route", IN_CONVERSATION, ids=lambda r: r.name)
async def test_prefix_also_binds_impersonated_users(world: World, route: Route) -> None:
    """An owner of `other-…` acting through a `team-` key is still limited to `team-…`."""
    limited = await world.key(["impersonate"], prefix="team-")
    owner = world.as_user(world.users["owner"], key=limited)
    await assert_refused(world, route, owner, 403, "prefix", conversation=world.other)


# Unknown conversations.


@pytest.mark.parametrize("route", IN_CONVERSATION, ids=lambda r: r.name)
async def test_unknown_conversation_is_404(world: World, route: Route) -> None:
    response = await world.call(route, bearer(world.admin), conversation=unique("team-gone"))
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("not_found", "conversation")


@pytest.mark.parametrize("route", IN_CONVERSATION, ids=lambda r: r.name)
async def test_deleted_conversation_is_404(world: World, route: Route) -> None:
    deleted = await world.api.delete(
        f"/v1/conversations/{world.conversation}", headers=bearer(world.admin)
    )
    assert deleted.status_code == 204, deleted.text
    response = await world.call(route, bearer(world.admin))
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "not_found"


# Impersonation and credential edge cases.


async def test_on_behalf_of_needs_impersonate(world: World) -> None:
    get = next(r for r in ROUTES if r.name == "conversation_get")
    headers = bearer(world.admin, **{"X-On-Behalf-Of": world.users["owner"]})
    await assert_refused(world, get, headers, 403, "impersonate_denied")


@pytest.mark.parametrize("on_behalf_of", ["key:someone", "alice", "user:", "user:a b"])
async def test_on_behalf_of_must_name_a_user(world: World, on_behalf_of: str) -> None:
    get = next(r for r in ROUTES if r.name == "conversation_get")
    headers = bearer(world.impersonator, **{"X-On-Behalf-Of": on_behalf_of})
    await assert_refused(world, get, headers, 403, "impersonate_denied")


async def test_impersonated_user_has_no_scopes_of_the_key(world: World) -> None:
    """`impersonate` next to `admin` on the key: the user still acts with membership only."""
    both = await world.key(["admin", "impersonate"])
    keys_list = next(r for r in ROUTES if r.name == "keys_list")
    stranger = world.as_user("user:nobody", key=both)
    await assert_refused(world, keys_list, stranger, 403, "scope")


async def test_wrong_secret_of_a_real_key_is_401(world: World) -> None:
    real = world.admin
    forged = real[:-1] + ("A" if real[-1] != "A" else "B")
    keys_list = next(r for r in ROUTES if r.name == "keys_list")
    await assert_refused(world, keys_list, bearer(forged), 401, "invalid_key")


async def test_revocation_takes_effect_before_the_cache_expires(world: World) -> None:
    """A cached key is dropped on every process when revocation is announced (10 s at most
    here: a deadline against hanging, far below the 30 s key cache TTL)."""
    key = await world.key(["admin"])
    assert (await world.api.get("/v1/keys", headers=bearer(key))).status_code == 200
    revoked = await world.api.delete(f"/v1/keys/{key_id(key)}", headers=bearer(world.admin))
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revoked_at"] is not None
    deadline = asyncio.get_running_loop().time() + 10
    while (response := await world.api.get("/v1/keys", headers=bearer(key))).status_code != 401:
        assert asyncio.get_running_loop().time() < deadline, response.text
        await asyncio.sleep(0.05)
    assert response.json()["error"]["code"] == "key_revoked"
    assert response.headers["www-authenticate"] == "Bearer"


async def test_probes_need_no_credentials(world: World) -> None:
    assert (await world.api.get("/livez")).status_code == 200
    assert (await world.api.get("/metrics")).status_code == 200
