"""Webhooks end to end: endpoints over HTTP and the CLI, events queued by emit(), signed
deliveries to a real HTTP receiver on 127.0.0.1 (hence `allow_private`), retries through a
failing, hanging, redirecting and flooding receiver, disabling after failures, refusal of
non-public addresses, and pruning of the delivery log."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psycopg
import pytest
from click.testing import CliRunner
from litestar.testing import AsyncTestClient
from pgqueuer.domain.settings import db_settings

from appliance.cli import main
from appliance.config import Config
from appliance.programs.worker import run_worker
from appliance.resources import Resources
from appliance.schedules import SCHEDULES, Run
from appliance.webhooks import addresses, client, retention, service
from appliance.webhooks.events import Event, event
from appliance.webhooks.jobs import deliver
from appliance.webhooks.service import DELIVER, Delivery, emit
from tests.messaging import bearer, issue_key, unique
from tests.support import write_toml
from tests.test_cli import cli

Client = AsyncTestClient[Any]
API_DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
MAX_BODY = 4096
HUGE_CAP = 256 * 1_048_576  # the flooding receiver stops here if the client never stops reading


@pytest.fixture(autouse=True)
def webhook_settings(settings: dict[str, Any]) -> None:
    settings["webhooks"] = {
        "allow_private": True,  # the receiver is on 127.0.0.1
        "timeout": 1.0,
        "max_attempts": 5,
        "retry_delay": 0.05,
        "max_response_bytes": MAX_BODY,
        "disable_after": 2,
        "batch_max": 3,
    }


@pytest.fixture(autouse=True)
async def kept_clients() -> AsyncIterator[None]:
    """Deliveries keep their connections open per event loop: closed with the test's loop."""
    yield
    await client.close_clients()


@pytest.fixture(autouse=True)
def no_endpoints(migrated: str) -> None:
    """Each test starts without endpoints or queued deliveries (the run shares one database)."""
    with psycopg.connect(migrated, autocommit=True) as conn:
        conn.execute("DELETE FROM webhook_endpoints")
        conn.execute(
            f"DELETE FROM {db_settings().queue_table} WHERE entrypoint = %s",
            (DELIVER,),
        )


async def until(condition: Any, what: str, timeout: float = 10.0) -> None:
    """Poll `condition()` (no timing assertion: the timeout only prevents a hang)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


class Receiver:
    """A small HTTP/1.1 server with keep-alive: each request gets the next behaviour of `script`
    ("ok" once it is empty) and is recorded with its headers and raw body; `connections` counts
    the connections accepted, `closed` those the client closed."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.script: list[str] = []
        self.requests: list[tuple[str, httpx.Headers, bytes]] = []
        self.flooded: list[int] = []  # bytes a "huge" answer got out before the client left
        self.arrived = asyncio.Event()
        self.port = 0
        self.connections = 0
        self.closed = 0

    async def __aenter__(self) -> Receiver:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook?x=1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while await self._answer(reader, writer):
                pass
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """One request and its answer; whether the connection stays open for another."""
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                self.closed += 1  # the client closed an idle connection
            return False
        target = head[0].split(" ")[1]
        headers = httpx.Headers([tuple(h.split(": ", 1)) for h in head[1:] if h])
        raw = await reader.readexactly(int(headers["content-length"]))
        self.requests.append((target, headers, raw))
        self.arrived.set()
        behaviour = self.script.pop(0) if self.script else "ok"
        if behaviour == "ok":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        elif behaviour == "fail":
            writer.write(b"HTTP/1.1 500 Oops\r\nContent-Length: 4\r\n\r\nnope")
        elif behaviour == "redirect":
            writer.write(
                b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:9/elsewhere\r\n"
                b"Content-Length: 0\r\n\r\n"
            )
        elif behaviour == "drop":  # read the request, close without an answer
            return False
        elif behaviour == "hang":
            await asyncio.wait_for(reader.read(), 30)  # until the client gives up
            return False
        elif behaviour in ("huge", "huge_ok"):
            status = b"200 OK" if behaviour == "huge_ok" else b"500 Oops"
            writer.write(b"HTTP/1.1 " + status + b"\r\nConnection: close\r\n\r\n")
            sent, chunk = 0, b"x" * 65536
            try:
                while sent < HUGE_CAP:  # an endless body, as far as the client can tell
                    writer.write(chunk)
                    await writer.drain()
                    sent += len(chunk)
            except OSError:
                pass
            self.flooded.append(sent)
            return False
        await writer.drain()
        return True


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r


