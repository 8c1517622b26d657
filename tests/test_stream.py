"""`/v1/stream` end to end: a real WebSocket client against a real granian process.

One api process (started once for the module) serves most tests; the slow-consumer and the Redis
fault tests start their own with different settings. Publishes go over HTTP, as applications
send them. Receives carry generous timeouts only so a broken build fails instead of hanging;
nothing here asserts on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import socket
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.api_process import ApiProcess, admin_key, api_settings
from tests.messaging import unique

pytestmark = pytest.mark.process

TIMEOUT = 10.0  # per receive: only so that a failure does not hang the run
# Every wait for an event has an overall deadline too: the server pings every second, so a
# read that skips noise would otherwise wait forever for a frame that never comes.
WAIT = 30.0
NOISE = frozenset({"ping", "presence", "receipt"})
Frame = dict[str, Any]
UNKNOWN_KEY = "ak_" + "0" * 12 + "_" + "s" * 43  # well-formed, never issued


# -- processes and clients -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(
    base_settings: dict[str, Any], migrated: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiProcess]:
    """The shared api process; server pings every second so tests see them interleaved."""
    directory = tmp_path_factory.mktemp("stream-api")
    settings = api_settings(
        copy.deepcopy(base_settings), directory, realtime={"ping_interval": 1.0}
    )
    with ApiProcess(directory, settings).running() as proc:
        yield proc


@pytest.fixture(scope="module")
def admin(server: ApiProcess) -> str:
    return admin_key(server.settings)


class Api:
    """HTTP to one api process, with an admin key to mint the keys a test needs."""

    def __init__(self, http: httpx.AsyncClient, admin: str, ws_url: str) -> None:
        self.http = http
        self.admin = admin
        self.ws_url = ws_url
        self._manager: str | None = None

    async def key(self, *scopes: str) -> tuple[str, str]:
        """A new key with `scopes`: (id, full key)."""
        response = await self.http.post(
            "/v1/keys",
            json={"name": unique("k"), "scopes": list(scopes)},
            headers=auth(self.admin),
        )
        assert response.status_code == 201, response.text
        issued = response.json()
        return issued["id"], issued["key"]

    async def manager(self) -> str:
        """A key that creates conversations, manages members and publishes anywhere."""
        if self._manager is None:
            self._manager = (await self.key("manage", "publish"))[1]
        return self._manager

    async def conversation(self, *members: str) -> str:
        name = unique("conv")
        response = await self.http.post(
            "/v1/conversations",
            json={
                "conversation": name,
                "members": [{"principal": m, "role": "member"} for m in members],
            },
            headers=auth(await self.manager()),
        )
        assert response.status_code == 201, response.text
        return name

    async def publish(self, conversation: str, text: str = "hi") -> int:
        response = await self.http.post(
            f"/v1/conversations/{conversation}/messages",
            json={"type": "text", "body": {"text": text}},
            headers=auth(await self.manager()),
        )
        assert response.status_code == 201, response.text
        seq: int = response.json()["seq"]
        return seq

    async def publish_batch(self, conversation: str, bodies: list[Any]) -> list[int]:
        response = await self.http.post(
            f"/v1/conversations/{conversation}/messages/batch",
            json={"messages": [{"type": "text", "body": b} for b in bodies]},
            headers=auth(await self.manager()),
        )
        assert response.status_code == 201, response.text
        return [ack["seq"] for ack in response.json()["messages"]]

    def socket(self, key: str, options: dict[str, Any] | None = None, **headers: str) -> Any:
        """A WebSocket with `key` and `headers`; `options` go to websockets' `connect`."""
        return connect(
            self.ws_url,
            additional_headers=auth(key, **headers),
            open_timeout=TIMEOUT,
            **(options or {}),
        )


@contextlib.asynccontextmanager
async def api_client(proc: ApiProcess, admin: str) -> AsyncIterator[Api]:
    async with httpx.AsyncClient(base_url=proc.url, timeout=30.0) as http:
        yield Api(http, admin, proc.ws_url)


@pytest.fixture
async def api(server: ApiProcess, admin: str) -> AsyncIterator[Api]:
    async with api_client(server, admin) as client:
        yield client


