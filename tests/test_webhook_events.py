"""Webhook events: conversation and member events queued in the change's own transaction, and
message.created events from the ingest streams through the dispatcher, against real PostgreSQL,
Redis, S3 and a local HTTP receiver.

Each test has its own database, Redis key prefix and bucket. Conditions are polled with a bound;
nothing asserts timing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from appliance.auth.principal import Principal
from appliance.config import Config
from appliance.conversations import service
from appliance.errors import Conflict, NotFound
from appliance.messages.publish import MessageIn, Publisher
from appliance.programs.worker import run_worker
from appliance.resources import Resources, open_resources
from appliance.segments.flush import GroupFloor, flush_pending, trim_plan
from appliance.webhooks import endpoints
from appliance.webhooks.dispatch import (
    CRASH_ENV,
    ENTRY_OVERHEAD,
    GROUP,
    READ_BYTES,
    READ_TOTAL,
    Dispatcher,
    message_event,
    read_budget,
    shares,
)
from appliance.webhooks.events import Event
from appliance.webhooks.service import DELIVER, Delivery
from tests.support import eventually, migrated_db, write_toml

SENDER = Principal("key:webhook-events", frozenset({"admin"}))
WAIT = 30.0
SHARDS = 4
CONVERSATION_TYPES = [
    "conversation.created",
    "conversation.updated",
    "conversation.deleted",
    "member.added",
    "member.removed",
]


@pytest.fixture
async def env(
    settings: dict[str, Any], fresh_database: Callable[[], str]
) -> AsyncIterator[Resources]:
    """Resources on a database, Redis prefix and bucket of this test's own; private receivers
    allowed, small batches, quick cuts."""
    dsn = fresh_database()
    await migrated_db(dsn)
    settings["postgres"]["dsn"] = dsn
    settings["redis"]["key_prefix"] = f"wh{uuid.uuid4().hex[:10]}"
    settings["s3"]["bucket"] = f"wh-{uuid.uuid4().hex[:12]}"
    settings["segments"] = {"shards": SHARDS, "max_age": 0.3, "lease_ttl": 2.0}
    settings["webhooks"] = {"allow_private": True, "batch_max": 20, "retry_delay": 1.0}
    settings["worker"] = {"poll_interval": 0.5, "heartbeat_timeout": 2.0}
    async with open_resources(Config.model_validate(settings), "test") as res:
        await res.storage.init()
        yield res


async def add_endpoint(res: Resources, url: str, events: list[Any]) -> str:
    async with res.connection() as conn:
        created = await endpoints.create(
            conn, endpoints.WebhookCreate(url=url, events=events), allow_private=True
        )
    return created.id


async def queued(res: Resources) -> list[Delivery]:
    """Every delivery job queued so far, oldest first."""
    async with res.connection() as conn:
        cur = await conn.execute(
            "SELECT payload FROM pgqueuer WHERE entrypoint = %s ORDER BY id", (DELIVER,)
        )
        rows = await cur.fetchall()
    return [msgspec.json.decode(bytes(row[0]), type=Delivery) for row in rows]


def data(event: Event) -> Any:
    """An event's data, decoded (events carry it as JSON bytes)."""
    return msgspec.json.decode(event.data)


def publisher(res: Resources) -> Publisher:
    return Publisher(res.redis, res.keys, res.config.messages, res.connection)


async def publish(res: Resources, conversation: str, n: int) -> list[str]:
    """`n` messages in one batch publish (one Lua call: a burst); their ids."""
    body = msgspec.json.encode({"text": "hello"})
    messages = [MessageIn(type="text", body=msgspec.Raw(body)) for _ in range(n)]
    done = await publisher(res).publish(conversation, SENDER, messages, None, body, batch=True)
    return [ack.id for ack in done.acks]


async def groups(res: Resources) -> set[str]:
    """The consumer groups of the ingest streams, with the shard: "webhooks@2"."""
    found = set()
    for shard in range(SHARDS):
        if await res.redis.exists(res.keys.ingest(shard)):
            for group in await res.redis.xinfo_groups(res.keys.ingest(shard)):
                found.add(f"{group['name'].decode()}@{shard}")
    return found


async def ingest_length(res: Resources) -> int:
    return sum([await res.redis.xlen(res.keys.ingest(s)) for s in range(SHARDS)])


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