async def create_hook(api: Client, admin: str, url: str, events: list[str]) -> dict[str, Any]:
    response = await api.post(
        "/v1/webhooks", json={"url": url, "events": events}, headers=bearer(admin)
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def queued(res: Resources, hook: str) -> list[tuple[Delivery, datetime]]:
    """The webhook jobs queued for `hook`, taken off the queue (as the worker would)."""
    table = db_settings().queue_table
    async with res.connection() as conn:
        cur = await conn.execute(
            f"DELETE FROM {table} WHERE entrypoint = %s"
            " AND convert_from(payload, 'UTF8') LIKE %s RETURNING id, payload, execute_after",
            (DELIVER, f'%"endpoint":"{hook}"%'),
        )
        rows = sorted(await cur.fetchall())
    return [(msgspec.json.decode(p, type=Delivery), after) for _, p, after in rows]


async def attempts(api: Client, admin: str, hook: str) -> list[dict[str, Any]]:
    response = await api.get(f"/v1/webhooks/{hook}/deliveries", headers=bearer(admin))
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["deliveries"]
    return found


def sample(name: str, labels: dict[str, str]) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def docs_verify() -> Any:
    """`verify` from the Python snippet in docs/api.md, run as a reader would copy it."""
    blocks = re.findall(r"```python\n(.*?)```", API_DOC.read_text(), re.DOTALL)
    snippet = next(b for b in blocks if "Webhook-Signature" in b)
    scope: dict[str, Any] = {}
    exec(compile(snippet, "docs/api.md", "exec"), scope)
    return scope["verify"]


def independent_check(secret: str, headers: httpx.Headers, body: bytes) -> bool:
    timestamp = headers["webhook-timestamp"]
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return headers["webhook-signature"] == f"v1={mac.hexdigest()}"


# -- endpoints over HTTP ------------------------------------------------------------------------


async def test_crud_shows_the_secret_once(api: Client, resources: Resources) -> None:
    admin = await issue_key(resources, ["admin"])
    created = await create_hook(
        api, admin, "https://hooks.example.com/in", ["member.added", "message.created"]
    )
    hook = created["id"]
    assert re.fullmatch(r"wh_[a-z0-9]{12}", hook)
    assert created["secret"].startswith("whsec_")
    assert created["events"] == ["member.added", "message.created"]
    assert created["enabled"] is True and created["failures"] == 0

    got = await api.get(f"/v1/webhooks/{hook}", headers=bearer(admin))
    assert got.status_code == 200 and "secret" not in got.json()
    listed = await api.get("/v1/webhooks", headers=bearer(admin))
    assert hook in [w["id"] for w in listed.json()["webhooks"]]
    assert all("secret" not in w for w in listed.json()["webhooks"])

    patched = await api.patch(
        f"/v1/webhooks/{hook}",
        json={"url": "https://hooks.example.com/v2", "events": ["export.ready"],
              "description": "billing"},
        headers=bearer(admin),
    )  # fmt: skip
    assert patched.status_code == 200, patched.text
    assert patched.json()["url"] == "https://hooks.example.com/v2"
    assert patched.json()["events"] == ["export.ready"]
    assert patched.json()["description"] == "billing"
    cleared = await api.patch(
        f"/v1/webhooks/{hook}", json={"description": None, "enabled": False}, headers=bearer(admin)
    )
    assert cleared.json()["description"] is None
    assert cleared.json()["enabled"] is False and cleared.json()["disabled_reason"] == "admin"

    deleted = await api.delete(f"/v1/webhooks/{hook}", headers=bearer(admin))
    assert deleted.status_code == 200 and deleted.json()["id"] == hook
    gone = await api.get(f"/v1/webhooks/{hook}", headers=bearer(admin))
    assert gone.status_code == 404 and gone.json()["error"]["field"] == "webhook"
    for call in (api.delete, api.get):
        again = await call(f"/v1/webhooks/{hook}", headers=bearer(admin))
        assert again.status_code == 404


@pytest.mark.parametrize(
    ("body", "field", "rule"),
    [
        ({"url": "ftp://h.example.com/", "events": ["export.ready"]}, "url", "http or https"),
        ({"url": "https://u:p@h.example.com/", "events": ["export.ready"]}, "url", "user info"),
        ({"url": "https:///nohost", "events": ["export.ready"]}, "url", "must name a host"),
        ({"url": "https://h.example.com/#x", "events": ["export.ready"]}, "url", "fragment"),
        ({"url": "https://h.example.com:99999/", "events": ["export.ready"]}, "url", "port"),
        ({"url": "https://h.example.com/ x", "events": ["export.ready"]}, "url", "whitespace"),
        ({"url": "https://h.example.com/" + "a" * 2100, "events": ["export.ready"]}, "url",
         "length"),
        ({"url": "https://h.example.com/", "events": []}, "events", "length"),
        ({"url": "https://h.example.com/", "events": ["message.deleted"]}, "events[0]",
         "one of message.created, conversation.created"),
        ({"url": "https://h.example.com/"}, "events", "missing required field"),
        ({"url": "https://h.example.com/", "events": ["export.ready"], "secret": "x"}, "secret",
         "unknown field"),
        ({"url": "https://h.example.com/", "events": ["export.ready"], "description": "d" * 501},
         "description", "length"),
    ],
)  # fmt: skip
async def test_create_refuses_bad_input_naming_field_and_rule(
    api: Client, resources: Resources, body: dict[str, Any], field: str, rule: str
) -> None:
    admin = await issue_key(resources, ["admin"])
    response = await api.post("/v1/webhooks", json=body, headers=bearer(admin))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("invalid", field)
    assert rule in error["message"]


async def test_ids_patch_and_paging_input_are_checked(api: Client, resources: Resources) -> None:
    admin = await issue_key(resources, ["admin"])
    hook = (await create_hook(api, admin, "https://h.example.com/", ["export.ready"]))["id"]
    for path in ("/v1/webhooks/nope", "/v1/webhooks/WH_AAAAAAAAAAAA/deliveries"):
        bad = await api.get(path, headers=bearer(admin))
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "webhook"
    unknown = await api.get("/v1/webhooks/wh_000000000000/deliveries", headers=bearer(admin))
    assert unknown.status_code == 404
    patch = await api.patch(
        f"/v1/webhooks/{hook}", json={"url": "gopher://x/"}, headers=bearer(admin)
    )
    assert patch.status_code == 400 and patch.json()["error"]["field"] == "url"
    patch = await api.patch(f"/v1/webhooks/{hook}", json={"enabled": "yes"}, headers=bearer(admin))
    assert patch.status_code == 400 and patch.json()["error"]["field"] == "enabled"
    for query, field in (("limit=0", "limit"), ("limit=x", "limit"), ("limit=501", "limit"),
                         ("cursor=%21%21", "cursor"), ("cursor=bm90LWpzb24", "cursor"),
                         ("before=1", "before")):  # fmt: skip
        page = await api.get(f"/v1/webhooks/{hook}/deliveries?{query}", headers=bearer(admin))
        assert page.status_code == 400, (query, page.text)
        assert page.json()["error"]["field"] == field


async def test_only_admin_keys_manage_webhooks(api: Client, resources: Resources) -> None:
    admin = await issue_key(resources, ["admin"])
    other = await issue_key(resources, ["manage", "publish", "read", "subscribe"])
    hook = (await create_hook(api, admin, "https://h.example.com/", ["export.ready"]))["id"]
    calls = [
        ("POST", "/v1/webhooks", {"url": "https://h.example.com/", "events": ["export.ready"]}),
        ("GET", "/v1/webhooks", None),
        ("GET", f"/v1/webhooks/{hook}", None),
        ("PATCH", f"/v1/webhooks/{hook}", {"enabled": False}),
        ("DELETE", f"/v1/webhooks/{hook}", None),
        ("GET", f"/v1/webhooks/{hook}/deliveries", None),
    ]
    for method, path, payload in calls:
        refused = await api.request(method, path, json=payload, headers=bearer(other))
        assert refused.status_code == 403, (method, path, refused.text)
        assert refused.json()["error"]["code"] == "scope"
        nobody = await api.request(method, path, json=payload)
        assert nobody.status_code == 401
    still = await api.get(f"/v1/webhooks/{hook}", headers=bearer(admin))
    assert still.json()["enabled"] is True  # the refused PATCH and DELETE changed nothing


# -- emit ------------------------------------------------------------------------------------


async def test_emit_queues_per_subscribed_enabled_endpoint_in_batches(
    api: Client, resources: Resources, receiver: Receiver
) -> None:
    admin = await issue_key(resources, ["admin"])
    messages = (await create_hook(api, admin, receiver.url, ["message.created"]))["id"]
    both = (await create_hook(api, admin, receiver.url, ["message.created", "member.added"]))["id"]
    off = (await create_hook(api, admin, receiver.url, ["message.created"]))["id"]
    await api.patch(f"/v1/webhooks/{off}", json={"enabled": False}, headers=bearer(admin))
    conversation = unique("c")
    events = [event("message.created", {"seq": n}, conversation=conversation) for n in range(5)]
    events.append(event("member.added", {"principal": "user:a"}, conversation=conversation))

    async with resources.connection() as conn:
        async with conn.transaction():
            count = await emit(conn, events, batch_max=3)
        # a rolled-back change queues nothing
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await emit(conn, events, batch_max=3)
                raise RuntimeError("rollback")
    assert count == 2 + 2  # 5 messages → 3+2 for one endpoint; 6 events → 3+3 for the other
    jobs = {hook: await queued(resources, hook) for hook in (messages, both, off)}
    assert [len(d.events) for d, _ in jobs[messages]] == [3, 2]
    assert [e.id for d, _ in jobs[messages] for e in d.events] == [e.id for e in events[:5]]
    assert [e.id for d, _ in jobs[both] for e in d.events] == [e.id for e in events]
    assert jobs[off] == []
    ids = [d.delivery for hook in (messages, both) for d, _ in jobs[hook]]
    assert len(set(ids)) == 4 and all(d.attempt == 1 for h in jobs.values() for d, _ in h)

    async with resources.connection() as conn:
        nobody = [event("conversation.deleted", {}, conversation=conversation)]
        assert await emit(conn, nobody) == 0
        assert await emit(conn, []) == 0


async def test_emit_asks_the_subscriber_index(resources: Resources) -> None:
    """emit() runs in every emitting transaction: its one query is answerable from the partial
    GIN index (the table is tiny here, so the planner is told to prefer indexes)."""
    from appliance.webhooks.service import _SUBSCRIBERS

    async with resources.connection() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        cur = await conn.execute("EXPLAIN " + _SUBSCRIBERS, (["message.created"],))
        plan = "\n".join(r[0] for r in await cur.fetchall())
    assert "webhook_endpoints_subscribed" in plan, plan


def test_backoff_doubles_with_jitter_up_to_an_hour(config: Config) -> None:
    from appliance.webhooks.jobs import MAX_DELAY, backoff

    cfg = config.webhooks.model_copy(update={"retry_delay": 30.0})
    for attempt, full in ((1, 30.0), (2, 60.0), (3, 120.0), (8, 3600.0), (100, MAX_DELAY)):
        waits = [backoff(attempt, cfg) for _ in range(200)]
        assert all(full * 0.5 <= w <= full for w in waits), (attempt, min(waits), max(waits))
        assert len(set(waits)) > 1  # jittered


async def test_a_job_larger_than_batch_max_is_split(
    api: Client, resources: Resources, receiver: Receiver
) -> None:
    admin = await issue_key(resources, ["admin"])
    hook = (await create_hook(api, admin, receiver.url, ["message.created"]))["id"]
    async with resources.connection() as conn:
        events = [event("message.created", {"seq": n}) for n in range(7)]
        assert await emit(conn, events, batch_max=100) == 1  # the emitter's own size
    ((job, _),) = await queued(resources, hook)
    await deliver(resources, msgspec.json.encode(job))  # [webhooks] batch_max is 3 here
    parts = await queued(resources, hook)
    assert [len(d.events) for d, _ in parts] == [3, 3, 1]
    assert [e.id for d, _ in parts for e in d.events] == [e.id for e in events]
    assert receiver.requests == []  # split, not sent


async def test_a_delivery_holds_at_most_batch_bytes_and_a_larger_event_goes_alone(
    api: Client, resources: Resources, receiver: Receiver
) -> None:
    """batch_max is 3 here: 400 KB events go two to a delivery (three pass 1 MiB), a 2 MB one
    alone; a job queued before the cap (over 1 MiB) is split by bytes when it runs."""
    admin = await issue_key(resources, ["admin"])
    hook = (await create_hook(api, admin, receiver.url, ["member.added"]))["id"]
    big = [event("member.added", {"n": n, "pad": "x" * 400_000}) for n in range(5)]
    huge = event("member.added", {"pad": "y" * 2_000_000})
    small = event("member.added", {"n": 9})
    sent = [*big[:3], huge, small, *big[3:]]
    async with resources.connection() as conn:
        assert await emit(conn, sent, batch_max=3) == 4
    jobs = [d for d, _ in await queued(resources, hook)]
    assert [[e.id for e in d.events] for d in jobs] == [
        [big[0].id, big[1].id], [big[2].id], [huge.id], [small.id, big[3].id, big[4].id]
    ]  # fmt: skip
    for d in jobs:
        body = msgspec.json.encode({"events": d.events})
        assert len(d.events) == 1 or len(body) <= service.BATCH_BYTES
    assert sum(e.size() for e in big[:2]) <= service.BATCH_BYTES < sum(e.size() for e in big[:3])
    old = Delivery(hook, "d-old", 1, big[:3])  # 1.2 MB in one job, as emit queued it before
    await deliver(resources, msgspec.json.encode(old))
    parts = [d for d, _ in await queued(resources, hook)]
    assert [[e.id for e in d.events] for d in parts] == [[big[0].id, big[1].id], [big[2].id]]
    assert receiver.requests == []


def test_event_size_counts_at_least_the_encoded_bytes() -> None:
    samples = [
        event("member.added", {}),
        event("conversation.updated", {"a": "é" * 100}, conversation="c" * 200),
        event("export.ready", {"n": 1}, conversation=None),
    ]
    for e in samples:
        assert len(msgspec.json.encode(e)) <= e.size() <= len(msgspec.json.encode(e)) + 100


# -- delivery --------------------------------------------------------------------------------


async def test_worker_delivers_signed_events_the_docs_snippet_verifies(
    api: Client, resources: Resources, receiver: Receiver
) -> None:
    admin = await issue_key(resources, ["admin"])
    created = await create_hook(api, admin, receiver.url, ["message.created", "export.ready"])
    sent = [
        event("message.created", {"seq": 1, "body": {"text": "héllo"}}, conversation="c1"),
        event("export.ready", {"export": "x"}, conversation="c1"),
    ]
    receiver.script = ["fail"]  # the first attempt fails; the worker runs the queued retry
    async with resources.connection() as conn, conn.transaction():
        assert await emit(conn, sent) == 1
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(resources, stop))
    try:
        await until(lambda: len(receiver.requests) >= 2, "the retried delivery", timeout=60)
        for _ in range(500):  # the worker logs the attempt after the receiver answered
            if len(await attempts(api, admin, created["id"])) == 2:
                break
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)

    (_, first, first_raw), (target, headers, raw) = receiver.requests
    assert first["webhook-id"] == headers["webhook-id"] and first_raw == raw
    assert target == "/hook?x=1"
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"].startswith("appliance-webhooks/")
    assert headers["host"] == f"127.0.0.1:{receiver.port}"
    received = msgspec.json.decode(raw, type=dict[str, list[Event]])["events"]
    assert received == sent
    verify = docs_verify()
    assert verify(created["secret"], headers, raw)
    assert independent_check(created["secret"], headers, raw)
    assert not verify(created["secret"], headers, raw.replace(b"c1", b"c2"))
    assert not verify("whsec_other", headers, raw)
    stale = httpx.Headers(headers)
    stale["webhook-timestamp"] = str(int(time.time()) - 3600)
    assert not verify(created["secret"], stale, raw)

    logged, failed = await attempts(api, admin, created["id"])  # newest first
    assert (failed["attempt"], failed["outcome"], failed["status"]) == (1, "http_error", 500)
    assert failed["retry_at"] is not None
    assert logged["delivery"] == failed["delivery"] == headers["webhook-id"]
    assert (logged["attempt"], logged["outcome"], logged["status"]) == (2, "delivered", 200)
    assert logged["event_count"] == 2
    assert logged["event_types"] == ["export.ready", "message.created"]
    assert logged["retry_at"] is None and logged["error"] is None


