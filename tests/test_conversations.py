"""Conversations and membership with OIDC users end to end: a real issuer (discovery + JWKS over
HTTP), the full app, roles enforced on every route, changes seen by every api process at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from litestar.testing import AsyncTestClient

from appliance.api.app import create_app
from appliance.config import Config
from appliance.resources import Resources
from tests.messaging import body, unique
from tests.test_oidc import Issuer, sign

Client = AsyncTestClient[Any]


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def issuer(signing_key: rsa.RSAPrivateKey) -> Iterator[Issuer]:
    server = Issuer()
    server.publish((signing_key, "k1"))
    yield server
    server.stop()


@pytest.fixture
def oidc_config(settings: dict[str, Any], issuer: Issuer) -> Config:
    settings["oidc"] = {
        "enabled": True,
        "issuer": issuer.url,
        "audience": "appliance",
        "roles_claim": "realm_access.roles",
    }
    return Config.model_validate(settings)


@pytest.fixture
async def app(oidc_config: Config, resources: Resources) -> AsyncIterator[Client]:
    async with AsyncTestClient(app=create_app(oidc_config)) as client:
        yield client


class Users:
    def __init__(self, issuer: Issuer, key: rsa.RSAPrivateKey) -> None:
        self.issuer, self.key = issuer, key

    def __call__(self, user: str, *roles: str) -> dict[str, str]:
        token = sign(self.issuer, self.key, "k1", sub=user, aud="appliance",
                     realm_access={"roles": list(roles)})  # fmt: skip
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def as_user(issuer: Issuer, signing_key: rsa.RSAPrivateKey) -> Users:
    return Users(issuer, signing_key)


async def test_roles_owner_member_reader(app: Client, as_user: Users) -> None:
    conversation = unique("team")
    alice, bob, carol = as_user("alice", "manage"), as_user("bob"), as_user("carol")
    created = await app.post(
        "/v1/conversations",
        json={"conversation": conversation, "title": "Team",
              "members": [{"principal": "user:bob", "role": "member"},
                          {"principal": "user:carol", "role": "reader"}]},
        headers=alice,
    )  # fmt: skip
    assert created.status_code == 201, created.text
    roles = {m["principal"]: m["role"] for m in created.json()["members"]}
    assert roles == {"user:alice": "owner", "user:bob": "member", "user:carol": "reader"}

    path = f"/v1/conversations/{conversation}"
    sent = await app.post(f"{path}/messages", json=body(), headers=bob)
    assert sent.status_code == 201
    message = (await app.get(f"{path}/messages/1", headers=carol)).json()
    assert message["sender"] == "user:bob"
    refused = await app.post(f"{path}/messages", json=body(), headers=carol)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "role"
    assert (await app.patch(path, json={"title": "x"}, headers=bob)).status_code == 403
    patched = await app.patch(path, json={"title": "Renamed", "metadata": {"a": 1}}, headers=alice)
    assert patched.status_code == 200 and patched.json()["title"] == "Renamed"
    assert (await app.get(path, headers=carol)).json()["metadata"] == {"a": 1}
    stranger = await app.get(path, headers=as_user("mallory"))
    assert stranger.status_code == 403 and stranger.json()["error"]["code"] == "not_member"


async def test_membership_changes_apply_on_every_process_at_once(
    oidc_config: Config, resources: Resources, as_user: Users
) -> None:
    conversation = unique("team")
    alice, dave = as_user("alice", "manage"), as_user("dave")
    async with (
        AsyncTestClient(app=create_app(oidc_config)) as one,
        AsyncTestClient(app=create_app(oidc_config)) as two,
    ):
        await one.post("/v1/conversations", json={"conversation": conversation}, headers=alice)
        path = f"/v1/conversations/{conversation}"
        assert (await two.get(path, headers=dave)).status_code == 403  # cached: not a member
        put = await one.put(f"{path}/members/user:dave", json={"role": "member"}, headers=alice)
        assert put.status_code == 200 and put.json()["role"] == "member"
        await eventually(two, f"{path}/messages", dave, 200)
        members = (await two.get(f"{path}/members", headers=dave)).json()["members"]
        assert {m["principal"] for m in members} == {"user:alice", "user:dave"}
        removed = await one.delete(f"{path}/members/user:dave", headers=alice)
        assert removed.status_code == 204
        await eventually(two, f"{path}/messages", dave, 403)
        again = await one.delete(f"{path}/members/user:dave", headers=alice)
        assert again.status_code == 404 and again.json()["error"]["field"] == "principal"


async def eventually(client: Client, path: str, headers: dict[str, str], status: int) -> None:
    """Poll until `path` answers `status`, for at most 10 s: a deadline, not a bound on the
    delay, and far below the 30 s cache TTLs, so only the invalidation can have changed it."""
    deadline = asyncio.get_running_loop().time() + 10.0
    while (await client.get(path, headers=headers)).status_code != status:
        assert asyncio.get_running_loop().time() < deadline, f"{path} never answered {status}"
        await asyncio.sleep(0.02)


async def test_owner_deletes_and_member_cannot(app: Client, as_user: Users) -> None:
    conversation = unique("team")
    alice, bob = as_user("alice", "manage"), as_user("bob")
    await app.post(
        "/v1/conversations",
        json={
            "conversation": conversation,
            "members": [{"principal": "user:bob", "role": "owner"}],
        },
        headers=alice,
    )
    path = f"/v1/conversations/{conversation}"
    await app.put(f"{path}/members/user:bob", json={"role": "member"}, headers=alice)
    assert (await app.delete(path, headers=bob)).status_code == 403
    assert (await app.delete(path, headers=alice)).status_code == 204
    gone = await app.get(path, headers=alice)
    assert gone.status_code == 404 and gone.json()["error"]["field"] == "conversation"


async def test_user_tokens_fail_with_reasons(app: Client, as_user: Users, issuer: Issuer) -> None:
    expired = sign(issuer, as_user.key, "k1", aud="appliance", exp=1)
    response = await app.get("/v1/conversations/x", headers={"Authorization": f"Bearer {expired}"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "token_expired"
    wrong = sign(issuer, as_user.key, "k1", aud="someone-else")
    response = await app.get("/v1/conversations/x", headers={"Authorization": f"Bearer {wrong}"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "token_audience"
    text = (await app.get("/metrics")).text
    assert 'appliance_auth_failures_total{reason="token_expired"}' in text


async def test_issuer_roles_grant_scopes_but_never_admin(app: Client, as_user: Users) -> None:
    """Issuers often have an "admin" role of their own: it does not make a user an admin here
    (keys are managed with admin keys), while a "read" role reads every conversation."""
    owner = as_user("olga", "manage")
    conversation = unique("team")
    created = await app.post("/v1/conversations", json={"conversation": conversation},
                             headers=owner)  # fmt: skip
    assert created.status_code == 201
    boss = as_user("root", "admin")
    refused = await app.get("/v1/keys", headers=boss)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "scope"
    not_member = await app.get(f"/v1/conversations/{conversation}/messages", headers=boss)
    assert not_member.status_code == 403
    reader = await app.get(f"/v1/conversations/{conversation}/messages",
                           headers=as_user("auditor", "read"))  # fmt: skip
    assert reader.status_code == 200