class Receiver:
    """A webhook receiver on 127.0.0.1: records each delivery (its Webhook-Id and events) and
    answers 200. HTTP/1.1 with keep-alive, Content-Length bodies only (what the client sends)."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[str, list[dict[str, Any]]]] = []
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readline():  # the request line; b"" at the end
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                events = msgspec.json.decode(body)["events"]
                self.deliveries.append((headers["webhook-id"], events))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def events(self) -> list[dict[str, Any]]:
        return [e for _, events in self.deliveries for e in events]

    def message_ids(self) -> set[str]:
        """Deduplicated by event id, as a receiver does."""
        return {e["id"] for e in self.events() if e["type"] == "message.created"}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    await rec.start()
    yield rec
    await rec.stop()


@asynccontextmanager
async def worker(res: Resources) -> AsyncIterator[None]:
    """The worker program in-process (pgqueuer and the dispatcher) until the block ends."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(res, stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


def in_order_per_conversation(events: list[dict[str, Any]]) -> bool:
    last: dict[str, int] = {}
    for e in events:
        seq = e["data"]["seq"]
        if seq <= last.get(e["conversation"], 0):
            return False
        last[e["conversation"]] = seq
    return True


# -- conversation and member events -----------------------------------------------------------


async def test_conversation_and_member_events_are_queued_with_each_change(
    env: Resources,
) -> None:
    await add_endpoint(env, "http://127.0.0.1:9/hook", CONVERSATION_TYPES)
    name = f"c-{uuid.uuid4().hex[:8]}"
    spec = service.ConversationCreate(
        conversation=name, title="t", members=[service.MemberIn("user:bob", "member")]
    )
    async with env.connection() as conn:
        created = await service.create(conn, spec, "user:alice")
        listed = await service.members(conn, name)
        updated = await service.update(conn, name, service.ConversationPatch(title="u"))
        carol = await service.put_member(conn, name, "user:carol", "reader")
        await service.put_member(conn, name, "user:carol", "reader")  # unchanged: no event
        promoted = await service.put_member(conn, name, "user:carol", "member")
        await service.remove_member(conn, name, "user:bob")
        await service.delete(conn, name)
    events = [e for d in await queued(env) for e in d.events]
    assert [e.type for e in events] == [
        "conversation.created",
        "conversation.updated",
        "member.added",
        "member.added",
        "member.removed",
        "conversation.deleted",
    ]
    assert all(e.conversation == name for e in events)
    assert len({e.id for e in events}) == len(events)
    # The data is what the API returns for each.
    wire = msgspec.to_builtins
    assert data(events[0]) == {**wire(created), "members": wire(listed)}
    assert {m["principal"] for m in data(events[0])["members"]} == {"user:alice", "user:bob"}
    assert data(events[1]) == wire(updated)
    assert data(events[2]) == wire(carol)
    assert data(events[3]) == wire(promoted) and promoted.role == "member"
    assert data(events[4])["principal"] == "user:bob" and data(events[4])["role"] == "member"
    assert data(events[5]) == {**wire(updated), "updated_at": data(events[5])["updated_at"]}


async def test_a_rolled_back_change_queues_no_job(env: Resources) -> None:
    await add_endpoint(env, "http://127.0.0.1:9/hook", CONVERSATION_TYPES)
    name = f"c-{uuid.uuid4().hex[:8]}"

    class Abort(Exception):
        pass

    async with env.connection() as conn:
        with pytest.raises(Abort):
            async with conn.transaction():
                await service.create(conn, service.ConversationCreate(conversation=name), "key:t")
                await service.put_member(conn, name, "user:x", "member")
                assert len(await queued_on(conn)) == 2  # inside the transaction: queued
                raise Abort
        assert not await service.exists(conn, name)
    assert await queued(env) == []

    async with env.connection() as conn:
        await service.create(conn, service.ConversationCreate(conversation=name), "key:t")
        # Refused changes roll back their own transaction: no event for them.
        with pytest.raises(Conflict):
            await service.create(conn, service.ConversationCreate(conversation=name), "key:t")
        with pytest.raises(NotFound):
            await service.remove_member(conn, name, "user:nobody")
        with pytest.raises(NotFound):
            await service.update(conn, "missing", service.ConversationPatch(title="x"))
        with pytest.raises(Abort):
            async with conn.transaction():
                await service.delete(conn, name)
                raise Abort
        assert await service.exists(conn, name)
    assert [e.type for d in await queued(env) for e in d.events] == ["conversation.created"]


async def queued_on(conn: Any) -> list[bytes]:
    cur = await conn.execute("SELECT payload FROM pgqueuer WHERE entrypoint = %s", (DELIVER,))
    return [bytes(r[0]) for r in await cur.fetchall()]