async def test_failed_attempts_are_retried_and_logged_until_one_succeeds(
    api: Client, resources: Resources, receiver: Receiver
) -> None:
    admin = await issue_key(resources, ["admin"])
    created = await create_hook(api, admin, receiver.url, ["member.added"])
    hook = created["id"]
    receiver.script = ["fail", "hang", "redirect", "huge", "ok"]
    outcomes = ("delivered", "http_error", "redirect", "timeout")
    counted = {o: sample("appliance_webhook_deliveries_total", {"outcome": o}) for o in outcomes}
    async with resources.connection() as conn:
        await emit(conn, [event("member.added", {"principal": "user:b"}, conversation="c")])
    before = datetime.now(UTC)
    for attempt in range(1, 6):
        ((job, after),) = await queued(resources, hook)
        assert job.attempt == attempt
        if attempt > 1:
            # the next attempt waits: retry_delay 0.05 s doubled per attempt, jittered 50-100 %
            assert after > before
        before = datetime.now(UTC)
        await deliver(resources, msgspec.json.encode(job))
    assert await queued(resources, hook) == []  # delivered: nothing more to try

    # every attempt reached the receiver, with the same Webhook-Id, freshly signed
    assert len(receiver.requests) == 5
    assert len({h["webhook-id"] for _, h, _ in receiver.requests}) == 1
    assert all(independent_check(created["secret"], h, b) for _, h, b in receiver.requests)
    # the flood was cut off: the client stopped reading long before the receiver's cap
    (flooded,) = receiver.flooded
    assert flooded < HUGE_CAP

    logged = list(reversed(await attempts(api, admin, hook)))  # oldest first
    assert [(a["attempt"], a["outcome"], a["status"]) for a in logged] == [
        (1, "http_error", 500),
        (2, "timeout", None),
        (3, "redirect", 302),
        (4, "http_error", 500),
        (5, "delivered", 200),
    ]
    assert "127.0.0.1:9/elsewhere" in logged[2]["error"]
    assert "not followed" in logged[2]["error"]
    assert "1 s" in logged[1]["error"]
    assert [a["retry_at"] is None for a in logged] == [False] * 4 + [True]
    for outcome, more in (("delivered", 1), ("http_error", 2), ("redirect", 1), ("timeout", 1)):
        now_counted = sample("appliance_webhook_deliveries_total", {"outcome": outcome})
        assert now_counted - counted[outcome] == more, outcome
    endpoint = (await api.get(f"/v1/webhooks/{hook}", headers=bearer(admin))).json()
    assert endpoint["failures"] == 0 and endpoint["enabled"] is True

    # pages of two, newest first, through next_cursor
    seen: list[int] = []
    cursor = None
    while True:
        query = "limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = (
            await api.get(f"/v1/webhooks/{hook}/deliveries?{query}", headers=bearer(admin))
        ).json()
        seen += [a["attempt"] for a in page["deliveries"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [5, 4, 3, 2, 1]


async def test_a_huge_2xx_answer_is_read_only_up_to_the_limit(
    config: Config, receiver: Receiver
) -> None:
    receiver.script = ["huge_ok"]
    result = await client.post(receiver.url, "d1", "whsec_x", b"{}", config.webhooks)
    assert result.outcome == "delivered" and result.status == 200
    assert MAX_BODY <= result.read < MAX_BODY + 65536 * 2  # at most one read past the limit
    await until(lambda: receiver.flooded, "the receiver to notice the client left")
    (flooded,) = receiver.flooded
    assert flooded < HUGE_CAP


async def test_endpoint_disabled_after_consecutive_failed_deliveries_and_reenabled(
    api: Client, resources: Resources, receiver: Receiver
) -> None:
    admin = await issue_key(resources, ["admin"])
    hook = (await create_hook(api, admin, receiver.url, ["member.added"]))["id"]
    one_attempt = dataclasses.replace(
        resources,
        config=resources.config.model_copy(
            update={"webhooks": resources.config.webhooks.model_copy(update={"max_attempts": 1})}
        ),
    )
    receiver.script = ["fail", "fail", "fail"]
    ev = [event("member.added", {"principal": "user:c"})]
    for expected_failures in (1, 2):
        async with resources.connection() as conn:
            assert await emit(conn, ev) == 1
        ((job, _),) = await queued(resources, hook)
        await deliver(one_attempt, msgspec.json.encode(job))
        assert await queued(resources, hook) == []  # the one attempt was the last
        state = (await api.get(f"/v1/webhooks/{hook}", headers=bearer(admin))).json()
        assert state["failures"] == expected_failures
    assert state["enabled"] is False and state["disabled_reason"] == "failures"
    # disabled: nothing is queued for it any more
    async with resources.connection() as conn:
        assert await emit(conn, ev) == 0
    # a PATCH that leaves enabled alone keeps it disabled for failures
    kept = await api.patch(
        f"/v1/webhooks/{hook}", json={"description": "still off"}, headers=bearer(admin)
    )
    assert kept.json()["disabled_reason"] == "failures" and kept.json()["failures"] == 2

    enabled = await api.patch(f"/v1/webhooks/{hook}", json={"enabled": True}, headers=bearer(admin))
    assert enabled.status_code == 200
    assert (enabled.json()["enabled"], enabled.json()["failures"]) == (True, 0)
    assert enabled.json()["disabled_reason"] is None
    async with resources.connection() as conn:
        assert await emit(conn, ev) == 1
    ((job, _),) = await queued(resources, hook)
    await deliver(one_attempt, msgspec.json.encode(job))  # the receiver's third "fail"
    state = (await api.get(f"/v1/webhooks/{hook}", headers=bearer(admin))).json()
    assert (state["enabled"], state["failures"]) == (True, 1)


async def test_deliveries_queued_for_a_disabled_or_deleted_endpoint_are_dropped(
    api: Client, resources: Resources, receiver: Receiver
) -> None:
    admin = await issue_key(resources, ["admin"])
    hook = (await create_hook(api, admin, receiver.url, ["member.added"]))["id"]
    async with resources.connection() as conn:
        assert await emit(conn, [event("member.added", {}), event("member.added", {})]) == 1
    ((job, _),) = await queued(resources, hook)
    await api.patch(f"/v1/webhooks/{hook}", json={"enabled": False}, headers=bearer(admin))
    await deliver(resources, msgspec.json.encode(job))
    await api.delete(f"/v1/webhooks/{hook}", headers=bearer(admin))
    await deliver(resources, msgspec.json.encode(job))
    assert receiver.requests == []
    assert await queued(resources, hook) == []


# -- addresses -------------------------------------------------------------------------------


async def test_private_literal_addresses_are_refused_at_create(
    settings: dict[str, Any], resources: Resources
) -> None:
    """The fixture's app allows private addresses; the check reads the app's config, so this
    test builds its own app without them."""
    settings["webhooks"]["allow_private"] = False
    from appliance.api.app import create_app

    admin = await issue_key(resources, ["admin"])
    urls = ["http://127.0.0.1/", "http://169.254.169.254/latest/meta-data/", "http://[::1]:8080/",
            "http://10.1.2.3/", "http://192.168.0.1/", "http://100.64.0.1/", "http://[fd00::1]/",
            "http://0.0.0.0/", "http://224.0.0.1/", "http://[::ffff:127.0.0.1]/",
            "http://[64:ff9b::a9fe:a9fe]/", "http://[fe80::1]/"]  # fmt: skip
    async with AsyncTestClient(app=create_app(Config.model_validate(settings))) as strict:
        for url in urls:
            response = await strict.post(
                "/v1/webhooks", json={"url": url, "events": ["export.ready"]}, headers=bearer(admin)
            )
            assert response.status_code == 400, (url, response.text)
            assert response.json()["error"]["field"] == "url"
            assert "allow_private" in response.json()["error"]["message"]
        public = await strict.post(
            "/v1/webhooks",
            json={"url": "https://8.8.8.8/in", "events": ["export.ready"]},
            headers=bearer(admin),
        )
        assert public.status_code == 201, public.text


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:{port}/", "http://localhost:{port}/", "http://[::1]:{port}/",
     "http://169.254.169.254/", "http://127.1:{port}/"],
)  # fmt: skip
async def test_private_addresses_are_refused_at_delivery(
    api: Client, resources: Resources, receiver: Receiver, url: str
) -> None:
    """An endpoint registered while private addresses were allowed (or a name that resolves to
    one later): the attempt is refused before connecting, logged, and retried like any failure."""
    admin = await issue_key(resources, ["admin"])
    hook = (await create_hook(api, admin, url.format(port=receiver.port), ["member.added"]))["id"]
    strict = dataclasses.replace(
        resources,
        config=resources.config.model_copy(
            update={
                "webhooks": resources.config.webhooks.model_copy(update={"allow_private": False})
            }
        ),
    )
    async with resources.connection() as conn:
        await emit(conn, [event("member.added", {})])
    ((job, _),) = await queued(resources, hook)
    await deliver(strict, msgspec.json.encode(job))
    assert receiver.requests == []  # never connected
    (logged,) = await attempts(api, admin, hook)
    assert (logged["outcome"], logged["status"]) == ("refused", None)
    assert "allow_private" in logged["error"]
    assert logged["retry_at"] is not None
    ((retry, _),) = await queued(resources, hook)
    assert retry.attempt == 2


