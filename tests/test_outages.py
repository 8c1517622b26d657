"""Outages: PostgreSQL or Redis stops answering while the api runs, then comes back.

HTTP routes answer 503 `unavailable` naming the dependency, with `Retry-After: 1`, never 500, and
work again once it is back. On `/v1/stream` an op that cannot reach a dependency gets an
`unavailable` error event and the socket lives on; authentication that cannot reach one sends
the event and closes with 1013. Each dependency that fails is the test's own server
(`private_redis`, `private_postgres`) and is really stopped. Recovery is polled with a bound:
nothing here asserts on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg
import pytest
from litestar.testing import AsyncTestClient
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from appliance.api.app import create_app
from appliance.auth import keys
from appliance.auth.principal import Scope
from appliance.config import Config
from appliance.config.model import PostgresSection
from appliance.db.migrate import migrate
from appliance.db.pool import Pool, PostgresDown, open_pool
from appliance.invalidation import Invalidation, announce
from appliance.redis_keys import client
from appliance.resources import Resources, keys_for
from appliance.storage import Storage
from tests.api_process import ApiProcess, api_settings
from tests.messaging import bearer, body, issue_key, unique
from tests.test_stream import (
    NOISE,
    TIMEOUT,
    api_client,
    closed,
    expect,
    recv,
    send,
    subscribe,
    within,
)

Client = AsyncTestClient[Any]
PrivateRedis = tuple[int, Callable[[], None], Callable[[], None]]  # port, start, kill
PrivatePostgres = tuple[str, Callable[[], None], Callable[[], None]]  # dsn, start, kill
T = TypeVar("T")
RECOVERY = 60.0  # bound on a dependency being used again once back (the pool's reconnect back-off)


def unavailable(dependency: str, **extra: Any) -> dict[str, Any]:
    """The error a caller is told when `dependency` does not answer (HTTP body or event)."""
    message = f"{dependency} is unavailable, retry later"
    return {"code": "unavailable", "message": message, "field": None, **extra}


def assert_unavailable(response: httpx.Response, dependency: str) -> None:
    assert response.status_code == 503, response.text
    assert response.json() == {"error": unavailable(dependency)}
    assert response.headers["retry-after"] == "1"


async def eventually(attempt: Callable[[], Awaitable[T | None]], what: str) -> T:
    """Repeat `attempt` until it returns something; fail naming `what` after RECOVERY seconds."""
    deadline = time.monotonic() + RECOVERY
    while (result := await attempt()) is None:
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {RECOVERY}s")
        await asyncio.sleep(0.2)
    return result


async def once_back(
    request: Callable[[], Awaitable[httpx.Response]], status: int, dependency: str
) -> httpx.Response:
    """Repeat `request` until it answers `status`; until then, only the 503 for `dependency`."""

    async def attempt() -> httpx.Response | None:
        response = await request()
        if response.status_code == status:
            return response
        assert_unavailable(response, dependency)
        return None

    return await eventually(attempt, f"{status} once {dependency} was back")


async def migrate_with_keys(dsn: str, *scopes: list[Scope]) -> list[str]:
    """Migrate the empty database at `dsn` (a private server's) and issue one key per list of
    scopes in it."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await migrate(conn)
        made = [
            await keys.create(conn, keys.KeyCreate(name=unique("key"), scopes=s)) for s in scopes
        ]
    return [issued.key for issued in made]


async def create_conversation(
    client: Client | httpx.AsyncClient, key: str, name: str | None = None
) -> httpx.Response:
    return await client.post(
        "/v1/conversations", json={"conversation": name or unique("c")}, headers=bearer(key)
    )


# -- HTTP, in-process ----------------------------------------------------------------------------


async def test_http_routes_answer_503_while_redis_is_down(
    settings: dict[str, Any], resources: Resources, private_redis: PrivateRedis
) -> None:
    port, start, kill = private_redis
    settings["redis"]["url"] = f"redis://127.0.0.1:{port}/0"
    settings["redis"]["connect_timeout"] = 0.5
    settings["appliance"]["roles"] = ["api"]
    key = await issue_key(resources, ["admin"])  # in the run's database: only Redis is private
    async with AsyncTestClient(app=create_app(Config.model_validate(settings))) as client:
        created = await create_conversation(client, key)
        assert created.status_code == 201, created.text
        conversation = created.json()["conversation"]
        base = f"/v1/conversations/{conversation}"

        def publish() -> Awaitable[httpx.Response]:
            return client.post(f"{base}/messages", json=body(), headers=bearer(key))

        kill()
        assert_unavailable(await publish(), "redis")
        for path in ("messages", "receipts", "presence"):
            assert_unavailable(await client.get(f"{base}/{path}", headers=bearer(key)), "redis")

        start()
        ack = (await once_back(publish, 201, "redis")).json()
        assert (ack["conversation"], ack["seq"]) == (conversation, 1)
        history = await client.get(f"{base}/messages", headers=bearer(key))
        assert history.status_code == 200, history.text
        assert [m["id"] for m in history.json()["messages"]] == [ack["id"]]


async def test_changes_committed_while_redis_is_down_are_answered_and_applied_here(
    settings: dict[str, Any], resources: Resources, private_redis: PrivateRedis
) -> None:
    """A change PostgreSQL committed is not reported as failed because its announcement could
    not be sent: the caller would retry it (a second rotation ends the old secret at once). This
    process applies it at once; the others within their cache TTL."""
    port, _, kill = private_redis
    settings["redis"]["url"] = f"redis://127.0.0.1:{port}/0"
    settings["redis"]["connect_timeout"] = 0.5
    settings["appliance"]["roles"] = ["api"]
    admin = await issue_key(resources, ["admin"])
    rotated, revoked = await issue_key(resources, ["read"]), await issue_key(resources, ["read"])
    async with AsyncTestClient(app=create_app(Config.model_validate(settings))) as client:
        created = await create_conversation(client, admin)
        conversation = created.json()["conversation"]
        base = f"/v1/conversations/{conversation}"
        for key in (rotated, revoked):  # cached by this process from here on
            assert (await client.get(base, headers=bearer(key))).status_code == 200
        kill()
        response = await client.post(
            f"/v1/keys/{rotated.split('_')[1]}/rotate", json={"grace": 0}, headers=bearer(admin)
        )
        assert response.status_code == 200, response.text
        new_key = response.json()["key"]
        assert (await client.get(base, headers=bearer(new_key))).status_code == 200
        assert (await client.get(base, headers=bearer(rotated))).status_code == 401
        response = await client.delete(f"/v1/keys/{revoked.split('_')[1]}", headers=bearer(admin))
        assert response.status_code == 200, response.text
        refused = await client.get(base, headers=bearer(revoked))
        assert (refused.status_code, refused.json()["error"]["code"]) == (401, "key_revoked")
        member = f"user:{unique('m')}"
        put = await client.put(
            f"{base}/members/{member}", json={"role": "member"}, headers=bearer(admin)
        )
        assert put.status_code == 200, put.text
        assert (await create_conversation(client, admin)).status_code == 201
        assert (await client.delete(base, headers=bearer(admin))).status_code == 204
        assert (await client.get(base, headers=bearer(admin))).status_code == 404


async def test_http_routes_answer_503_while_postgres_is_down(
    settings: dict[str, Any], private_postgres: PrivatePostgres
) -> None:
    dsn, start, kill = private_postgres
    used, fresh = await migrate_with_keys(dsn, ["admin"], ["admin"])
    settings["postgres"].update(dsn=dsn, connect_timeout=1.0)
    settings["appliance"]["roles"] = ["api"]
    async with AsyncTestClient(app=create_app(Config.model_validate(settings))) as client:
        created = await create_conversation(client, used)  # `used` is cached from here on
        assert created.status_code == 201, created.text
        conversation = created.json()["conversation"]

        def view() -> Awaitable[httpx.Response]:
            return client.get(f"/v1/conversations/{conversation}", headers=bearer(fresh))

        kill()
        assert_unavailable(await view(), "postgresql")  # a key never seen: looked up
        assert_unavailable(await create_conversation(client, used), "postgresql")

        start()
        viewed = await once_back(view, 200, "postgresql")
        assert viewed.json()["conversation"] == conversation
        name = unique("c")
        again = await once_back(lambda: create_conversation(client, used, name), 201, "postgresql")
        assert again.json()["conversation"] == name


# -- WebSocket, against a real api process -------------------------------------------------------


async def expect_one_of(ws: ClientConnection, *events: str) -> dict[str, Any]:
    """The next frame of one of `events`; only noise may come first. Pings come every second,
    so each receive succeeds: the whole wait has its own deadline."""
    async with within(3 * TIMEOUT, f"a frame of one of {events}"):
        while True:
            frame = await recv(ws)
            if frame["event"] in events:
                return frame
            assert frame["event"] in NOISE, f"expected one of {events}, got {frame}"


@pytest.mark.process
async def test_stream_op_gets_unavailable_while_redis_is_down(
    base_settings: dict[str, Any], resources: Resources, tmp_path: Path, private_redis: PrivateRedis
) -> None:
    port, start, kill = private_redis
    settings = api_settings(
        copy.deepcopy(base_settings),
        tmp_path,
        redis={"url": f"redis://127.0.0.1:{port}/0", "connect_timeout": 0.5},
    )
    admin = await issue_key(resources, ["admin"])  # in the run's database: only Redis is private
    proc = ApiProcess(tmp_path, settings).start()
    try:
        async with api_client(proc, admin) as api:
            _, key = await api.key("subscribe")
            first, second = await api.conversation(), await api.conversation()
            async with api.socket(key) as ws:
                await subscribe(ws, first)
                # Ops run one after another: the pong says the subscribe has finished (its
                # catch-up included), so the outage below fails the next op, not this one.
                await send(ws, "ping")
                await expect(ws, "pong")

                kill()
                await send(ws, "subscribe", conversation=second)
                error = (await expect(ws, "error"))["error"]
                assert error == unavailable("redis", conversation=second)
                await send(ws, "ping")
                await expect(ws, "pong")

                start()

                async def subscribed() -> dict[str, Any] | None:
                    await send(ws, "subscribe", conversation=second)
                    frame = await expect_one_of(ws, "subscribed", "error")
                    if frame["event"] == "subscribed":
                        return frame
                    assert frame["error"] == unavailable("redis", conversation=second)
                    return None

                frame = await eventually(subscribed, "a subscribe once redis was back")
                assert (frame["conversation"], frame["seq"]) == (second, 0)
                assert await api.publish(second) == 1
                message = (await expect(ws, "message"))["message"]
                assert (message["conversation"], message["seq"]) == (second, 1)
    finally:
        proc.stop()
        print(proc.log())  # shown by pytest only when a test failed


@pytest.mark.process
async def test_stream_auth_closes_1013_while_postgres_is_down(
    base_settings: dict[str, Any], tmp_path: Path, private_postgres: PrivatePostgres
) -> None:
    dsn, start, kill = private_postgres
    (key,) = await migrate_with_keys(dsn, ["subscribe"])
    settings = api_settings(
        copy.deepcopy(base_settings), tmp_path, postgres={"dsn": dsn, "connect_timeout": 1.0}
    )
    proc = ApiProcess(tmp_path, settings).start()
    try:

        def socket() -> Any:
            return connect(proc.ws_url, additional_headers=bearer(key), open_timeout=TIMEOUT)

        kill()
        async with socket() as ws:  # a key never seen by this process: looked up
            code, reason, frames = await closed(ws)
        assert frames == [{"event": "error", "error": unavailable("postgresql")}]
        assert (code, reason) == (1013, "unavailable")

        start()

        async def accepted() -> bool | None:
            async with socket() as ws:
                # Refused, the socket may be closing before the ping goes out: the error
                # frame is read all the same.
                with contextlib.suppress(ConnectionClosed):
                    await send(ws, "ping")
                frame = await expect_one_of(ws, "pong", "error")
                if frame["event"] == "pong":
                    return True
                assert frame["error"] == unavailable("postgresql")
                assert await closed(ws) == (1013, "unavailable", [])
                return None

        await eventually(accepted, "a socket accepted once postgresql was back")
    finally:
        proc.stop()
        print(proc.log())


# -- PostgreSQL outages: known down, stale caches, recovery --------------------------------------

OUTAGE = 8.0  # seconds PostgreSQL stays down: past the test's cache TTLs and several of
# psycopg_pool's reconnect back-off steps (1, 2, 4 s...), which must not delay recovery
BACK_WITHIN = 5.0  # the product's bound is one probe interval (0.5 s) and a connect; the rest
# is margin for a loaded 2-core machine
WAIT = 30.0  # connect_timeout (and check_timeout) of these tests: what a caller would wait out
FAST = WAIT / 3  # an answer this soon did not wait it out, however loaded the machine


async def timed(request: Awaitable[T]) -> tuple[T, float]:
    started = time.monotonic()
    result = await request
    return result, time.monotonic() - started


async def back(request: Callable[[], Awaitable[httpx.Response]], status: int) -> float:
    """Seconds until `request` answers `status` (polled every 50 ms, failing after RECOVERY)."""
    started = time.monotonic()
    while (response := await request()).status_code != status:
        if time.monotonic() - started > RECOVERY:
            pytest.fail(f"no {status} within {RECOVERY}s: {response.status_code} {response.text}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_the_pool_fails_fast_while_postgres_is_down_and_is_back_at_once(
    private_postgres: PrivatePostgres,
) -> None:
    dsn, start, kill = private_postgres
    # A long pool timeout: a caller let go well before it was let go by the pool's knowing.
    section = PostgresSection(dsn=dsn, pool_min=1, pool_max=1, connect_timeout=WAIT)
    async with open_pool(section, "test") as pool:
        holder = await pool.getconn()  # the only connection: the next caller waits
        waiter = asyncio.create_task(pool.getconn())
        waiting_since = time.monotonic()
        await asyncio.to_thread(kill)
        with pytest.raises(psycopg.OperationalError):
            await holder.execute("SELECT 1")  # the connection broke
        await pool.putconn(holder)
        with pytest.raises(PostgresDown):
            await waiter
        waited = time.monotonic() - waiting_since
        print(f"a waiting caller was let go after {waited:.2f}s (pool timeout {WAIT:g}s)")
        assert waited < FAST
        assert pool.down
        outage_began = time.monotonic()
        while time.monotonic() - outage_began < OUTAGE:  # every caller fails at once meanwhile
            started = time.monotonic()
            with pytest.raises(PostgresDown):
                await pool.getconn()
            assert time.monotonic() - started < FAST
            await asyncio.sleep(0.1)

        await asyncio.to_thread(start)

        async def select() -> bool:
            with contextlib.suppress(PostgresDown):
                async with pool.connection() as conn:
                    await conn.execute("SELECT 1")
                    return True
            return False

        started = time.monotonic()
        while not await select():
            assert time.monotonic() - started < RECOVERY, "the pool never came back"
            await asyncio.sleep(0.05)
        recovered = time.monotonic() - started
        print(f"pool back {recovered:.2f}s after postgres accepted connections")
        assert recovered <= BACK_WITHIN
        assert not pool.down


class HangingCheck(Pool):
    """A pool whose check of the idle connections never ends (whatever the cause)."""

    def __init__(self, section: PostgresSection, name: str) -> None:
        super().__init__(section, name)
        self.checking = asyncio.Event()

    async def check(self) -> None:
        self.checking.set()
        await asyncio.Event().wait()


async def test_a_check_that_hangs_does_not_keep_the_pool_down(
    private_postgres: PrivatePostgres,
) -> None:
    dsn, start, kill = private_postgres
    pool = HangingCheck(PostgresSection(dsn=dsn, pool_min=1, pool_max=2), "test")
    await pool.open(wait=False)
    try:
        await asyncio.to_thread(kill)
        pool.suspect("the test stopped postgresql")
        await eventually(lambda: asyncio.sleep(0.05, pool.down or None), "the pool going down")
        await asyncio.to_thread(start)
        await eventually(lambda: asyncio.sleep(0.05, not pool.down or None), "the pool back up")
        assert pool.checking.is_set()  # it is back while its check still hangs

        async def select() -> tuple[Any, ...] | None:
            # The idle connection died with the server, and this check never got to it.
            with contextlib.suppress(psycopg.OperationalError):
                async with pool.connection() as conn:
                    return await (await conn.execute("SELECT 1")).fetchone()
            return None

        assert await eventually(select, "a query through the pool") == (1,)
    finally:
        await pool.close()


async def test_an_idle_connection_that_never_answers_is_replaced_by_the_check(
    private_postgres: PrivatePostgres,
) -> None:
    """A half-open connection (here: its backend stopped) fails its check within the connect
    timeout instead of holding `check()`, and so recovery, until TCP gives up on it."""
    dsn, _, _ = private_postgres
    section = PostgresSection(dsn=dsn, pool_min=1, pool_max=1, connect_timeout=1.0)
    async with open_pool(section, "test") as pool:
        async with pool.connection() as conn:
            row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
        assert row is not None
        silent = row[0]
        os.kill(silent, signal.SIGSTOP)
        try:
            await asyncio.wait_for(pool.check(), RECOVERY)
            async with pool.connection() as conn:
                row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
            assert row is not None and row[0] != silent  # a new connection took its place
        finally:
            os.kill(silent, signal.SIGCONT)


class Load:
    """Publishers that post one message after another until stopped, keeping every answer."""

    def __init__(self, http: httpx.AsyncClient, conversation: str) -> None:
        self.http = http
        self.url = f"/v1/conversations/{conversation}/messages"
        self.answers: dict[str, list[tuple[float, int, str]]] = {}  # (sent at, status, body)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, name: str, headers: dict[str, str], workers: int = 2) -> None:
        self.answers[name] = []
        for _ in range(workers):
            self._tasks.append(asyncio.create_task(self._publish(name, headers)))

    async def _publish(self, name: str, headers: dict[str, str]) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            response = await self.http.post(self.url, json=body(), headers=headers)
            self.answers[name].append((sent, response.status_code, response.text))

    def counts(self) -> dict[str, int]:
        return {name: len(answers) for name, answers in self.answers.items()}

    async def __aenter__(self) -> Load:
        return self

    async def __aexit__(self, *_: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


@pytest.mark.process
async def test_known_keys_and_members_publish_through_a_postgres_outage(
    base_settings: dict[str, Any], tmp_path: Path, private_postgres: PrivatePostgres
) -> None:
    """Under continuous publishing by a key and by a member user, PostgreSQL stops for longer
    than the cache TTLs: publishes go on from the caches (stale past the TTL), a call that needs
    PostgreSQL answers 503 at once, a revocation announced through Redis meanwhile holds, and
    everything is back within a probe interval (asserted with margin) of PostgreSQL's return."""
    dsn, start, kill = private_postgres
    admin, publisher, impersonator, doomed, watcher = await migrate_with_keys(
        dsn, ["admin"], ["publish"], ["impersonate"], ["publish"], ["subscribe"]
    )
    settings = api_settings(
        copy.deepcopy(base_settings),
        tmp_path,
        postgres={"dsn": dsn, "connect_timeout": WAIT},
        api={"check_timeout": WAIT},
        auth={"key_cache_ttl": 1.0, "membership_cache_ttl": 1.0, "stale_window": 300.0},
    )
    config = Config.model_validate(settings)
    await Storage.create(config.s3).init()  # the bucket, for /readyz to be 200 at the end
    member = f"user:{unique('m')}"
    proc = ApiProcess(tmp_path, settings).start()
    try:
        async with httpx.AsyncClient(base_url=proc.url, timeout=30.0) as http:
            conversation = unique("c")
            created = await http.post(
                "/v1/conversations",
                json={
                    "conversation": conversation,
                    "members": [{"principal": member, "role": "member"}],
                },
                headers=bearer(admin),
            )
            assert created.status_code == 201, created.text
            as_member = bearer(impersonator, **{"X-On-Behalf-Of": member})
            async with Load(http, conversation) as load:

                def publish(headers: dict[str, str]) -> Awaitable[httpx.Response]:
                    return http.post(load.url, json=body(), headers=headers)

                def create() -> Awaitable[httpx.Response]:
                    return create_conversation(http, admin)

                for headers in (bearer(publisher), as_member, bearer(doomed)):  # now cached
                    assert (await publish(headers)).status_code == 201
                viewed = await http.get(
                    f"/v1/conversations/{conversation}", headers=bearer(watcher)
                )
                assert viewed.status_code == 200, viewed.text
                watcher_cached = time.monotonic()
                # Revoked in PostgreSQL without a word to the api (the announcement comes during
                # the outage), and not used before it: the api holds it as valid.
                async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                    await conn.execute(
                        "UPDATE api_keys SET revoked_at = now() WHERE id = %s",
                        (doomed.split("_")[1],),
                    )
                load.start("key", bearer(publisher))
                load.start("member", as_member)

                await asyncio.to_thread(kill)
                outage_began = time.monotonic()
                before = load.counts()

                async def fast_503() -> bool | None:
                    (response, elapsed) = await timed(create())
                    assert_unavailable(response, "postgresql")
                    return True if elapsed < FAST else None  # the first may find out the hard way

                await eventually(fast_503, "a fast 503 while postgresql is down")
                for _ in range(5):  # known down: every call answers at once, none waits 5 s
                    response, elapsed = await timed(create())
                    assert_unavailable(response, "postgresql")
                    assert elapsed < FAST, (
                        f"{elapsed:.2f}s for a 503 while postgresql is known down"
                    )
                ready, elapsed = await timed(http.get("/readyz"))
                assert ready.status_code == 503 and elapsed < FAST, (ready.text, elapsed)
                checks = {check["name"]: check for check in ready.json()["checks"]}
                assert "known down" in checks["postgres"]["detail"]

                # A socket opened past the TTL, by a key seen before, sees the load live.
                while time.monotonic() < watcher_cached + 1.0:  # the key_cache_ttl above
                    await asyncio.sleep(0.05)
                async with connect(
                    proc.ws_url, additional_headers=bearer(watcher), open_timeout=TIMEOUT
                ) as ws:
                    head = (await subscribe(ws, conversation))["seq"]
                    message = (await expect(ws, "message"))["message"]
                    assert message["seq"] > head

                # Past the TTL, the doomed key is served stale; then its revocation arrives.
                assert (await publish(bearer(doomed))).status_code == 201
                redis = client(config.redis, "test")
                try:
                    event = Invalidation("key", doomed.split("_")[1])
                    assert await announce(redis, keys_for(config), event)
                finally:
                    await redis.aclose()

                async def refused() -> httpx.Response | None:
                    response = await publish(bearer(doomed))
                    return None if response.status_code == 201 else response

                # It cannot be looked up while PostgreSQL is down: refused as unavailable.
                assert_unavailable(await eventually(refused, "the revocation"), "postgresql")

                while time.monotonic() - outage_began < OUTAGE:  # the outage lasts, the load runs
                    assert_unavailable(await create(), "postgresql")
                    await asyncio.sleep(0.2)
                during = {name: n - before[name] for name, n in load.counts().items()}

                restarted = time.monotonic()
                await asyncio.to_thread(start)
                creating, readying = await asyncio.gather(
                    back(create, 201), back(lambda: http.get("/readyz"), 200)
                )
                print(f"back after postgresql: create in {creating:.2f}s, /readyz {readying:.2f}s")
                assert creating <= BACK_WITHIN
                assert readying <= BACK_WITHIN
                revoked = await publish(bearer(doomed))
                assert (revoked.status_code, revoked.json()["error"]["code"]) == (
                    401,
                    "key_revoked",
                )
                for headers in (bearer(publisher), as_member):
                    assert (await publish(headers)).status_code == 201
            served = (await http.get("/metrics")).text
            for cache in ("keys", "conversations", "roles"):  # what the stale path served
                assert f'appliance_cache_stale_served_total{{cache="{cache}"}}' in served
        print(f"publishes during the outage: {during}; in all: {load.counts()}")
        for name, answers in load.answers.items():
            failed = [answer for answer in answers if answer[1] != 201]
            assert not failed, f"{name}: {len(failed)} of {len(answers)} failed: {failed[:3]}"
            # Well past the cache TTL (1 s): these were served stale.
            late = [a for a in answers if outage_began + OUTAGE / 2 < a[0] < restarted]
            assert late, f"{name}: no publish in the second half of the outage"
    finally:
        proc.stop()
        print(proc.log())