async def test_no_subscriber_no_event_and_no_job(env: Resources) -> None:
    name = f"c-{uuid.uuid4().hex[:8]}"
    await add_endpoint(env, "http://127.0.0.1:9/hook", ["export.ready"])
    async with env.connection() as conn:
        await service.create(conn, service.ConversationCreate(conversation=name), "key:t")
    assert await queued(env) == []


# -- message.created: the dispatcher ----------------------------------------------------------


async def test_no_group_is_made_while_nobody_takes_message_created(env: Resources) -> None:
    endpoint = await add_endpoint(env, "http://127.0.0.1:9/hook", ["conversation.created"])
    await publish(env, "quiet", 3)
    dispatcher = Dispatcher(env)
    assert await dispatcher.step() == -1
    assert not {g for g in await groups(env) if g.startswith(GROUP)}

    async with env.connection() as conn:
        await endpoints.update(
            conn, endpoint, endpoints.WebhookPatch(events=["message.created"]), allow_private=True
        )
    assert await dispatcher.check(force=True)
    assert await dispatcher.step() == 0  # the groups start at "$": nothing older is read
    assert {f"{GROUP}@{s}" for s in range(SHARDS)} <= await groups(env)

    # The last subscriber disabled: the groups go, and the lease with them.
    async with env.connection() as conn:
        await endpoints.update(
            conn, endpoint, endpoints.WebhookPatch(enabled=False), allow_private=True
        )
    assert not await dispatcher.check(force=True)
    assert not {g for g in await groups(env) if g.startswith(GROUP)}
    assert await env.redis.get(env.keys.webhooks_dispatcher()) is None
    assert await queued(env) == []


async def test_a_burst_of_messages_is_emitted_in_batches_in_seq_order(env: Resources) -> None:
    await add_endpoint(env, "http://127.0.0.1:9/hook", ["message.created"])
    dispatcher = Dispatcher(env)
    assert await dispatcher.step() == 0
    ids = {c: await publish(env, c, 30) for c in ("alpha", "beta", "gamma")}
    assert await dispatcher.step() == 90
    deliveries = await queued(env)
    assert len(deliveries) == 90 // env.config.webhooks.batch_max + 1  # 20 a job, in one emit
    events = [msgspec.json.decode(msgspec.json.encode(e)) for d in deliveries for e in d.events]
    assert in_order_per_conversation(events)
    for conversation, sent in ids.items():
        mine = [e for e in events if e["conversation"] == conversation]
        assert [e["id"] for e in mine] == sent  # the event id is the message id
        assert [e["data"]["seq"] for e in mine] == list(range(1, 31))
        assert all(e["type"] == "message.created" for e in mine)
        assert mine[0]["created"] == mine[0]["data"]["ts"]
    assert await dispatcher.step() == 0  # acknowledged: nothing read twice


async def test_a_dispatcher_killed_between_emit_and_ack_loses_nothing(
    env: Resources, receiver: Receiver
) -> None:
    await add_endpoint(env, receiver.url, ["message.created"])

    class Killed(BaseException):
        """Ends the dispatcher where a SIGKILL would: after the commit, before the XACK."""

    def kill(step: str) -> None:
        if step == "after_emit":
            raise Killed

    doomed = Dispatcher(env, consumer="doomed", lease_ttl=1.0)
    assert await doomed.step() == 0
    sent = await publish(env, "crash", 25) + await publish(env, "crash-2", 5)
    doomed.on_step = kill
    with pytest.raises(Killed):
        await doomed.step()
    assert doomed.stats.events == 30  # emitted and committed, never acknowledged
    pending = [await env.redis.xpending(env.keys.ingest(s), GROUP) for s in range(SHARDS)]
    assert sum(p["pending"] for p in pending) == 30

    # The worker's dispatcher takes the lease once the dead one's runs out, takes its pending
    # entries over and emits them again: every message arrives, some twice.
    async with worker(env):
        later = await publish(env, "crash", 5)
        await eventually(
            lambda: _true(receiver.message_ids() >= set(sent + later)), "every message event"
        )
    delivered = [e["id"] for e in receiver.events()]
    assert len(delivered) > len(set(delivered))  # at least once: repeats happen
    assert set(delivered) == set(sent + later)  # deduplicated by id, none missing
    for _, events in receiver.deliveries:
        assert in_order_per_conversation(events)
    assert (
        sum(
            [
                (await env.redis.xpending(env.keys.ingest(s), GROUP))["pending"]
                for s in range(SHARDS)
            ]
        )
        == 0
    )