async def test_delivery_connects_to_the_address_it_checked() -> None:
    """The Host header and TLS name are the URL's; the connection goes to the vetted address."""
    target = await addresses.resolve("https://localhost:8443/p?q=1", allow_private=True)
    assert target.ips and all(ip.is_loopback for ip in target.ips)
    assert target.url(target.ips[0]) in ("https://127.0.0.1:8443/p?q=1", "https://[::1]:8443/p?q=1")
    assert target.host_header() == "localhost:8443"
    v6 = await addresses.resolve("http://[::1]/", allow_private=True)
    assert (v6.url(v6.ips[0]), v6.host_header()) == ("http://[::1]:80/", "[::1]")
    with pytest.raises(addresses.Unreachable, match="did not resolve"):
        await addresses.resolve("http://no-such-host.invalid/", allow_private=True)
    with pytest.raises(addresses.Unreachable, match="loopback"):
        await addresses.resolve("http://localhost/", allow_private=False)
    public = await addresses.resolve("http://8.8.8.8/", allow_private=False)
    assert (public.ips, public.port, public.path) == ((ipaddress.ip_address("8.8.8.8"),), 80, "/")


# Python 3.11's ipaddress calls fec0::1 (site-local) global; the rest is listed as a table so
# that a Python upgrade changing is_private/is_global cannot open a range silently.
REFUSED = {
    "0.1.2.3": "this-network", "10.0.0.1": "private", "100.64.0.1": "shared (CGNAT)",
    "100.127.255.255": "shared (CGNAT)", "127.0.0.1": "loopback", "169.254.169.254": "link-local",
    "172.16.0.1": "private", "192.0.0.1": "private", "192.0.2.1": "private",
    "192.168.1.1": "private", "198.18.0.1": "benchmarking", "198.19.255.255": "benchmarking",
    "198.51.100.1": "private", "203.0.113.1": "private", "224.0.0.1": "multicast",
    "240.0.0.1": "reserved", "255.255.255.255": "reserved", "0.0.0.0": "unspecified",
    "::": "unspecified", "::1": "loopback", "fe80::1": "link-local", "fec0::1": "site-local",
    "feff::1": "site-local", "fc00::1": "private", "fd12:3456::1": "private",
    "ff02::1": "multicast", "2001:db8::1": "private", "100::1": "reserved",
    "::8.8.8.8": "IPv4-compatible", "::127.0.0.1": "IPv4-compatible",
    "::ffff:127.0.0.1": "loopback (embedded in IPv6)",
    "::ffff:10.0.0.1": "private (embedded in IPv6)",
    "::ffff:0:a00:1": "reserved",  # IPv4-translated ::ffff:0:a.b.c.d (inside ::/8)
    "2002:a9fe:a9fe::1": "link-local (embedded in IPv6)",  # 6to4 of 169.254.169.254
    "2002:c612::1": "benchmarking (embedded in IPv6)",
    # Teredo: server 65.54.227.120 (public), client 10.0.0.1 (obfuscated as f5ff:fffe)
    "2001:0:4136:e378:8000:63bf:f5ff:fffe": "private (embedded in IPv6)",
    # Teredo: server 10.0.0.1 (private), client 8.8.8.8
    "2001:0:a00:1:0:0:f7f7:f7f7": "private (embedded in IPv6)",
    "64:ff9b::a9fe:a9fe": "link-local (embedded in IPv6)",
    "64:ff9b::c612:1": "benchmarking (embedded in IPv6)",
    "64:ff9b::6440:1": "shared (CGNAT) (embedded in IPv6)", "64:ff9b:1::a00:1": "reserved",
}  # fmt: skip
PUBLIC = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1",
          "64:ff9b::808:808", "2001:0:4136:e378:8000:63bf:f7f7:f7f7"]  # fmt: skip


