"""API keys end to end: HTTP and CLI issue them, rotation has a grace period, revocation reaches
every api process at once, last_used_at is written in batches."""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import psycopg
import pytest
from litestar.testing import AsyncTestClient

from appliance.api.app import create_app
from appliance.auth import keys
from appliance.auth.authenticate import Authenticator
from appliance.config import Config
from appliance.resources import Resources
from tests.messaging import bearer, issue_key, unique
from tests.support import free_port, write_toml
from tests.test_cli import cli

Client = AsyncTestClient[Any]


def key_id(key: str) -> str:
    return key.split("_")[1]


async def until(condition: Any, what: str, timeout: float = 10.0) -> Any:
    """Poll an async condition (no timing assertion: the timeout only prevents a hang)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await condition()
        if result:
            return result
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_create_shows_the_key_once_and_stores_only_a_hash(
    api: Client, resources: Resources
) -> None:
    admin = await issue_key(resources, ["admin"])
    name = unique("app")
    response = await api.post(
        "/v1/keys",
        json={"name": name, "scopes": ["publish", "read"], "conversation_prefix": "team-"},
        headers=bearer(admin),
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["key"].startswith(f"ak_{created['id']}_")
    assert created["principal"] == f"key:{name}"
    assert created["scopes"] == ["publish", "read"]
    secret = created["key"].split("_", 2)[2]
    async with resources.connection() as conn:
        cur = await conn.execute("SELECT secret_hash FROM api_keys WHERE id = %s", (created["id"],))
        row = await cur.fetchone()
    assert row is not None and bytes(row[0]) == hashlib.sha256(secret.encode()).digest()
    listed = (await api.get("/v1/keys", headers=bearer(admin))).json()["keys"]
    mine = [k for k in listed if k["id"] == created["id"]]
    assert len(mine) == 1 and "key" not in mine[0] and mine[0]["conversation_prefix"] == "team-"


async def test_the_new_key_works_and_acts_as_its_name(api: Client, resources: Resources) -> None:
    admin = await issue_key(resources, ["admin"])
    name = unique("app")
    created = (
        await api.post("/v1/keys", json={"name": name, "scopes": ["manage"]}, headers=bearer(admin))
    ).json()
    conversation = unique("c")
    response = await api.post(
        "/v1/conversations", json={"conversation": conversation}, headers=bearer(created["key"])
    )
    assert response.status_code == 201
    assert response.json()["created_by"] == f"key:{name}"


async def test_rotation_keeps_the_old_secret_for_the_grace_period(
    api: Client, resources: Resources
) -> None:
    admin = await issue_key(resources, ["admin"])
    old = await issue_key(resources, ["admin"])
    rotated = await api.post(
        f"/v1/keys/{key_id(old)}/rotate", json={"grace": 60}, headers=bearer(admin)
    )
    assert rotated.status_code == 200
    new = rotated.json()["key"]
    assert new != old and key_id(new) == key_id(old)
    for key in (old, new):
        assert (await api.get("/v1/keys", headers=bearer(key))).status_code == 200
    # A rotation with no grace ends the old secret at once.
    again = await api.post(
        f"/v1/keys/{key_id(new)}/rotate", json={"grace": 0}, headers=bearer(admin)
    )
    newest = again.json()["key"]
    assert (await api.get("/v1/keys", headers=bearer(new))).status_code == 401
    assert (await api.get("/v1/keys", headers=bearer(old))).status_code == 401
    assert (await api.get("/v1/keys", headers=bearer(newest))).status_code == 200


async def test_revocation_reaches_another_api_process_at_once(
    config: Config, resources: Resources
) -> None:
    """Two apps (two api processes' worth of caches and hubs): revoke through one, the other
    refuses the key as soon as the invalidation arrives, long before its cache would expire."""
    assert config.auth.key_cache_ttl >= 30
    admin = await issue_key(resources, ["admin"])
    victim = await issue_key(resources, ["read"])
    async with (
        AsyncTestClient(app=create_app(config)) as one,
        AsyncTestClient(app=create_app(config)) as two,
    ):
        conversation = unique("c")
        await one.post(
            "/v1/conversations", json={"conversation": conversation}, headers=bearer(admin)
        )
        path = f"/v1/conversations/{conversation}/messages"
        assert (await two.get(path, headers=bearer(victim))).status_code == 200  # now cached
        revoked = await one.delete(f"/v1/keys/{key_id(victim)}", headers=bearer(admin))
        assert revoked.status_code == 200 and revoked.json()["revoked_at"]

        async def refused() -> bool:
            response = await two.get(path, headers=bearer(victim))
            return response.status_code == 401 and response.json()["error"]["code"] == "key_revoked"

        # A deadline, not a bound on the delay: far below the 30 s cache TTL, so only the
        # invalidation can have made the second process refuse the key.
        await until(refused, "the revocation to reach the second process", timeout=10.0)


async def last_used(resources: Resources, key: str) -> Any:
    async with resources.connection() as conn:
        cur = await conn.execute("SELECT last_used_at FROM api_keys WHERE id = %s", (key_id(key),))
        row = await cur.fetchone()
    return row and row[0]


async def test_last_used_is_written_in_batches_not_per_request(
    settings: dict[str, Any], resources: Resources
) -> None:
    settings["auth"] = {"last_used_interval": 3600}
    key = await issue_key(resources, ["read"])
    async with AsyncTestClient(app=create_app(Config.model_validate(settings))) as client:
        for _ in range(5):
            assert (await client.get("/v1/keys", headers=bearer(key))).status_code == 403
        last = datetime.now(UTC)
        assert await last_used(resources, key) is None  # five uses, no write: it waits
    # The api's shutdown writes the pending batch: the time of the last use.
    written = await last_used(resources, key)
    assert written is not None and written <= last


async def test_last_used_batches_are_written_every_interval(
    settings: dict[str, Any], resources: Resources
) -> None:
    settings["auth"] = {"last_used_interval": 0.2}
    key = await issue_key(resources, ["read"])
    async with AsyncTestClient(app=create_app(Config.model_validate(settings))) as client:
        assert (await client.get("/v1/keys", headers=bearer(key))).status_code == 403
        assert await until(lambda: last_used(resources, key), "last_used_at")


async def test_an_expired_key_is_refused(api: Client, resources: Resources) -> None:
    key = await issue_key(resources, ["admin"])
    async with resources.connection() as conn:
        await conn.execute(
            "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = %s",
            (key_id(key),),
        )
    response = await api.get("/v1/keys", headers=bearer(key))
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "key_expired"


async def test_unknown_and_wrong_secret_are_the_same_401(api: Client, resources: Resources) -> None:
    key = await issue_key(resources, ["admin"])
    wrong = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    unknown = "ak_000000000000_" + key.split("_", 2)[2]
    for candidate in (wrong, unknown):
        response = await api.get("/v1/keys", headers=bearer(candidate))
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_key"


def test_cli_bootstraps_lists_rotates_and_revokes(
    settings: dict[str, Any], migrated: str, tmp_path: Path
) -> None:
    config = write_toml(tmp_path / "c.toml", settings)
    name = unique("boot")
    done = cli(config, "keys", "create", "--name", name, "--scope", "admin", "--scope", "read",
               "--expires-in", "30d", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    created = json.loads(done.stdout)
    assert created["key"].startswith(f"ak_{created['id']}_")
    assert created["scopes"] == ["admin", "read"] and created["expires_at"]
    assert created["key"] not in done.stderr

    listed = cli(config, "keys", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    entry = next(k for k in json.loads(listed.stdout) if k["id"] == created["id"])
    assert "key" not in entry

    rotated = cli(config, "keys", "rotate", created["id"], "--grace", "1h", "--json")
    assert rotated.returncode == 0, rotated.stderr
    assert json.loads(rotated.stdout)["key"] != created["key"]

    revoked = cli(config, "keys", "revoke", created["id"], "--json")
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout)["revoked_at"]

    with psycopg.connect(migrated) as conn:
        row = conn.execute(
            "SELECT revoked_at IS NOT NULL, previous_expires_at > now()"
            " FROM api_keys WHERE id = %s",
            (created["id"],),
        ).fetchone()
    assert row == (True, True)


def test_cli_names_the_problem(settings: dict[str, Any], migrated: str, tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", settings)
    bad_scope = cli(config, "keys", "create", "--name", "x", "--scope", "root")
    assert bad_scope.returncode == 2 and "--scope" in bad_scope.stderr
    bad_name = cli(config, "keys", "create", "--name", "has space", "--scope", "read")
    assert bad_name.returncode == 2 and "name" in bad_name.stderr
    name = unique("dup")
    assert cli(config, "keys", "create", "--name", name, "--scope", "read").returncode == 0
    duplicate = cli(config, "keys", "create", "--name", name, "--scope", "read")
    assert duplicate.returncode == 1 and "exists" in duplicate.stderr
    missing = cli(config, "keys", "revoke", "nosuchkey000")
    assert missing.returncode == 1 and "no key" in missing.stderr
    bad_duration = cli(config, "keys", "create", "--name", unique("d"), "--scope", "read",
                       "--expires-in", "soon")  # fmt: skip
    assert bad_duration.returncode == 2 and "--expires-in" in bad_duration.stderr
    created = json.loads(cli(config, "keys", "create", "--name", unique("g"), "--scope", "read",
                             "--json").stdout)  # fmt: skip
    too_long = cli(config, "keys", "rotate", created["id"], "--grace", "91d")
    assert too_long.returncode == 2 and "grace" in too_long.stderr  # the HTTP API's bound
    malformed = cli(config, "keys", "revoke", "ab\x01cd")
    assert malformed.returncode == 1 and "12 characters" in malformed.stderr


def test_cli_rotation_with_redis_down_still_prints_the_new_key(
    settings: dict[str, Any], migrated: str, tmp_path: Path
) -> None:
    """The rotation is committed before it is announced: losing the announcement must not lose
    the only copy of the new secret (a retry would end the old one at once)."""
    config = write_toml(tmp_path / "c.toml", settings)
    created = json.loads(cli(config, "keys", "create", "--name", unique("r"), "--scope", "read",
                             "--json").stdout)  # fmt: skip
    settings["redis"] = {**settings["redis"], "url": f"redis://127.0.0.1:{free_port()}/0",
                         "connect_timeout": 0.5}  # fmt: skip
    no_redis = write_toml(tmp_path / "no-redis.toml", settings)
    rotated = cli(no_redis, "keys", "rotate", created["id"], "--grace", "1h", "--json")
    assert rotated.returncode == 0, rotated.stderr
    assert json.loads(rotated.stdout)["key"].startswith(f"ak_{created['id']}_")
    assert "Redis did not answer" in rotated.stderr and "key_cache_ttl" in rotated.stderr


async def test_an_admin_key_cannot_be_limited_to_a_prefix(
    api: Client, resources: Resources, settings: dict[str, Any], tmp_path: Path
) -> None:
    """An admin manages every key: a prefix-limited admin could mint unlimited keys."""
    admin = await issue_key(resources, ["admin"])
    response = await api.post(
        "/v1/keys",
        json={"name": unique("k"), "scopes": ["read", "admin"], "conversation_prefix": "t1:"},
        headers=bearer(admin),
    )
    assert response.status_code == 400
    assert response.json()["error"] == {
        "code": "invalid",
        "message": "cannot be combined with the admin scope",
        "field": "conversation_prefix",
    }
    config = write_toml(tmp_path / "c.toml", settings)
    refused = cli(config, "keys", "create", "--name", unique("k"), "--scope", "admin",
                  "--prefix", "t1:")  # fmt: skip
    assert refused.returncode == 1
    assert "conversation_prefix: cannot be combined with the admin scope" in refused.stderr
    limited = await api.post(
        "/v1/keys",
        json={"name": unique("k"), "scopes": ["manage"], "conversation_prefix": "t1:"},
        headers=bearer(admin),
    )
    assert limited.status_code == 201


async def test_the_principal_carries_when_its_credential_ends(
    config: Config, resources: Resources
) -> None:
    """What a long-lived WebSocket is closed at: the key's expiry, or the end of the grace of
    a rotated secret, whichever comes first."""
    auth = Authenticator(config, resources.connection)
    plain = await issue_key(resources, ["read"])
    assert (await auth.authenticate(f"Bearer {plain}", None, None)).expires_at is None
    expiring = await issue_key(resources, ["read"])
    async with resources.connection() as conn:
        ends = await (
            await conn.execute(
                "UPDATE api_keys SET expires_at = now() + interval '1 hour' WHERE id = %s"
                " RETURNING expires_at",
                (key_id(expiring),),
            )
        ).fetchone()
        assert ends is not None
        rotated = await keys.rotate(conn, key_id(expiring), grace=60)
        grace = rotated.previous_expires_at
    assert grace is not None
    auth.forget(key_id(expiring))
    old = await auth.authenticate(f"Bearer {expiring}", None, None)
    new = await auth.authenticate(f"Bearer {rotated.key}", None, None)
    assert old.expires_at == grace.timestamp()
    assert new.expires_at == ends[0].timestamp()
    impersonator = await issue_key(resources, ["impersonate"])
    async with resources.connection() as conn:
        await conn.execute(
            "UPDATE api_keys SET expires_at = now() + interval '1 minute' WHERE id = %s",
            (key_id(impersonator),),
        )
    acting = await auth.authenticate(f"Bearer {impersonator}", None, "user:dave")
    assert acting.id == "user:dave" and acting.expires_at is not None


async def test_a_key_without_scopes_acts_only_as_a_member(
    api: Client, resources: Resources
) -> None:
    """A scope-less key is a pure member: it reads and publishes where it is a member, and
    nothing else (no other conversation, no scope-guarded route)."""
    admin = await issue_key(resources, ["admin"])
    name = unique("member")
    created = await api.post("/v1/keys", json={"name": name, "scopes": []}, headers=bearer(admin))
    assert created.status_code == 201, created.text
    assert created.json()["scopes"] == []
    member = created.json()["key"]
    mine, other = unique("c"), unique("c")
    for conversation, members in ((mine, [{"principal": f"key:{name}", "role": "member"}]),
                                  (other, [])):  # fmt: skip
        made = await api.post(
            "/v1/conversations",
            json={"conversation": conversation, "members": members},
            headers=bearer(admin),
        )
        assert made.status_code == 201, made.text
    published = await api.post(
        f"/v1/conversations/{mine}/messages",
        json={"type": "text", "body": {"text": "hi"}},
        headers=bearer(member),
    )
    assert published.status_code == 201, published.text
    page = await api.get(f"/v1/conversations/{mine}/messages", headers=bearer(member))
    assert page.status_code == 200
    assert [m["sender"] for m in page.json()["messages"]] == [f"key:{name}"]
    receipt = await api.post(
        f"/v1/conversations/{mine}/receipts",
        json={"type": "read", "seq": 1},
        headers=bearer(member),
    )
    assert receipt.status_code == 200, receipt.text
    # Nothing outside its membership.
    for method, path, body in (
        ("POST", f"/v1/conversations/{other}/messages", {"type": "text", "body": {}}),
        ("GET", f"/v1/conversations/{other}/messages", None),
        ("GET", f"/v1/conversations/{other}", None),
    ):
        refused = await api.request(method, path, json=body, headers=bearer(member))
        assert refused.status_code == 403, (path, refused.text)
        assert refused.json()["error"]["code"] == "not_member"
    for method, path, body in (
        ("POST", "/v1/conversations", {"conversation": unique("c")}),
        ("GET", "/v1/keys", None),
        ("PATCH", f"/v1/conversations/{mine}", {"title": "x"}),
    ):
        refused = await api.request(method, path, json=body, headers=bearer(member))
        assert refused.status_code == 403, (path, refused.text)
        assert refused.json()["error"]["code"] in {"scope", "role"}


def test_cli_creates_a_key_without_scopes(
    settings: dict[str, Any], migrated: str, tmp_path: Path
) -> None:
    config = write_toml(tmp_path / "c.toml", settings)
    done = cli(config, "keys", "create", "--name", unique("m"), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["scopes"] == []
    text = cli(config, "keys", "create", "--name", unique("m"))
    assert text.returncode == 0, text.stderr
    assert "acts only in conversations it is a member of" in text.stderr


# full-width, Arabic-Indic and superscript digits
@pytest.mark.parametrize("text", ["\uff11d", "\u0663h", "1.\uff15", "\u00b2s"])
def test_cli_durations_are_ascii_digits_only(text: str) -> None:
    from appliance.cli.keys_cmd import seconds

    with pytest.raises(click.BadParameter):
        seconds(text, "--expires-in")
    assert seconds("1.5h", "--expires-in") == 5400