async def _true(value: bool) -> bool:
    return value


async def test_message_events_reach_a_receiver_batched_and_in_order(
    env: Resources, receiver: Receiver
) -> None:
    await add_endpoint(env, receiver.url, ["message.created", "conversation.created"])
    async with worker(env):
        await eventually(_has_groups(env), "the dispatcher's groups")
        async with env.connection() as conn:
            await service.create(conn, service.ConversationCreate(conversation="lima"), "key:t")
        sent = await publish(env, "lima", 60) + await publish(env, "mike", 40)
        await eventually(lambda: _true(receiver.message_ids() >= set(sent)), "100 events")
    messages = [e for e in receiver.events() if e["type"] == "message.created"]
    assert {e["id"] for e in messages} == set(sent)
    # Batched: fewer deliveries than messages, none above batch_max, each in seq order.
    with_messages = [d for d in receiver.deliveries if d[1][0]["type"] == "message.created"]
    assert len(with_messages) < len(sent)
    assert all(len(events) <= env.config.webhooks.batch_max for _, events in with_messages)
    for _, events in with_messages:
        assert in_order_per_conversation(events)
    assert "conversation.created" in {e["type"] for e in receiver.events()}


def _has_groups(res: Resources) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return {f"{GROUP}@{s}" for s in range(SHARDS)} <= await groups(res)

    return check


# -- the flusher and the webhooks group -------------------------------------------------------


async def test_the_flusher_keeps_what_the_dispatcher_has_not_read(
    env: Resources, receiver: Receiver
) -> None:
    await add_endpoint(env, receiver.url, ["message.created"])
    dispatcher = Dispatcher(env)
    assert await dispatcher.step() == 0  # the groups, at "$"
    await dispatcher.release()  # "stopped"
    sent = await publish(env, "november", 40)
    stats = await flush_pending(env)
    assert stats.records == 40  # flushed and acknowledged by the flusher...
    assert await ingest_length(env) == 40  # ...but kept for the webhooks group
    async with worker(env):  # the dispatcher starts again
        await eventually(lambda: _true(receiver.message_ids() >= set(sent)), "40 events")
        await eventually(_no_pending(env), "the webhooks group acknowledging all")
    assert receiver.message_ids() == set(sent)
    # Read by both groups: the next cut trims it all.
    more = await publish(env, "november", 1)
    await flush_pending(env)
    assert await ingest_length(env) == 1  # only the one the webhooks group has not read
    assert len(more) == 1


def _no_pending(res: Resources) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        for s in range(SHARDS):
            info = await res.redis.xinfo_groups(res.keys.ingest(s))
            for group in info:
                if group["name"].decode() == GROUP and (group["pending"] or group["lag"]):
                    return False
        return True

    return check


async def test_the_flusher_passes_a_group_lagging_past_max_lag_and_counts_the_loss(
    settings: dict[str, Any], fresh_database: Callable[[], str]
) -> None:
    dsn = fresh_database()
    await migrated_db(dsn)
    settings["postgres"]["dsn"] = dsn
    settings["redis"]["key_prefix"] = f"wh{uuid.uuid4().hex[:10]}"
    settings["s3"]["bucket"] = f"wh-{uuid.uuid4().hex[:12]}"
    settings["segments"] = {"shards": SHARDS, "max_age": 0.3, "lease_ttl": 2.0}
    settings["webhooks"] = {"allow_private": True, "max_lag": 0.05}
    async with open_resources(Config.model_validate(settings), "test") as res:
        await res.storage.init()
        await add_endpoint(res, "http://127.0.0.1:9/hook", ["message.created"])
        dispatcher = Dispatcher(res)
        assert await dispatcher.step() == 0
        before = sample("appliance_ingest_trimmed_unread_total", {"group": GROUP})
        await publish(res, "oscar", 12)
        newest = await res.redis.xrevrange(res.keys.ingest_of("oscar"), count=1)
        stamp = int(newest[0][0].split(b"-")[0]) / 1000

        async def old_enough() -> bool:  # older than max_lag by Redis's own clock
            now = await res.redis.time()
            return now[0] + now[1] / 1e6 - stamp > 0.05

        await eventually(old_enough, "the entries to be older than max_lag")
        await flush_pending(res)
        assert await ingest_length(res) == 0  # a dead dispatcher pins nothing past max_lag
        after = sample("appliance_ingest_trimmed_unread_total", {"group": GROUP})
        assert after - before == 12
        assert await dispatcher.step() == 0  # gone before it read them: lost, and counted
        assert await queued(res) == []