def test_refused_addresses_table() -> None:
    for address, reason in REFUSED.items():
        assert addresses.refused(ipaddress.ip_address(address)) == reason, address
    for address in PUBLIC:
        assert addresses.refused(ipaddress.ip_address(address)) is None, address


class Lookups:
    """A DNS stand-in for the resolver's threads: answers 127.0.0.1 for every name, counts the
    lookups, and for names starting "slow" blocks until `release` is set (a hung resolver)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.release = threading.Event()

    def __call__(self, host: str, port: int) -> list[tuple[Any, ...]]:
        self.calls.append(host)
        if host.startswith("slow"):
            self.release.wait(30)
        return socket.getaddrinfo("127.0.0.1", port, type=socket.SOCK_STREAM)


async def test_dns_answers_are_kept_and_checked_on_every_use() -> None:
    lookups = Lookups()
    dns = addresses.Resolver(lookups, ttl=3600)
    first = await addresses.resolve("http://a.example/x", allow_private=True, dns=dns)
    again = await addresses.resolve("http://a.example/y", allow_private=True, dns=dns)
    assert first.ips == again.ips == (ipaddress.ip_address("127.0.0.1"),)
    assert lookups.calls == ["a.example"]  # the second came from the cache
    with pytest.raises(addresses.Unreachable, match="loopback"):  # a kept answer is still vetted
        await addresses.resolve("http://a.example/", allow_private=False, dns=dns)
    await addresses.resolve("http://a.example:8080/", allow_private=True, dns=dns)
    assert lookups.calls == ["a.example", "a.example"]  # another port, another lookup
    expiring = addresses.Resolver(lookups, ttl=0)
    for _ in range(2):
        await addresses.resolve("http://b.example/", allow_private=True, dns=expiring)
    assert lookups.calls.count("b.example") == 2
    bounded = addresses.Resolver(lookups, ttl=3600, size=2)
    for name in ("c1", "c2", "c3", "c1"):
        await bounded.addresses(name, 80)
    assert lookups.calls.count("c1") == 2  # the oldest answer went when a third came
    for resolver in (dns, expiring, bounded):
        resolver.close()


async def test_hung_dns_holds_only_the_resolvers_own_threads() -> None:
    """Lookups that never return time out, keep at most `threads` threads of the resolver's own
    busy, and leave the loop's default executor (asyncio.to_thread) and kept answers alone."""
    lookups = Lookups()
    dns = addresses.Resolver(lookups, threads=2)
    before = set(threading.enumerate())
    await dns.addresses("kept.example", 80)

    async def slow(n: int) -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await dns.addresses(f"slow{n}.example", 80)

    try:
        await asyncio.gather(*(slow(n) for n in range(40)))
        assert dns.busy == 2  # two threads stuck; the other 38 waited for one and gave up
        assert sum(1 for h in lookups.calls if h.startswith("slow")) == 2
        started = [t.name for t in set(threading.enumerate()) - before]
        assert len(started) == 2 and all(n.startswith("webhook-dns") for n in started)
        assert await asyncio.to_thread(lambda: "free") == "free"
        assert await dns.addresses("kept.example", 80) == (ipaddress.ip_address("127.0.0.1"),)
    finally:
        lookups.release.set()
    await until(lambda: dns.busy == 0, "the hung lookups to return")
    assert await dns.addresses("after.example", 80)  # the threads serve again
    dns.close()