def auth(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


# -- frames --------------------------------------------------------------------------------------


async def send(ws: ClientConnection, op: str, **fields: Any) -> None:
    await ws.send(json.dumps({"op": op, **fields}))


async def recv(ws: ClientConnection) -> Frame:
    frame: Frame = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    return frame


@contextlib.asynccontextmanager
async def within(seconds: float, what: str) -> AsyncIterator[None]:
    """Fail (instead of hanging) when the block has not finished after `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise AssertionError(f"timed out after {seconds:g}s waiting for {what}") from None


async def expect(ws: ClientConnection, event: str, ignore: frozenset[str] = NOISE) -> Frame:
    """The next `event` frame; frames of the `ignore` kinds may come first, nothing else."""
    async with within(WAIT, f"a {event} frame"):
        while True:
            frame = await recv(ws)
            if frame["event"] == event:
                return frame
            assert frame["event"] in ignore, f"expected {event}, got {frame}"


async def messages(ws: ClientConnection, count: int) -> list[Frame]:
    """The next `count` messages (nothing but noise may come between them)."""
    return [(await expect(ws, "message"))["message"] for _ in range(count)]


async def messages_until(ws: ClientConnection, conversation: str, seq: int) -> list[int]:
    """Seqs of `conversation` received until `seq` arrives (other frames: noise only)."""
    seqs: list[int] = []
    async with within(2 * WAIT, f"seq {seq} of {conversation}"):
        while not seqs or seqs[-1] < seq:
            message = (await expect(ws, "message"))["message"]
            assert message["conversation"] == conversation, message
            seqs.append(message["seq"])
    return seqs


async def subscribe(ws: ClientConnection, conversation: str, since: int | None = None) -> Frame:
    fields: dict[str, Any] = {"conversation": conversation}
    if since is not None:
        fields["since"] = since
    await send(ws, "subscribe", **fields)
    frame = await expect(ws, "subscribed")
    assert frame["conversation"] == conversation
    return frame


async def closed(ws: ClientConnection) -> tuple[int | None, str | None, list[Frame]]:
    """Read until the server closes: (close code, reason, frames received before it)."""
    frames: list[Frame] = []
    try:
        async with within(WAIT, "the server to close the socket"):
            while True:
                frames.append(await recv(ws))
    except ConnectionClosed:
        pass
    return ws.close_code, ws.close_reason, frames


async def refused(ws: ClientConnection) -> tuple[Frame, int | None]:
    """A connection refused at authentication: its one error frame and the close code."""
    code, _, frames = await closed(ws)
    assert len(frames) == 1, frames
    assert frames[0]["event"] == "error", frames
    return frames[0]["error"], code


# -- 1. authentication ---------------------------------------------------------------------------


async def test_auth_by_header_and_by_query_token(api: Api) -> None:
    _, key = await api.key("subscribe")
    conversation = await api.conversation()
    async with api.socket(key) as ws:
        assert (await subscribe(ws, conversation))["seq"] == 0
    async with connect(f"{api.ws_url}?token={key}", open_timeout=TIMEOUT) as ws:
        assert (await subscribe(ws, conversation))["seq"] == 0


@pytest.mark.parametrize(
    ("headers", "query", "code"),
    [
        ({}, "", "missing_credentials"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "", "malformed_credentials"),
        ({"Authorization": "Bearer"}, "", "malformed_credentials"),
        ({}, "?token=ak_nope", "malformed_credentials"),
        ({"Authorization": f"Bearer {UNKNOWN_KEY}"}, "", "invalid_key"),
        ({}, f"?token={UNKNOWN_KEY}", "invalid_key"),
    ],
)
async def test_bad_credentials_get_error_then_4001(
    api: Api, headers: dict[str, str], query: str, code: str
) -> None:
    async with connect(api.ws_url + query, additional_headers=headers, open_timeout=TIMEOUT) as ws:
        error, close_code = await refused(ws)
    assert error["code"] == code, error
    assert close_code == 4001


async def test_revoked_key_is_refused_with_4001(api: Api) -> None:
    key_id, key = await api.key("subscribe")
    response = await api.http.delete(f"/v1/keys/{key_id}", headers=auth(api.admin))
    assert response.status_code == 200, response.text
    async with api.socket(key) as ws:
        error, close_code = await refused(ws)
    assert error["code"] == "key_revoked"
    assert close_code == 4001


async def test_impersonation_without_the_scope_is_refused_with_4003(api: Api) -> None:
    _, key = await api.key("subscribe")
    async with api.socket(key, **{"X-On-Behalf-Of": "user:mallory"}) as ws:
        error, close_code = await refused(ws)
    assert error["code"] == "impersonate_denied"
    assert close_code == 4003


async def auth_failures(api: Api, reason: str) -> float:
    response = await api.http.get("/metrics")
    assert response.status_code == 200, response.text
    return samples_with(response.text, "appliance_auth_failures_total", reason=reason)


async def expired_key(api: Api, scopes: list[str]) -> str:
    """A key that expired a moment ago (keys must be created with a future expiry)."""
    expires = datetime.now(UTC) + timedelta(seconds=1)
    response = await api.http.post(
        "/v1/keys",
        json={"name": unique("k"), "scopes": scopes, "expires_at": expires.isoformat()},
        headers=auth(api.admin),
    )
    assert response.status_code == 201, response.text
    await asyncio.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.2)
    key: str = response.json()["key"]
    return key


@pytest.mark.parametrize(
    "who",
    ["none", "malformed", "revoked", "expired", "wrong_scope", "prefix", "non_member_user",
     "member_user", "reader_user", "subscribe_scope"],
)  # fmt: skip
async def test_stream_auth_matrix(api: Api, who: str) -> None:
    """/v1/stream for every kind of caller: refused at connect (error frame, then 4001 or 4003),
    refused at subscribe (an error event; the socket stays open), or subscribed."""
    member, reader = f"user:{unique('member')}", f"user:{unique('reader')}"
    conversation = await api.conversation(member)
    response = await api.http.put(
        f"/v1/conversations/{conversation}/members/{reader}",
        json={"role": "reader"},
        headers=auth(await api.manager()),
    )
    assert response.status_code == 200, response.text
    _, impersonator = await api.key("impersonate")
    headers: dict[str, str] = {}
    if who == "none":
        pass
    elif who == "malformed":
        headers = {"Authorization": "Bearer ak_short"}
    elif who == "revoked":
        key_id, key = await api.key("subscribe")
        assert (await api.http.delete(f"/v1/keys/{key_id}", headers=auth(api.admin))).is_success
        headers = auth(key)
    elif who == "expired":
        headers = auth(await expired_key(api, ["subscribe"]))
    elif who == "wrong_scope":
        headers = auth((await api.key("read", "publish"))[1])
    elif who == "prefix":
        response = await api.http.post(
            "/v1/keys",
            json={"name": unique("k"), "scopes": ["subscribe"], "conversation_prefix": "zz-"},
            headers=auth(api.admin),
        )
        headers = auth(response.json()["key"])
    elif who == "non_member_user":
        headers = auth(impersonator, **{"X-On-Behalf-Of": f"user:{unique('stranger')}"})
    elif who in ("member_user", "reader_user"):
        user = member if who == "member_user" else reader
        headers = auth(impersonator, **{"X-On-Behalf-Of": user})
    else:
        headers = auth((await api.key("subscribe"))[1])

    refused_at_connect = {
        "none": ("missing_credentials", 4001),
        "malformed": ("malformed_credentials", 4001),
        "revoked": ("key_revoked", 4001),
        "expired": ("key_expired", 4001),
    }
    refused_at_subscribe = {
        "wrong_scope": "not_member",
        "prefix": "prefix",
        "non_member_user": "not_member",
    }
    reason = refused_at_connect.get(who, (refused_at_subscribe.get(who), 0))[0]
    before = await auth_failures(api, reason) if reason else 0.0
    async with connect(api.ws_url, additional_headers=headers, open_timeout=TIMEOUT) as ws:
        if who in refused_at_connect:
            error, close_code = await refused(ws)
            assert (error["code"], close_code) == refused_at_connect[who], error
        elif who in refused_at_subscribe:
            await send(ws, "subscribe", conversation=conversation)
            frame = await expect(ws, "error")
            assert frame["error"]["code"] == refused_at_subscribe[who], frame
            assert frame["error"]["conversation"] == conversation
            await send(ws, "ping")
            await expect(ws, "pong")  # still open
        else:
            assert (await subscribe(ws, conversation))["seq"] == 0
            seq = await api.publish(conversation)
            assert [m["seq"] for m in await messages(ws, 1)] == [seq]
    if reason:
        assert await auth_failures(api, reason) == before + 1


# -- 2. several subscriptions, unsubscribe, protocol errors --------------------------------------


async def test_several_conversations_in_order_and_unsubscribe(api: Api) -> None:
    _, key = await api.key("subscribe")
    a, b, c = [await api.conversation() for _ in range(3)]
    async with api.socket(key) as ws:
        for conversation in (a, b, c):
            await subscribe(ws, conversation)
        for i in range(5):
            for conversation in (a, b, c):
                await api.publish(conversation, f"{conversation} {i}")
        got = await messages(ws, 15)
        for conversation in (a, b, c):
            mine = [m for m in got if m["conversation"] == conversation]
            assert [m["seq"] for m in mine] == [1, 2, 3, 4, 5]
            assert [m["body"]["text"] for m in mine] == [f"{conversation} {i}" for i in range(5)]
            assert all(m["type"] == "text" and m["sender"].startswith("key:") for m in mine)
            assert all(m["id"] and m["ts"].endswith("Z") for m in mine)

        await send(ws, "unsubscribe", conversation=a)
        assert (await expect(ws, "unsubscribed"))["conversation"] == a
        # The hub hands frames over in publish order: a's would come before b's marker.
        await api.publish(a, "after unsubscribe")
        await api.publish(b, "marker")
        marker = (await messages(ws, 1))[0]
        assert (marker["conversation"], marker["seq"]) == (b, 6)


async def test_protocol_errors_leave_the_socket_open(api: Api) -> None:
    _, key = await api.key("subscribe")
    conversation = await api.conversation()
    async with api.socket(key) as ws:
        await ws.send("not json")
        assert (await expect(ws, "error"))["error"]["code"] == "invalid"
        await send(ws, "dance")
        assert (await expect(ws, "error"))["error"]["code"] == "invalid"
        await send(ws, "subscribe", conversation=unique("missing"))
        error = (await expect(ws, "error"))["error"]
        assert error["code"] == "not_found"
        await send(ws, "unsubscribe", conversation=conversation)
        assert (await expect(ws, "error"))["error"]["code"] == "not_subscribed"
        await subscribe(ws, conversation)
        await send(ws, "subscribe", conversation=conversation)
        assert (await expect(ws, "error"))["error"]["code"] == "already_subscribed"
        await send(ws, "ping")
        await expect(ws, "pong")


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        ("not json", "op"),
        ('{"op": "dance"}', "op"),
        ("[1, 2]", "op"),
        ('{"conversation": "c"}', "op"),
        ('{"op": "subscribe"}', "conversation"),
        ('{"op": "subscribe", "conversation": 5}', "conversation"),
        ('{"op": "subscribe", "conversation": "c", "since": "1"}', "since"),
        ('{"op": "subscribe", "conversation": "c", "since": 1.5}', "since"),
        ('{"op": "subscribe", "conversation": "c", "colour": "red"}', "colour"),
        ('{"x": ' + "[" * 5000 + "]" * 5000 + ', "op": "ping"}', "op"),  # skipped to find op
        (b'{"op": "subscribe", "conversation": "\xff"}'.decode("latin-1"), "conversation"),
    ],
    ids=["not_json", "unknown_op", "array", "no_op", "no_conversation", "conversation_int",
         "since_str", "since_float", "unknown_field", "nested_too_deep", "bad_conversation"],
)  # fmt: skip
async def test_a_bad_frame_names_its_field_and_leaves_the_socket_open(
    api: Api, frame: str, field: str
) -> None:
    _, key = await api.key("subscribe")
    async with api.socket(key) as ws:
        await ws.send(frame)
        error = (await expect(ws, "error"))["error"]
        assert (error["code"], error["field"]) == ("invalid", field), error
        await send(ws, "ping")
        await expect(ws, "pong")


# -- 3 and 4. resume with `since`, and the seam between replay and live --------------------------


async def test_resume_since_replays_then_goes_live(api: Api) -> None:
    _, key = await api.key("subscribe")
    conversation = await api.conversation()
    for i in range(1, 21):
        await api.publish(conversation, f"m{i}")
    async with api.socket(key) as ws:
        assert (await subscribe(ws, conversation, since=5))["seq"] == 20
        replayed = await messages(ws, 15)
        assert [m["seq"] for m in replayed] == list(range(6, 21))
        assert [m["body"]["text"] for m in replayed] == [f"m{i}" for i in range(6, 21)]
        assert await api.publish(conversation) == 21
        assert await api.publish(conversation) == 22
        assert [m["seq"] for m in await messages(ws, 2)] == [21, 22]


async def test_since_beyond_head_is_seq_reset(api: Api) -> None:
    """No seq above the head was handed out unless Redis lost its data: `seq_reset`, as a
    catch-up that finds the head gone back gets (docs/api.md), never a quiet resume there."""
    _, key = await api.key("subscribe")
    conversation = await api.conversation()
    await api.publish(conversation)
    async with api.socket(key) as ws:
        await send(ws, "subscribe", conversation=conversation, since=2)
        error = (await expect(ws, "error"))["error"]
        assert (error["code"], error["field"], error["conversation"], error["seq"]) == (
            "seq_reset",
            "since",
            conversation,
            1,
        )
        # Not subscribed after the refusal: subscribing again works.
        assert (await subscribe(ws, conversation, since=1))["seq"] == 1


async def test_resume_far_behind_is_not_a_slow_consumer(api: Api) -> None:
    """A replay longer than realtime.queue_max (1000 here) waits for the socket, not closes it."""
    _, key = await api.key("subscribe")
    conversation = await api.conversation()
    for _ in range(6):
        head = (await api.publish_batch(conversation, [{"n": 1}] * 500))[-1]
    async with api.socket(key) as ws:
        await subscribe(ws, conversation, since=0)
        assert await messages_until(ws, conversation, head) == list(range(1, head + 1))


async def test_no_gap_and_no_duplicate_at_the_seam(api: Api) -> None:
    """Publishers run flat out while sockets join partway with since=0 (or no since)."""
    total, publishers = 300, 3
    _, key = await api.key("subscribe")
    conversation = await api.conversation()
    acked: list[int] = []

    async def publish(count: int) -> None:
        for _ in range(count):
            acked.append(await api.publish(conversation))

    async def reached(count: int) -> None:
        async with within(WAIT, f"{count} acknowledged publishes"):
            while len(acked) < count:
                assert not any(t.done() and t.exception() for t in tasks), "a publisher failed"
                await asyncio.sleep(0.005)

    tasks = [asyncio.create_task(publish(total // publishers)) for _ in range(publishers)]
    try:
        async with api.socket(key) as early, api.socket(key) as late, api.socket(key) as live:
            await reached(40)
            await subscribe(early, conversation, since=0)
            await reached(150)
            await subscribe(late, conversation, since=0)
            head = (await subscribe(live, conversation))["seq"]
            early_seqs = await messages_until(early, conversation, total)
            late_seqs = await messages_until(late, conversation, total)
            live_seqs = await messages_until(live, conversation, total)
    finally:
        await asyncio.gather(*tasks)
    assert sorted(acked) == list(range(1, total + 1))
    assert early_seqs == list(range(1, total + 1))
    assert late_seqs == list(range(1, total + 1))
    assert live_seqs == list(range(head + 1, total + 1))


# -- 5. pings ------------------------------------------------------------------------------------


async def test_ping_pong_and_server_pings(api: Api) -> None:
    _, key = await api.key("subscribe")
    async with api.socket(key) as ws:
        await send(ws, "ping")
        await expect(ws, "pong")
        # The server pings on its own every realtime.ping_interval (1 s in this module).
        await expect(ws, "ping", ignore=frozenset())


# -- 7. membership -------------------------------------------------------------------------------


async def test_removed_member_loses_the_subscription(api: Api) -> None:
    _, key = await api.key("impersonate")
    carol = f"user:{unique('carol')}"
    as_carol = {"X-On-Behalf-Of": carol}
    watched, other = await api.conversation(carol), await api.conversation(carol)
    outside = await api.conversation()
    async with api.socket(key, **as_carol) as ws:
        await send(ws, "subscribe", conversation=outside)
        error = (await expect(ws, "error"))["error"]
        assert (error["code"], error["conversation"]) == ("not_member", outside)

        await subscribe(ws, watched)
        await subscribe(ws, other)
        await api.publish(watched)
        assert (await messages(ws, 1))[0]["conversation"] == watched

        ended = await auth_failures(api, "access_ended")
        response = await api.http.delete(
            f"/v1/conversations/{watched}/members/{carol}", headers=auth(await api.manager())
        )
        assert response.status_code == 204, response.text
        error = (await expect(ws, "error"))["error"]
        assert (error["code"], error["conversation"]) == ("forbidden", watched)
        assert await auth_failures(api, "access_ended") == ended + 1

        # Frames are handed over in publish order: a `watched` frame would precede the marker.
        await api.publish(watched, "too late")
        await api.publish(other, "marker")
        marker = (await messages(ws, 1))[0]
        assert (marker["conversation"], marker["body"]["text"]) == (other, "marker")

        await send(ws, "subscribe", conversation=watched)
        error = (await expect(ws, "error"))["error"]
        assert (error["code"], error["conversation"]) == ("not_member", watched)


# -- 8. revocation -------------------------------------------------------------------------------


async def test_revoking_a_key_closes_its_sockets_with_4001(api: Api) -> None:
    key_id, key = await api.key("subscribe")
    impersonator_id, impersonator = await api.key("impersonate")
    _, bystander = await api.key("subscribe")
    dave = f"user:{unique('dave')}"
    conversation = await api.conversation(dave)
    async with (
        api.socket(key) as ws,
        api.socket(impersonator, **{"X-On-Behalf-Of": dave}) as as_dave,
        api.socket(bystander) as other,
    ):
        for socket_ in (ws, as_dave, other):
            await subscribe(socket_, conversation)
        before = await auth_failures(api, "key_revoked")
        for revoked in (key_id, impersonator_id):
            response = await api.http.delete(f"/v1/keys/{revoked}", headers=auth(api.admin))
            assert response.status_code == 200, response.text
        for socket_ in (ws, as_dave):
            code, reason, frames = await closed(socket_)
            assert code == 4001, (code, reason, frames)
            assert reason == "key_revoked"
        # Other keys' sockets are untouched.
        await send(other, "ping")
        await expect(other, "pong")
    assert await auth_failures(api, "key_revoked") == before + 2  # one per closed socket


async def test_a_socket_closes_when_its_key_expires(api: Api) -> None:
    expires = datetime.now(UTC) + timedelta(seconds=4)
    response = await api.http.post(
        "/v1/keys",
        json={"name": unique("k"), "scopes": ["subscribe"], "expires_at": expires.isoformat()},
        headers=auth(api.admin),
    )
    assert response.status_code == 201, response.text
    conversation = await api.conversation()
    before = await auth_failures(api, "credentials_expired")
    async with api.socket(response.json()["key"]) as ws:
        await subscribe(ws, conversation)
        code, reason, frames = await closed(ws)
    assert (code, reason) == (4001, "credentials_expired"), frames
    assert await auth_failures(api, "credentials_expired") == before + 1


async def test_a_rotated_secret_closes_its_sockets_when_the_grace_ends(api: Api) -> None:
    key_id, key = await api.key("subscribe")
    conversation = await api.conversation()
    async with api.socket(key) as old:
        await subscribe(old, conversation)
        response = await api.http.post(
            f"/v1/keys/{key_id}/rotate", json={"grace": 2}, headers=auth(api.admin)
        )
        assert response.status_code == 200, response.text
        async with api.socket(response.json()["key"]) as new:
            await subscribe(new, conversation)
            code, reason, _ = await closed(old)
            assert (code, reason) == (4001, "credentials_expired")
            await send(new, "ping")  # the new secret's socket lives on
            await expect(new, "pong")


# -- 9. receipts and presence --------------------------------------------------------------------


async def test_receipts_and_presence(api: Api) -> None:
    _, key = await api.key("impersonate")
    alice, bob = f"user:{unique('alice')}", f"user:{unique('bob')}"
    conversation = await api.conversation(alice, bob)
    for _ in range(3):
        await api.publish(conversation)

    def presence(frame: Frame) -> tuple[str, str, str]:
        return frame["conversation"], frame["principal"], frame["status"]

    async with api.socket(key, **{"X-On-Behalf-Of": alice}) as ws_alice:
        await subscribe(ws_alice, conversation)
        seen = await expect(ws_alice, "presence", ignore=frozenset({"ping"}))
        assert presence(seen) == (conversation, alice, "online")

        async with api.socket(key, **{"X-On-Behalf-Of": bob}) as ws_bob:
            await subscribe(ws_bob, conversation)
            seen = await expect(ws_alice, "presence", ignore=frozenset({"ping"}))
            assert presence(seen) == (conversation, bob, "online")

            response = await api.http.get(
                f"/v1/conversations/{conversation}/presence",
                headers=auth(key, **{"X-On-Behalf-Of": alice}),
            )
            assert response.status_code == 200, response.text
            assert response.json()["online"] == sorted([alice, bob])

            response = await api.http.post(
                f"/v1/conversations/{conversation}/receipts",
                json={"type": "read", "seq": 2},
                headers=auth(key, **{"X-On-Behalf-Of": bob}),
            )
            assert response.status_code == 200, response.text
            receipt = await expect(ws_alice, "receipt", ignore=frozenset({"ping"}))
            assert receipt == {
                "event": "receipt",
                "conversation": conversation,
                "principal": bob,
                "type": "read",
                "seq": 2,
            }

        seen = await expect(ws_alice, "presence", ignore=frozenset({"ping", "receipt"}))
        assert presence(seen) == (conversation, bob, "offline")
        response = await api.http.get(
            f"/v1/conversations/{conversation}/presence",
            headers=auth(key, **{"X-On-Behalf-Of": alice}),
        )
        assert response.json()["online"] == [alice]


async def test_receipts_only_rise_and_are_listed_per_principal(api: Api) -> None:
    _, key = await api.key("impersonate")
    bob, carol = f"user:{unique('bob')}", f"user:{unique('carol')}"
    conversation = await api.conversation(bob, carol)
    for _ in range(3):
        await api.publish(conversation)

    async def mark(user: str, kind: str, seq: int) -> int:
        response = await api.http.post(
            f"/v1/conversations/{conversation}/receipts",
            json={"type": kind, "seq": seq},
            headers=auth(key, **{"X-On-Behalf-Of": user}),
        )
        assert response.status_code == 200, response.text
        assert (response.json()["principal"], response.json()["type"]) == (user, kind)
        value: int = response.json()["seq"]
        return value

    assert await mark(bob, "read", 2) == 2
    assert await mark(bob, "read", 1) == 2  # never lowered: the mark it stays at
    assert await mark(bob, "delivered", 3) == 3
    assert await mark(carol, "delivered", 1) == 1
    response = await api.http.get(
        f"/v1/conversations/{conversation}/receipts", headers=auth(key, **{"X-On-Behalf-Of": bob})
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "receipts": sorted(
            [
                {"principal": bob, "delivered": 3, "read": 2},
                {"principal": carol, "delivered": 1, "read": 0},
            ],
            key=lambda r: r["principal"],
        )
    }


async def test_a_principal_goes_online_once_however_many_sockets_it_subscribes(api: Api) -> None:
    """Two sockets of one principal, one of them re-subscribing, announce `online` once; the
    watcher's frames up to a message published after it all are exactly that event."""
    _, key = await api.key("impersonate")
    alice, bob = f"user:{unique('alice')}", f"user:{unique('bob')}"
    conversation = await api.conversation(alice, bob)
    as_alice = {"X-On-Behalf-Of": alice}
    async with api.socket(key, **{"X-On-Behalf-Of": bob}) as watcher:
        await subscribe(watcher, conversation)
        own = await expect(watcher, "presence", ignore=frozenset({"ping"}))
        assert (own["principal"], own["status"]) == (bob, "online")
        async with api.socket(key, **as_alice) as one, api.socket(key, **as_alice) as two:
            await subscribe(one, conversation)
            await subscribe(two, conversation)
            await send(two, "unsubscribe", conversation=conversation)
            await expect(two, "unsubscribed")
            await subscribe(two, conversation)
            seq = await api.publish(conversation)
            seen: list[tuple[str, str]] = []
            async with within(WAIT, f"message {seq}"):
                while (frame := await recv(watcher))["event"] != "message":
                    if frame["event"] == "presence":
                        seen.append((frame["principal"], frame["status"]))
                    else:
                        assert frame["event"] == "ping", frame
            assert frame["message"]["seq"] == seq
    assert seen == [(alice, "online")]


async def test_a_refused_subscribe_announces_no_presence(api: Api) -> None:
    _, key = await api.key("impersonate")
    alice, bob = f"user:{unique('alice')}", f"user:{unique('bob')}"
    conversation = await api.conversation(alice, bob)
    async with (
        api.socket(key, **{"X-On-Behalf-Of": alice}) as ws_alice,
        api.socket(key, **{"X-On-Behalf-Of": bob}) as ws_bob,
    ):
        await subscribe(ws_alice, conversation)
        await expect(ws_alice, "presence", ignore=frozenset({"ping"}))  # alice herself
        await send(ws_bob, "subscribe", conversation=conversation, since=99)
        assert (await expect(ws_bob, "error"))["error"]["field"] == "since"
        # Frames of one channel arrive in order: a presence event for bob would come first.
        seq = await api.publish(conversation)
        frame = await expect(ws_alice, "message", ignore=frozenset({"ping"}))
        assert frame["message"]["seq"] == seq


# -- 11. metrics ---------------------------------------------------------------------------------


def samples(text: str) -> dict[str, float]:
    """Unlabelled samples by name (labelled ones summed)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


async def test_delivery_latency_and_connections_in_metrics(api: Api) -> None:
    _, key = await api.key("subscribe")
    conversation = await api.conversation()
    before = samples((await api.http.get("/metrics")).text)
    async with api.socket(key) as ws, api.socket(key) as other:
        for socket_ in (ws, other):
            await subscribe(socket_, conversation)
        await api.publish(conversation)
        for socket_ in (ws, other):
            await messages(socket_, 1)
        response = await api.http.get("/metrics")
        assert response.status_code == 200, response.text
        found = samples(response.text)
    # This module's server is shared, so the figures are compared with their values before.
    delivered = "appliance_delivery_latency_seconds_count"
    assert found[delivered] - before.get(delivered, 0.0) == 2  # one per socket it reached
    connections = "appliance_websocket_connections"
    assert found[connections] - before.get(connections, 0.0) == 2


# -- 6. slow consumer ----------------------------------------------------------------------------


SLOW_LIMITS = {
    # The queue bound: 10 frames waiting.
    "queue_max": {"queue_max": 10},
    # The stall bound: a queue that would hold everything, but a send that stops for 0.5 s.
    "stall_timeout": {"queue_max": 1_000_000, "stall_timeout": 0.5},
}


@pytest.fixture(params=list(SLOW_LIMITS))
def slow_server(
    base_settings: dict[str, Any], migrated: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[ApiProcess]:
    """A process with a tight slow-consumer bound (one of SLOW_LIMITS) that takes big batches."""
    settings = api_settings(
        copy.deepcopy(base_settings),
        tmp_path,
        realtime=SLOW_LIMITS[request.param],
        api={"max_body_bytes": 16 * 1_048_576},
    )
    with ApiProcess(tmp_path, settings).running() as proc:
        yield proc


def small_buffer_socket(port: int) -> socket.socket:
    """A connected TCP socket with a small receive buffer, so back-pressure comes quickly."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def test_slow_consumer_is_closed_with_4008(slow_server: ApiProcess, admin: str) -> None:
    pad = "x" * 30_000
    async with api_client(slow_server, admin) as api:
        _, key = await api.key("subscribe")
        conversation = await api.conversation()
        published = 0
        # websockets stops reading the socket once `max_queue` frames wait: TCP back-pressure.
        async with connect(
            slow_server.ws_url,
            additional_headers=auth(key),
            sock=small_buffer_socket(slow_server.port),
            max_queue=1,
            open_timeout=TIMEOUT,
        ) as ws:
            await subscribe(ws, conversation)
            # Publish (without reading) until the server reports the slow-consumer close.
            for _ in range(50):  # 3 MB each; a few are enough on loopback
                published = (await api.publish_batch(conversation, [{"pad": pad}] * 100))[-1]
                text = (await api.http.get("/metrics")).text
                if samples_with(text, "appliance_websocket_closed_total", reason="4008") > 0:
                    break
            code, reason, frames = await closed(ws)
        assert code == 4008, (code, reason)
        assert reason is not None and "since" in reason
        seqs = [f["message"]["seq"] for f in frames if f["event"] == "message"]
        # What did arrive is a gapless prefix: the client resumes from its last seq.
        assert seqs == list(range(1, len(seqs) + 1))
        assert len(seqs) < published

        async with api.socket(key) as ws:
            await subscribe(ws, conversation, since=len(seqs))
            resumed = await messages_until(ws, conversation, published)
        assert resumed == list(range(len(seqs) + 1, published + 1))


async def test_a_burst_that_the_client_reads_is_not_a_slow_consumer(api: Api) -> None:
    """Four batches of 500 at once reach the hub in one read and queue 2,000 frames for the
    socket before its sender runs: a client that reads them all is not closed."""
    _, key = await api.key("subscribe")
    conversation = await api.conversation()
    async with api.socket(key) as ws:
        await subscribe(ws, conversation)
        bodies = [{"n": n} for n in range(500)]
        sent = await asyncio.gather(*(api.publish_batch(conversation, bodies) for _ in range(4)))
        assert sorted(seq for batch in sent for seq in batch) == list(range(1, 2001))
        assert await messages_until(ws, conversation, 2000) == list(range(1, 2001))
        await send(ws, "ping")
        await expect(ws, "pong")


def samples_with(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# -- 10. hub reconnect after a Redis restart -----------------------------------------------------


async def test_hub_reconnects_after_redis_restart(
    base_settings: dict[str, Any],
    migrated: str,
    tmp_path: Path,
    private_redis: Any,
    admin: str,
) -> None:
    port, start_redis, kill_redis = private_redis
    settings = api_settings(
        copy.deepcopy(base_settings),
        tmp_path,
        redis={"url": f"redis://127.0.0.1:{port}/0"},
        # Pings (and presence refreshes) every half second, so one may fall in the outage.
        realtime={"ping_interval": 0.5},
    )
    proc = ApiProcess(tmp_path, settings)
    proc.start()
    try:
        async with api_client(proc, admin) as api:
            _, key = await api.key("subscribe")
            before, after = await api.conversation(), await api.conversation()
            async with api.socket(key) as ws:
                await subscribe(ws, before)
                await subscribe(ws, after)
                await api.publish(before)
                assert (await messages(ws, 1))[0]["conversation"] == before

                kill_redis()
                # Empty now: `before` restarts at seq 1, below the 1 the socket has, so its
                # subscription ends with `seq_reset`; `after`, never published to, goes on.
                start_redis()
                seqs: list[int] = []
                reset: list[dict[str, Any]] = []
                last = 0
                give_up = asyncio.get_running_loop().time() + 2 * WAIT
                # Publish until the hub is back and one arrives.
                while asyncio.get_running_loop().time() < give_up:
                    with contextlib.suppress(httpx.HTTPError, AssertionError):
                        last = await api.publish(after)
                    try:
                        frame = await asyncio.wait_for(ws.recv(), 0.2)
                    except TimeoutError:
                        continue
                    event = json.loads(frame)
                    if event["event"] == "message":
                        assert event["message"]["conversation"] == after, event
                        seqs.append(event["message"]["seq"])
                        break
                    if event["event"] == "error":
                        reset.append(event["error"])
                        continue
                    assert event["event"] in NOISE, event
                assert seqs, f"no message after the Redis restart\n{proc.log()}"
                for _ in range(5):
                    last = await api.publish(after)
                async with within(WAIT, f"seq {last} after the Redis restart"):
                    while True:
                        event = await recv(ws)
                        if event["event"] == "error":
                            reset.append(event["error"])
                        elif event["event"] == "message":
                            seqs.append(event["message"]["seq"])
                            if seqs[-1] == last:
                                break
                        else:
                            assert event["event"] in NOISE, event
                if not reset:  # `before` may catch up after `after` (each retries on its own)
                    reset.append((await expect(ws, "error"))["error"])
        # Whatever was acknowledged while the hub was still away came from the tail.
        assert seqs == list(range(1, last + 1))
        assert [(e["code"], e["conversation"]) for e in reset] == [("seq_reset", before)]
    finally:
        proc.stop()
        print(proc.log())