def test_trim_plan_keeps_groups_within_max_lag_and_passes_the_others() -> None:
    now = 1_000_000
    own = f"{now}-5"
    # Nobody else: our own floor.
    assert trim_plan(own, [], now, 600_000) == [(own, [])]
    # A group behind us but within max_lag: it holds the floor.
    near = GroupFloor("webhooks", f"{now - 1000}-0", now - 1000)
    assert trim_plan(own, [near], now, 600_000) == [(near.floor, [])]
    # Ahead of us: ours holds it.
    ahead = GroupFloor("webhooks", f"{now}-9", None)
    assert trim_plan(own, [ahead], now, 600_000) == [(own, [])]
    # A group read up to an old id with nothing left unread is not lagging (no oldest entry).
    idle = GroupFloor("idle", "5-1", None)
    assert trim_plan(own, [idle], now, 600_000) == [("5-1", [])]
    # Lagging past max_lag: passed over, and what is trimmed beyond it counted as its loss; two
    # lagging groups are passed one after the other, each trim naming who loses it.
    old = GroupFloor("old", f"{now - 700_000}-0", now - 700_000)
    older = GroupFloor("older", f"{now - 900_000}-0", now - 900_000)
    assert trim_plan(own, [old, older, near], now, 600_000) == [
        (older.floor, []),
        (old.floor, ["older"]),
        (near.floor, ["older", "old"]),
    ]


# -- failures ----------------------------------------------------------------------------------


def test_the_read_budget_is_shared_by_need_and_bounded_in_bytes() -> None:
    assert read_budget(65_536) == READ_BYTES // (65_536 + ENTRY_OVERHEAD) < READ_TOTAL
    assert read_budget(1024) == READ_TOTAL and read_budget(64 * 1_048_576) == 1
    equal = shares(range(16), 1000, set())
    assert set(equal.values()) == {62} and sum(equal.values()) <= 1000
    busy = shares(range(16), 1000, {3})
    assert busy[3] == 1000 - 15 * 15 and {busy[s] for s in range(16) if s != 3} == {15}
    assert sum(shares(range(16), 1000, {1, 2}).values()) <= 1000
    assert set(shares(range(16), 5, {0}).values()) == {1}  # one each at least
    raw = b'{"id":"01J","seq":1,"ts":"2026-12-06T00:00:00.000Z","body":{"t":"\\u00e9"}}'
    e = message_event("c1", raw)
    assert (e.id, e.created, e.conversation, bytes(e.data)) == ("01J", "2026-12-06T00:00:00.000Z",
                                                                "c1", raw)  # fmt: skip
    assert msgspec.json.encode(e).endswith(b'"data":' + raw + b"}")  # carried, not re-encoded


async def test_a_read_stays_within_its_budget_and_a_busy_shard_gets_most(env: Resources) -> None:
    """With 4 MiB bodies allowed, a read takes at most 15 entries (15 x 4 MiB fit in
    READ_BYTES); one busy conversation then gets most of each read."""
    messages = env.config.messages.model_copy(update={"max_body_bytes": 4 * 1_048_576})
    big = dataclasses.replace(env, config=env.config.model_copy(update={"messages": messages}))
    budget = read_budget(4 * 1_048_576)
    assert budget == 15
    await add_endpoint(env, "http://127.0.0.1:9/hook", ["message.created"])
    dispatcher = Dispatcher(big)
    assert await dispatcher.step() == 0
    await publish(env, "hotel", 60)
    await publish(env, "india", 2)
    steps = []
    while (n := await dispatcher.step()) > 0:
        steps.append(n)
    assert sum(steps) == 62 and max(steps) <= budget
    assert max(steps) > budget // SHARDS  # more than an equal share went to the busy shard
    events = [msgspec.json.decode(msgspec.json.encode(e)) for d in await queued(env)
              for e in d.events]  # fmt: skip
    assert len(events) == 62 and in_order_per_conversation(events)