async def test_deliveries_reuse_a_connection_per_host_and_address(config: Config) -> None:
    """Two deliveries to one URL share a connection; another host name on the same address
    gets its own (a TLS connection is verified for one name); closing the clients closes them."""
    cfg = config.webhooks
    async with Receiver() as receiver:
        for n in range(3):
            done = await client.post(receiver.url, f"d{n}", "whsec_x", b"{}", cfg)
            assert done.ok, done.error
        assert (len(receiver.requests), receiver.connections) == (3, 1)
        by_name = f"http://localhost:{receiver.port}/hook"
        target = await addresses.resolve(by_name, allow_private=True)
        if ipaddress.ip_address("127.0.0.1") in target.ips:  # localhost may be ::1 first
            target = dataclasses.replace(target, ips=(ipaddress.ip_address("127.0.0.1"),))
            status, _, _ = await client.exchange(target, b"{}", {}, MAX_BODY, 5)
            assert status == 200 and receiver.connections == 2
        assert len(client.clients()) == receiver.connections
        await client.close_clients()
        await until(lambda: receiver.closed == receiver.connections, "the clients to close")
        assert len(client.clients()) == 0  # a fresh set for the loop


async def test_a_kept_connection_closed_under_a_delivery_is_tried_once_more(
    config: Config,
) -> None:
    """A receiver whose keep-alive ran out closes the kept connection as it is reused: the
    delivery goes again on a new one. On a new connection, the same is a failed attempt."""
    async with Receiver() as receiver:
        receiver.script = ["ok", "drop", "ok", "drop", "drop"]
        first = await client.post(receiver.url, "d1", "whsec_x", b"{}", config.webhooks)
        again = await client.post(receiver.url, "d2", "whsec_x", b"{}", config.webhooks)
        assert first.ok and again.ok, again.error
        assert (len(receiver.requests), receiver.connections) == (3, 2)
        failed = await client.post(receiver.url, "d3", "whsec_x", b"{}", config.webhooks)
        assert failed.outcome == "connection" and "disconnected" in (failed.error or "").lower()
        assert (len(receiver.requests), receiver.connections) == (5, 3)  # once more, not twice
        await client.close_clients()
        fresh = await client.post(receiver.url, "d4", "whsec_x", b"{}", config.webhooks)
        assert fresh.ok and receiver.connections == 4


async def test_kept_clients_idle_out_and_are_bounded() -> None:
    async with Receiver() as receiver:
        pool = client.Clients(idle=0.0, size=2)
        target = await addresses.resolve(receiver.url, allow_private=True)
        ip = target.ips[0]
        tls = ssl.create_default_context()
        async with pool.lease(target, ip, tls) as http:
            assert (await http.post(target.url(ip), content=b"{}")).status_code == 200
        assert len(pool) == 1
        async with pool.lease(target, ip, tls):  # the idle one was closed first
            assert len(pool) == 1
        await until(lambda: receiver.closed == 1, "the idle client to close")
        pool = client.Clients(size=1)
        other = dataclasses.replace(target, host="other.example")
        async with pool.lease(target, ip, tls), pool.lease(other, ip, tls) as once:
            assert len(pool) == 1  # full and in use: a client of its own, closed after
            assert (await once.post(target.url(ip), content=b"{}")).status_code == 200
        async with pool.lease(other, ip, tls):  # full, the other idle: it makes room
            assert len(pool) == 1
        await pool.aclose()
        assert len(pool) == 0


async def test_the_next_vetted_address_is_tried_when_connecting_fails(
    receiver: Receiver,
) -> None:
    """A host with several addresses (IPv6 first, say) and a receiver on one of them."""
    ips = (ipaddress.ip_address("127.0.0.2"), ipaddress.ip_address("127.0.0.1"))
    target = addresses.Target("http", "localhost", ips, receiver.port, "/hook")
    async with asyncio.timeout(30):
        status, _, _ = await client.exchange(target, b"{}", {"Host": "localhost"}, MAX_BODY, 10)
    assert status == 200 and len(receiver.requests) == 1
    nowhere = addresses.Target("http", "localhost", ips[:1], receiver.port, "/hook")
    with pytest.raises(httpx.ConnectError):
        async with asyncio.timeout(30):
            await client.exchange(nowhere, b"{}", {"Host": "localhost"}, MAX_BODY, 10)