async def test_one_dispatcher_reads_at_a_time_and_a_released_lease_passes_at_once(
    env: Resources,
) -> None:
    await add_endpoint(env, "http://127.0.0.1:9/hook", ["message.created"])
    first, second = Dispatcher(env, consumer="one"), Dispatcher(env, consumer="two")
    assert await first.step() == 0
    assert await second.step() == -1  # the lease is held
    await publish(env, "papa", 3)
    assert await first.step() == 3
    await first.release()
    await publish(env, "papa", 2)
    assert await second.step() == 2  # nothing pending: straight to what is new
    assert await first.step() == -1
    assert [data(e)["seq"] for d in await queued(env) for e in d.events] == [1, 2, 3, 4, 5]


async def test_a_group_destroyed_under_the_dispatcher_is_made_again(env: Resources) -> None:
    await add_endpoint(env, "http://127.0.0.1:9/hook", ["message.created"])
    dispatcher = Dispatcher(env)
    assert await dispatcher.step() == 0
    for shard in range(SHARDS):  # Redis lost it (FLUSHALL, a restart without persistence)
        await env.redis.xgroup_destroy(env.keys.ingest(shard), GROUP)
    assert await dispatcher.step() == 0  # NOGROUP: noticed
    assert await dispatcher.step() == 0  # made again, at "$"
    assert {f"{GROUP}@{s}" for s in range(SHARDS)} <= await groups(env)
    sent = await publish(env, "quebec", 4)
    assert await dispatcher.step() == 4
    assert [e.id for d in await queued(env) for e in d.events] == sent


async def test_the_dispatcher_rides_out_postgresql_being_down(
    settings: dict[str, Any],
    private_postgres: tuple[str, Callable[[], None], Callable[[], None]],
) -> None:
    dsn, start, kill = private_postgres
    await migrated_db(dsn)
    settings["postgres"]["dsn"] = dsn
    settings["redis"]["key_prefix"] = f"wh{uuid.uuid4().hex[:10]}"
    settings["segments"] = {"shards": SHARDS}
    async with open_resources(Config.model_validate(settings), "test") as res:
        await add_endpoint(res, "http://127.0.0.1:9/hook", ["message.created"])
        dispatcher = Dispatcher(res)
        stop = asyncio.Event()
        with capture_logs() as logs:
            task = asyncio.create_task(dispatcher.run(stop))
            try:
                await eventually(_has_groups(res), "the groups")
                # A new conversation's first publish looks its seq up in PostgreSQL; later
                # ones need only Redis.
                sent = await publish(res, "romeo", 1)
                await eventually(lambda: _true(dispatcher.stats.events == 1), "the first")
                kill()
                sent += await publish(res, "romeo", 10)
                await eventually(
                    lambda: _true(any(e["event"] == "webhooks_dispatch_retry" for e in logs)),
                    "a logged retry",
                )
                start()
                await eventually(lambda: _true(dispatcher.stats.events >= 11), "the emit")
                await eventually(_no_pending(res), "the acknowledgement")
            finally:
                stop.set()
                await asyncio.wait_for(task, WAIT)
        assert {e.id for d in await queued(res) for e in d.events} == set(sent)
        assert await res.redis.get(res.keys.webhooks_dispatcher()) is None  # released at stop


@pytest.mark.process
async def test_a_worker_sigkilled_between_emit_and_ack_loses_no_event(
    env: Resources, receiver: Receiver, settings: dict[str, Any], tmp_path: Path
) -> None:
    """The real worker program, told to SIGKILL itself after its first emit commits (before
    the XACK); then a worker in this process takes the lease over once it runs out, re-emits
    the dead one's pending entries, and delivers both emissions: every event arrives, some
    twice, and deduplicating by id leaves exactly the messages published."""
    await add_endpoint(env, receiver.url, ["message.created"])
    settings["appliance"]["run_dir"] = str(tmp_path / "run")
    config = write_toml(tmp_path / "config.toml", settings)
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "run", "worker"],
            env={**os.environ, "APPLIANCE_CONFIG": str(config), CRASH_ENV: "after_emit"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        await eventually(_has_groups(env), "the dying worker's groups")
        sent = await publish(env, "sierra", 40) + await publish(env, "tango", 10)
        await eventually(lambda: _true(proc.poll() is not None), "the worker to kill itself")
        assert proc.returncode == -signal.SIGKILL
        assert "webhooks_dispatch_crash_injected" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert await queued(env)  # committed before the kill, never acknowledged
    async with worker(env):
        await eventually(
            lambda: _true(receiver.message_ids() >= set(sent)), "every event", timeout=60
        )
        await eventually(_no_pending(env), "the acknowledgement")
    delivered = [e["id"] for e in receiver.events()]
    assert len(delivered) > len(set(delivered))
    assert set(delivered) == set(sent)