def _certificates(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A CA of the test's own and a server certificate from it for `localhost` only: the
    server's TLS context and a client context trusting that CA (and nothing else)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("test ca")).issuer_name(name("test ca"))
        .public_key(ca_key.public_key()).serial_number(1)
        .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    leaf = (
        x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(2)
        .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    chain, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(chain, key_file)
    trusting = ssl.create_default_context(
        cadata=ca.public_bytes(serialization.Encoding.PEM).decode()
    )
    return server, trusting


async def test_https_delivery_verifies_the_certificate_against_the_url_host(
    config: Config, tmp_path: Path
) -> None:
    """The connection goes to the vetted IP, but TLS names and verifies the URL's host."""
    server, trusting = _certificates(tmp_path)
    async with Receiver(tls=server) as receiver:
        url = f"https://localhost:{receiver.port}/hook"
        ok = await client.post(url, "d1", "whsec_x", b"{}", config.webhooks, tls=trusting)
        assert (ok.outcome, ok.status) == ("delivered", 200), ok.error
        ((_, headers, _),) = receiver.requests
        assert headers["host"] == f"localhost:{receiver.port}"
        # the same server by its IP: the certificate names localhost only
        by_ip = f"https://127.0.0.1:{receiver.port}/hook"
        mismatch = await client.post(by_ip, "d2", "whsec_x", b"{}", config.webhooks, tls=trusting)
        assert mismatch.outcome == "connection" and "certificate" in (mismatch.error or "").lower()
        # a CA nobody trusts (the system's CAs do not include the test's)
        untrusted = await client.post(url, "d3", "whsec_x", b"{}", config.webhooks)
        assert untrusted.outcome == "connection"
        assert "certificate" in (untrusted.error or "").lower()
        assert len(receiver.requests) == 1


async def test_a_refused_connection_is_a_failed_attempt(config: Config) -> None:
    from tests.support import free_port

    url = f"http://127.0.0.1:{free_port()}/"
    result = await client.post(url, "d1", "whsec_x", b"{}", config.webhooks)
    assert result.outcome == "connection" and result.status is None and result.error


# -- retention -------------------------------------------------------------------------------


async def test_prune_deletes_exactly_the_rows_past_keep_days(resources: Resources) -> None:
    keep_days = resources.config.schedules.prune_webhook_deliveries.keep_days
    endpoint = unique("wh_prune")
    now = datetime.now(UTC)
    ages = {"old-400": 400, "old-45": 45, "old-edge": keep_days + 1, "new-edge": keep_days - 1,
            "new-0": 0}  # fmt: skip
    async with resources.connection() as conn:
        for delivery, days in ages.items():
            await conn.execute(
                "INSERT INTO webhook_deliveries (at, endpoint, delivery, attempt, event_count,"
                " event_types, outcome, duration_ms)"
                " VALUES (%s, %s, %s, 1, 1, '{}', 'delivered', 1)",
                (now - timedelta(days=days), endpoint, delivery),
            )

    async def remaining() -> list[str]:
        async with resources.connection() as conn:
            cur = await conn.execute(
                "SELECT delivery FROM webhook_deliveries WHERE endpoint = %s ORDER BY delivery",
                (endpoint,),
            )
            return [r[0] for r in await cur.fetchall()]

    (entry,) = [e for e in SCHEDULES if e.name == "prune_webhook_deliveries"]
    assert entry.retention and entry.run is retention.run
    dry = await retention.run(resources, Run(dry_run=True))
    assert dry["deleted"] == 3  # other tests' rows are all recent
    assert len(await remaining()) == 5  # a dry run changes nothing
    progress: list[tuple[int, int | None]] = []
    done = await retention.run(resources, Run(progress=lambda d, t: progress.append((d, t))))
    assert done["deleted"] == dry["deleted"]
    assert await remaining() == ["new-0", "new-edge"]
    assert progress[-1] == (done["deleted"], done["deleted"])
    assert (await retention.run(resources, Run()))["deleted"] == 0


# -- CLI -------------------------------------------------------------------------------------


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`appliance <args>` in-process (CliRunner), answered as `tests.test_cli.cli`."""
    done = CliRunner().invoke(main, list(args), env={"APPLIANCE_CONFIG": str(config)})
    return subprocess.CompletedProcess(list(args), done.exit_code, done.stdout, done.stderr)


def test_cli_manages_endpoints(settings: dict[str, Any], migrated: str, tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", settings)
    done = run_cli(config, "webhooks", "create", "--url", "https://h.example.com/in",
                   "--event", "member.added", "--event", "export.ready", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    created = json.loads(done.stdout)
    hook = created["id"]
    assert created["secret"].startswith("whsec_")
    assert created["events"] == ["export.ready", "member.added"]

    # One real subprocess: the installed entry point wires the command.
    listed = json.loads(cli(config, "webhooks", "list", "--json").stdout)
    assert next(w for w in listed if w["id"] == hook)["url"] == "https://h.example.com/in"
    assert all("secret" not in w for w in listed)
    disabled = json.loads(run_cli(config, "webhooks", "disable", hook, "--json").stdout)
    assert (disabled["enabled"], disabled["disabled_reason"]) == (False, "admin")
    status = run_cli(config, "status", "--json")
    assert json.loads(status.stdout)["webhooks"] == {
        "enabled": 0, "failing": 0, "disabled_admin": 1, "disabled_failures": 0
    }  # fmt: skip
    enabled = json.loads(run_cli(config, "webhooks", "enable", hook, "--json").stdout)
    assert (enabled["enabled"], enabled["failures"]) == (True, 0)
    page = json.loads(run_cli(config, "webhooks", "deliveries", hook, "--json").stdout)
    assert page == {"deliveries": [], "next_cursor": None}
    human = run_cli(config, "webhooks", "list")
    assert hook in human.stdout and "enabled" in human.stdout
    deleted = run_cli(config, "webhooks", "delete", hook, "--json")
    assert deleted.returncode == 0 and json.loads(deleted.stdout)["id"] == hook

    gone = run_cli(config, "webhooks", "delete", hook)
    assert gone.returncode == 1 and "webhook" in gone.stderr
    bad = run_cli(config, "webhooks", "create", "--url", "ftp://x/", "--event", "member.added")
    assert bad.returncode == 1 and "http or https" in bad.stderr
    bad_event = run_cli(config, "webhooks", "create", "--url", "https://x/", "--event", "nope")
    assert bad_event.returncode == 2 and "nope" in bad_event.stderr
