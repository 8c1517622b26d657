"""History across tiers: the Redis tail, flush segments and compacted history objects read as
one sequence, over HTTP pages, single messages and the WebSocket catch-up.

Tiers are built through the contract the read path relies on (tests/tiers.py: flush, compact,
trim), each test on a fresh database and its own Redis key prefix (shard leases are global per
database). S3 and PostgreSQL outages use private servers started and stopped here.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import hypothesis
import msgspec
import pytest
import structlog
from hypothesis import HealthCheck
from hypothesis import strategies as st
from litestar.testing import AsyncTestClient
from prometheus_client import REGISTRY

from appliance.api.app import create_app
from appliance.api.services import Services, open_services
from appliance.auth.principal import Principal
from appliance.config import Config
from appliance.errors import ApplianceError, Unavailable
from appliance.messages import history as history_module
from appliance.messages.blocks import RECORD_OVERHEAD, BlockCache, block_size
from appliance.messages.history import History, Position, decode_cursor, page_json
from appliance.messages.publish import Publisher
from appliance.realtime.stream import Session
from appliance.resources import Resources, open_resources
from appliance.segments import index
from appliance.segments.format import HEADER, Record, decode_segment, encode_segment
from tests import tiers
from tests.messaging import bearer, issue_key, unique
from tests.support import free_port, migrated_db, port_open, wait_for
from tests.test_subscription import until

PUBLISHER = Principal("key:tiers", frozenset({"publish"}))
Message = tuple[int, bytes]


# -- fixtures and helpers ------------------------------------------------------------------------


async def migrated_database(make: Callable[[], str]) -> str:
    dsn = make()
    await migrated_db(dsn)
    return dsn


def isolate(settings: dict[str, Any], dsn: str) -> None:
    """This test's own database and Redis key prefix (cleaned with the run's)."""
    settings["postgres"]["dsn"] = dsn
    settings["redis"]["key_prefix"] += f"-h{uuid.uuid4().hex[:8]}"


@asynccontextmanager
async def opened(settings: dict[str, Any]) -> AsyncIterator[Resources]:
    async with open_resources(Config.model_validate(settings), "test") as res:
        await res.storage.init()
        yield res


@pytest.fixture
async def tiered(
    settings: dict[str, Any], fresh_database: Callable[[], str]
) -> AsyncIterator[Resources]:
    isolate(settings, await migrated_database(fresh_database))
    async with opened(settings) as res:
        yield res


def reader(res: Resources, budget: int = 8 * 1_048_576) -> History:
    return History(res.redis, res.keys, res.connection, BlockCache(res.storage, budget))


async def publish(res: Resources, conversation: str, count: int) -> list[Message]:
    """`count` messages through the real publish script: (seq, the bytes the tail holds)."""
    publisher = Publisher(res.redis, res.keys, res.config.messages, res.connection)
    bodies = [tiers.text(i) for i in range(count)]
    result = await publisher.publish(conversation, PUBLISHER, bodies, None, b"", True)
    seqs = [ack.seq for ack in result.acks]
    entries = cast(
        tiers.Entries,
        await res.redis.xrange(res.keys.tail(conversation), f"{seqs[0]}-0", f"{seqs[-1]}-0"),
    )
    return [(int(entry_id.split(b"-")[0]), fields[b"m"]) for entry_id, fields in entries]


async def tail_seqs(res: Resources, conversation: str) -> list[int]:
    entries = cast(tiers.Entries, await res.redis.xrange(res.keys.tail(conversation)))
    return [int(entry_id.split(b"-")[0]) for entry_id, _ in entries]


def seqs_of(page: bytes) -> list[int]:
    return [m["seq"] for m in json.loads(page)["messages"]]


def expected_page(
    messages: list[Message], direction: str, seq: int | None, limit: int
) -> list[Message]:
    if direction == "before":
        older = [m for m in messages if seq is None or m[0] < seq]
        return older[::-1][:limit]
    return [m for m in messages if m[0] > (seq or 0)][:limit]


async def chain(history: History, conversation: str, at: Position, limit: int) -> list[int]:
    """Seqs of every page from `at`, following next_cursor until it is null."""
    seen: list[int] = []
    for _ in range(1000):
        page = json.loads(await history.page(conversation, at, limit))
        seen += [m["seq"] for m in page["messages"]]
        if page["next_cursor"] is None:
            return seen
        at = decode_cursor(page["next_cursor"])
    raise AssertionError("the cursor never ended")


def counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def tier_reads(tier: str) -> float:
    return counted("appliance_history_reads_total", tier=tier)


def cache_lookups(outcome: str) -> float:
    return counted("appliance_block_cache_total", outcome=outcome)


async def layered(res: Resources, conversation: str) -> list[Message]:
    """1-30 in a history object, 31-45 in a flush segment, 46-55 in the tail only."""
    messages = await publish(res, conversation, 30)
    await tiers.flush(res)
    await tiers.compact(res)
    messages += await publish(res, conversation, 15)
    await tiers.flush(res)
    messages += await publish(res, conversation, 10)
    await tiers.trim(res, conversation, 5)
    assert await tail_seqs(res, conversation) == list(range(46, 56))
    return messages


# -- the property --------------------------------------------------------------------------------

Op = tuple[str, int]
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.integers(1, 9)),
        st.tuples(st.just("flush"), st.just(0)),
        st.tuples(st.just("compact"), st.just(0)),
        st.tuples(st.just("trim"), st.integers(0, 4)),
    ),
    min_size=3,
    max_size=12,
)


@hypothesis.settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
)
@hypothesis.example(
    ops=[
        *[("publish", 9), ("flush", 0), ("publish", 4), ("compact", 0), ("publish", 5)],
        *[("flush", 0), ("publish", 3), ("flush", 0), ("publish", 2), ("trim", 1)],
    ],
    limits=[4, 7],
)
@hypothesis.given(ops=OPS, limits=st.lists(st.integers(1, 12), min_size=2, max_size=2))
async def test_any_interleaving_pages_exactly_the_acknowledged_sequence(
    tiered: Resources, monkeypatch: pytest.MonkeyPatch, ops: list[Op], limits: list[int]
) -> None:
    # One index row a query: a page crossing blocks asks the index again, as it does past 8.
    monkeypatch.setattr(history_module, "ROWS", 1)
    res, conversation = tiered, unique("p")
    messages: list[Message] = []
    for op, n in ops:
        if op == "publish":
            messages += await publish(res, conversation, n)
        elif op == "flush":
            await tiers.flush(res)
        elif op == "compact":
            await tiers.compact(res)
        else:
            await tiers.trim(res, conversation, n)
    history = reader(res, budget=4096)  # small: evictions happen too
    segment_reads = tier_reads("segment")
    head = messages[-1][0] if messages else 0
    seqs = [seq for seq, _ in messages]
    assert await history.head(conversation) == head
    for limit in limits:
        assert await chain(history, conversation, Position("before", None), limit) == seqs[::-1]
        assert await chain(history, conversation, Position("after", 0), limit) == seqs
    # Every position, seams included (block edges, the tail's first seq), both directions.
    async with res.connection() as conn:
        rows = await index.blocks_after(conn, conversation, 0, 1000)
    edges = {s for row in rows for s in (row.first_seq, row.last_seq)}
    edges |= set((await tail_seqs(res, conversation))[:1])
    positions = sorted({0, 1, head, head + 1} | {e + d for e in edges for d in (-1, 0, 1)})
    for seq in [p for p in positions if p >= 0]:
        for direction in ("before", "after"):
            at = Position(direction, seq)
            page = await history.page(conversation, at, limits[0])
            assert page == page_json(
                expected_page(messages, direction, seq, limits[0]), at, limits[0]
            )
    for seq, message in messages:
        assert await history.one(conversation, seq) == message
    hypothesis.event(f"read segments: {tier_reads('segment') > segment_reads}")


# -- pages across the seams ----------------------------------------------------------------------


async def test_pages_cross_tail_flush_and_history_in_both_directions(tiered: Resources) -> None:
    conversation = unique("c")
    messages = await layered(tiered, conversation)
    history = reader(tiered)
    by_seq = dict(messages)

    async def page(direction: str, seq: int | None, limit: int) -> bytes:
        return await history.page(conversation, Position(direction, seq), limit)  # type: ignore[arg-type]

    segments_before = tier_reads("segment")
    assert seqs_of(await page("before", 48, 8)) == list(range(47, 39, -1))  # tail -> flush
    assert seqs_of(await page("before", 34, 8)) == list(range(33, 25, -1))  # flush -> history
    assert seqs_of(await page("before", None, 55)) == list(range(55, 0, -1))  # all three
    assert seqs_of(await page("after", 25, 25)) == list(range(26, 51))  # history -> tail
    assert seqs_of(await page("after", 43, 5)) == [44, 45, 46, 47, 48]  # flush -> tail
    assert seqs_of(await page("after", 0, 3)) == [1, 2, 3]
    assert tier_reads("segment") > segments_before
    # Bytes are the tail's bytes, whichever tier answers.
    for seq in (5, 35, 50):  # history, flush, tail
        assert await history.one(conversation, seq) == by_seq[seq]
    with pytest.raises(ApplianceError) as missing:
        await history.one(conversation, 56)
    assert missing.value.status == 404
    # A page the tail answers alone touches neither PostgreSQL nor S3.
    before = (tier_reads("segment"), cache_lookups("hit") + cache_lookups("miss"))
    assert seqs_of(await page("before", None, 5)) == [55, 54, 53, 52, 51]
    assert seqs_of(await page("after", 45, 10)) == list(range(46, 56))
    assert seqs_of(await page("after", 55, 10)) == []
    after = (tier_reads("segment"), cache_lookups("hit") + cache_lookups("miss"))
    assert after == before


async def test_a_block_compacted_away_meanwhile_is_read_from_its_new_home(
    tiered: Resources, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows read just before compaction name a flush object deleted right after: the read asks
    the index again instead of failing."""
    conversation = unique("c")
    messages = await publish(tiered, conversation, 10)
    await tiers.flush(tiered)
    await tiers.trim(tiered, conversation, 0)
    async with tiered.connection() as conn:
        stale = await index.blocks_before(conn, conversation, 11, 8)
    await tiers.compact(tiered)  # the flush object is deleted
    real = index.blocks_before
    calls: list[int] = []

    async def first_stale(conn: Any, c: str, seq: int, limit: int) -> list[index.BlockRow]:
        calls.append(seq)
        return stale if len(calls) == 1 else await real(conn, c, seq, limit)

    monkeypatch.setattr(index, "blocks_before", first_stale)
    history = reader(tiered)
    page = await history.page(conversation, Position("before", None), 20)
    assert page == page_json(messages[::-1], Position("before", None), 20)
    assert len(calls) == 2
    # With no retry left, a block the index names but S3 lacks is a logged 500.
    with structlog.testing.capture_logs() as logs, pytest.raises(ApplianceError) as failed:
        await history._block(stale[0], retry=False)
    assert failed.value.status == 500 and stale[0].object_key not in failed.value.message
    assert [e["object"] for e in logs if e["event"] == "history_block_missing"] == [
        stale[0].object_key
    ]


# -- the block cache -----------------------------------------------------------------------------


async def test_the_block_cache_keeps_its_budget_and_single_flights_misses(
    tiered: Resources, monkeypatch: pytest.MonkeyPatch
) -> None:
    conversations = [unique("c") for _ in range(4)]
    for i, conversation in enumerate(conversations):
        await publish(tiered, conversation, 3 + 3 * i)  # blocks of different sizes
    await tiers.flush(tiered)
    async with tiered.connection() as conn:
        rows = [(await index.blocks_after(conn, c, 0, 1))[0] for c in conversations]
    gets: list[tuple[str, int | None]] = []
    real_get = tiered.storage.get

    async def counting_get(key: str, start: int | None = None, length: int | None = None) -> bytes:
        gets.append((key, start))
        return await real_get(key, start, length)

    monkeypatch.setattr(tiered.storage, "get", counting_get)
    probe = BlockCache(tiered.storage, 10**9)
    sizes = [block_size(await probe.get(r.object_key, r.entry)) for r in rows]
    assert sizes[0] >= 3 * RECORD_OVERHEAD and sizes == sorted(sizes)
    gets.clear()

    # Single flight: twenty concurrent misses for one block, one GET.
    cache = BlockCache(tiered.storage, sizes[0] + sizes[1])
    misses, hits = cache_lookups("miss"), cache_lookups("hit")
    blocks = await asyncio.gather(
        *(cache.get(rows[1].object_key, rows[1].entry) for _ in range(20))
    )
    assert len(gets) == 1 and all(b is blocks[0] for b in blocks)
    assert (cache_lookups("miss") - misses, cache_lookups("hit") - hits) == (1, 19)
    # The budget: LRU eviction keeps the decoded bytes at or under it.
    await cache.get(rows[0].object_key, rows[0].entry)
    assert len(cache) == 2 and cache.size == sizes[0] + sizes[1] <= cache.budget
    await cache.get(rows[1].object_key, rows[1].entry)  # now the most recent
    await cache.get(rows[2].object_key, rows[2].entry)  # evicts rows[0] (or does not fit)
    assert cache.size <= cache.budget
    gets.clear()
    await cache.get(rows[0].object_key, rows[0].entry)
    assert len(gets) == 1  # it was evicted
    # A block bigger than the whole budget is handed out, never kept.
    tiny = BlockCache(tiered.storage, sizes[3] - 1)
    big = await tiny.get(rows[3].object_key, rows[3].entry)
    assert len(big.records) == 12 and len(tiny) == 0 and tiny.size == 0
    # An object written again under its key: the kept block is not the indexed one, read anew.
    first = min(rows, key=lambda r: r.byte_offset)
    again = BlockCache(tiered.storage, 10**9)
    await again.get(first.object_key, first.entry)
    rewritten, _ = encode_segment([("other", [Record(1, 0, b'{"seq":1}')])])
    await tiered.storage.put(first.object_key, rewritten)
    (block,) = decode_segment(rewritten, first.object_key)
    assert block.entry.offset == first.byte_offset  # the same (key, offset)
    gets.clear()
    assert (await again.get(first.object_key, block.entry)).records == block.records
    assert len(gets) == 1 and len(again) == 1 and again.size == block_size(block)
    # A failed read reaches every waiter, and the next read tries again.
    fresh = BlockCache(tiered.storage, 10**9)
    gone = msgspec.structs.replace(rows[0], object_key="segments/flush/nowhere.seg")
    results = await asyncio.gather(
        *(fresh.get(gone.object_key, gone.entry) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, Unavailable) for r in results) and len(fresh) == 0


# -- errors --------------------------------------------------------------------------------------


@pytest.fixture
def private_s3(tmp_path: Path) -> Iterator[tuple[str, Callable[[], None]]]:
    """A moto S3 server of this test's own: (endpoint, stop)."""
    port = free_port()
    log = tmp_path / "moto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)

    try:
        wait_for(lambda: port_open(port) or proc.poll() is not None, 30, "private moto server")
        assert proc.poll() is None, log.read_text()
        yield f"http://127.0.0.1:{port}", stop
    finally:
        stop()


async def created(client: Any, key: str) -> str:
    response = await client.post(
        "/v1/conversations", json={"conversation": unique("c")}, headers=bearer(key)
    )
    assert response.status_code == 201, response.text
    conversation: str = response.json()["conversation"]
    return conversation


async def test_s3_down_is_503_for_pages_that_need_it_and_the_tail_still_answers(
    settings: dict[str, Any],
    fresh_database: Callable[[], str],
    private_s3: tuple[str, Callable[[], None]],
) -> None:
    endpoint, stop = private_s3
    isolate(settings, await migrated_database(fresh_database))
    settings["s3"].update(endpoint_url=endpoint, timeout=1.0)
    settings["appliance"]["roles"] = ["api"]
    async with opened(settings) as res:
        key = await issue_key(res, ["admin"])
        async with AsyncTestClient(app=create_app(Config.model_validate(settings))) as client:
            conversation = await created(client, key)
            await publish(res, conversation, 20)
            await tiers.flush(res)
            await tiers.trim(res, conversation, 5)
            path = f"/v1/conversations/{conversation}/messages"
            stop()
            with structlog.testing.capture_logs() as logs:
                needs_s3 = await client.get(f"{path}?limit=10", headers=bearer(key))
                one = await client.get(f"{path}/3", headers=bearer(key))
            for response in (needs_s3, one):
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"] == "1"
                assert response.json() == {
                    "error": {
                        "code": "storage",
                        "message": "s3 is unavailable, retry later",
                        "field": None,
                    }
                }
            assert any(e["event"] == "history_storage_unavailable" for e in logs)
            from_tail = await client.get(f"{path}?limit=5", headers=bearer(key))
            assert from_tail.status_code == 200, from_tail.text
            assert [m["seq"] for m in from_tail.json()["messages"]] == [20, 19, 18, 17, 16]
            assert (await client.get(f"{path}/18", headers=bearer(key))).status_code == 200
            # A deleted conversation is 404, before any tier is read.
            deleted = await client.delete(f"/v1/conversations/{conversation}", headers=bearer(key))
            assert deleted.status_code == 204, deleted.text
            gone = await client.get(f"{path}?limit=10", headers=bearer(key))
            assert gone.status_code == 404, gone.text


async def test_postgres_down_is_503_for_pages_that_need_the_index(
    settings: dict[str, Any],
    private_postgres: tuple[str, Callable[[], None], Callable[[], None]],
) -> None:
    dsn, _, kill = private_postgres
    await migrated_db(dsn)
    isolate(settings, dsn)
    settings["postgres"]["connect_timeout"] = 1.0
    settings["appliance"]["roles"] = ["api"]
    async with opened(settings) as res:
        key = await issue_key(res, ["admin"])
        async with AsyncTestClient(app=create_app(Config.model_validate(settings))) as client:
            conversation = await created(client, key)
            await publish(res, conversation, 20)
            await tiers.flush(res)
            await tiers.trim(res, conversation, 5)
            path = f"/v1/conversations/{conversation}/messages"
            warm = await client.get(f"{path}?limit=5", headers=bearer(key))  # caches the access
            assert warm.status_code == 200, warm.text
            kill()
            from_tail = await client.get(f"{path}?limit=5", headers=bearer(key))
            assert from_tail.status_code == 200, from_tail.text
            needs_index = await client.get(f"{path}?limit=10", headers=bearer(key))
            assert needs_index.status_code == 503, needs_index.text
            assert needs_index.headers["retry-after"] == "1"
            assert needs_index.json()["error"]["code"] == "unavailable"


async def test_a_corrupt_block_is_a_logged_500_that_names_nothing(tiered: Resources) -> None:
    conversation = unique("c")
    await publish(tiered, conversation, 10)
    key = await tiers.flush(tiered)
    assert key is not None
    await tiers.trim(tiered, conversation, 2)
    data = bytearray(await tiered.storage.get(key))
    data[40] ^= 0xFF  # inside the block
    await tiered.storage.put(key, bytes(data))
    history = reader(tiered)
    with structlog.testing.capture_logs() as logs, pytest.raises(ApplianceError) as failed:
        await history.page(conversation, Position("before", None), 10)
    assert (failed.value.status, failed.value.code) == (500, "internal")
    assert key not in failed.value.message
    (logged,) = [e for e in logs if e["event"] == "history_block_corrupt"]
    assert (logged["object"], logged["offset"], logged["conversation"]) == (
        key,
        HEADER.size,  # the object's first block
        conversation,
    )


async def test_a_truncated_object_is_a_logged_500_not_an_outage(tiered: Resources) -> None:
    """S3 answers InvalidRange for a block past the object's end: damage, never a 503."""
    conversation = unique("c")
    await publish(tiered, conversation, 10)
    key = await tiers.flush(tiered)
    assert key is not None
    await tiers.trim(tiered, conversation, 2)
    await tiered.storage.put(key, (await tiered.storage.get(key))[:4])  # before the block
    with structlog.testing.capture_logs() as logs, pytest.raises(ApplianceError) as failed:
        await reader(tiered).page(conversation, Position("before", None), 10)
    assert (failed.value.status, failed.value.code) == (500, "internal")
    (logged,) = [e for e in logs if e["event"] == "history_block_corrupt"]
    assert logged["object"] == key and "truncated" in logged["reason"]


async def test_head_comes_from_the_index_when_redis_lost_the_conversation(
    tiered: Resources,
) -> None:
    conversation = unique("c")
    await publish(tiered, conversation, 7)
    await tiers.flush(tiered)
    history = reader(tiered)
    assert await history.head(conversation) == 7
    await tiered.redis.delete(tiered.keys.seq(conversation), tiered.keys.tail(conversation))
    assert await history.head(conversation) == 7
    assert seqs_of(await history.page(conversation, Position("before", None), 3)) == [7, 6, 5]
    assert seqs_of(await history.page(conversation, Position("after", 5), 3)) == [6, 7]
    assert await history.head(unique("never")) == 0


# -- WebSocket resume ----------------------------------------------------------------------------


@pytest.fixture
async def svc(tiered: Resources) -> AsyncIterator[Services]:
    async with open_services(tiered) as services:
        yield services


def session_for(svc: Services) -> Session:
    principal = Principal("key:t", frozenset({"subscribe"}))
    return Session(None, svc, principal, "unused")  # type: ignore[arg-type]


def frames(session: Session) -> list[dict[str, Any]]:
    out = []
    while session.pending:
        out.append(json.loads(session.pending.popleft()[0]))
    return out


async def conversation_for(svc: Services) -> str:
    from appliance.conversations import service

    name = unique("c")
    async with svc.resources.connection() as conn:
        await service.create(conn, service.ConversationCreate(conversation=name), "key:t")
    return name


def when_replayed(
    monkeypatch: pytest.MonkeyPatch,
    session: Session,
    actions: dict[int, Callable[[], Awaitable[Any]]],
) -> None:
    """Run actions[seq] right after the catch-up sent message `seq`."""
    original = session.send_replayed

    async def send_replayed(frame: str, at: float | None) -> None:
        await original(frame, at)
        action = actions.pop(json.loads(frame)["message"]["seq"], None)
        if action is not None:
            await action()

    monkeypatch.setattr(session, "send_replayed", send_replayed)


async def test_resume_replays_segments_then_the_tail_then_live_exactly_once(
    svc: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    res = svc.resources
    conversation = await conversation_for(svc)
    await layered(res, conversation)  # 1-30 history, 31-45 flush, 46-55 tail
    session = session_for(svc)
    seen: list[int] = []

    def drain() -> list[int]:
        for frame in frames(session):
            if frame["event"] == "message":
                seen.append(frame["message"]["seq"])
            else:
                assert frame["event"] in {"subscribed", "presence"}, frame
        return seen

    when_replayed(
        monkeypatch,
        session,
        {
            20: lambda: publish(res, conversation, 3),  # 56-58, during the segment replay
            33: lambda: publish(res, conversation, 1),  # 59
            50: lambda: publish(res, conversation, 2),  # 60-61, during the tail replay
        },
    )
    try:
        await session.subscribe(conversation, 10)
        await publish(res, conversation, 3)  # 62-64, live
        await until(lambda: (drain() or [0])[-1] >= 64, "seq 64")
        assert seen == list(range(11, 65))
    finally:
        await session.unsubscribe(conversation, notify=False)


async def test_resume_below_the_oldest_retained_seq_is_resume_too_old(svc: Services) -> None:
    res = svc.resources
    conversation = await conversation_for(svc)
    await layered(res, conversation)
    async with res.connection() as conn:  # retention: the history object's rows are gone
        await conn.execute(
            "DELETE FROM segment_blocks WHERE conversation = %s AND last_seq <= 30",
            (conversation,),
        )
    session = session_for(svc)
    await session.subscribe(conversation, 5)
    sent = frames(session)
    assert [f["event"] for f in sent if f["event"] != "presence"] == ["subscribed", "error"]
    error = sent[-1]["error"]
    assert (error["code"], error["conversation"], error["seq"]) == (
        "resume_too_old",
        conversation,
        5,
    )
    assert conversation not in session.subs
    # From the oldest retained seq on, the resume replays.
    await session.subscribe(conversation, 30)
    try:
        assert [f["message"]["seq"] for f in frames(session) if f["event"] == "message"] == list(
            range(31, 56)
        )
    finally:
        await session.unsubscribe(conversation, notify=False)


async def test_a_replay_beyond_max_replay_is_resume_too_old_and_head_may_come_from_the_index(
    settings: dict[str, Any], fresh_database: Callable[[], str]
) -> None:
    isolate(settings, await migrated_database(fresh_database))
    settings["realtime"] = {"max_replay": 20}
    async with opened(settings) as res, open_services(res) as svc:
        conversation = await conversation_for(svc)
        await layered(res, conversation)  # head 55
        session = session_for(svc)
        await session.subscribe(conversation, 34)  # 21 to replay
        (error,) = [f["error"] for f in frames(session) if f["event"] == "error"]
        assert (error["code"], error["head"]) == ("resume_too_old", 55)
        # Redis lost the conversation: the head comes from the index (45), a resume within
        # it replays from segments, one above it is seq_reset.
        await res.redis.delete(res.keys.seq(conversation), res.keys.tail(conversation))
        await session.subscribe(conversation, 50)
        (error,) = [f["error"] for f in frames(session) if f["event"] == "error"]
        assert (error["code"], error["seq"]) == ("seq_reset", 45)
        await session.subscribe(conversation, 40)
        try:
            sent = frames(session)
            assert sent[0] == {"event": "subscribed", "conversation": conversation, "seq": 45}
            assert [f["message"]["seq"] for f in sent if f["event"] == "message"] == [
                41,
                42,
                43,
                44,
                45,
            ]
        finally:
            await session.unsubscribe(conversation, notify=False)


async def test_s3_away_during_a_catch_up_is_waited_out_or_refused_said(
    svc: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subscribe whose replay needs S3 while it is away is refused with `storage` (the op may
    be retried); a catch-up in the background (after a gap) waits S3 out and goes on."""
    res = svc.resources
    conversation = await conversation_for(svc)
    await layered(res, conversation)
    real = svc.history.replay
    failures = [1]

    async def s3_away(c: str, after: int, limit: int) -> list[Message]:
        if failures:
            failures.pop()
            raise Unavailable("s3 is unavailable, retry later", code="storage")
        return await real(c, after, limit)

    monkeypatch.setattr(svc.history, "replay", s3_away)
    session = session_for(svc)
    with pytest.raises(Unavailable) as refused:
        await session.subscribe(conversation, 10)
    assert refused.value.code == "storage" and conversation not in session.subs
    await session.subscribe(conversation, None)  # at the head: nothing to replay
    sub = session.subs[conversation]
    try:
        frames(session)
        sub.last = 40  # as if frames 41-55 were lost: the recovery reads them from history
        failures.append(1)  # S3 away at its first attempt
        sub.resync()
        await until(lambda: sub.live and sub.last == 55, "the recovery to go live")
        assert [f["message"]["seq"] for f in frames(session) if f["event"] == "message"] == list(
            range(41, 56)
        )
        assert session.closing is None and not failures
    finally:
        await session.unsubscribe(conversation, notify=False)


async def test_a_quiet_conversations_day_of_one_message_blocks_pages_in_both_directions(
    tiered: Resources,
) -> None:
    """Before compaction, a quiet conversation holds one block per message: pages span more
    blocks than one index query returns, fetched concurrently, in order either way."""
    conversation = unique("q")
    messages: list[Message] = []
    for _ in range(40):
        messages += await publish(tiered, conversation, 1)
        await tiers.flush(tiered)
    await tiers.trim(tiered, conversation, 0)
    assert await tail_seqs(tiered, conversation) == []
    history = reader(tiered)
    seqs = [seq for seq, _ in messages]
    for limit in (1, 7, 16, 17, 30, 200):
        assert await chain(history, conversation, Position("before", None), limit) == seqs[::-1]
        assert await chain(history, conversation, Position("after", 0), limit) == seqs
    assert seqs_of(await history.page(conversation, Position("after", 10), 20)) == seqs[10:30]
    assert (
        seqs_of(await history.page(conversation, Position("before", 31), 20)) == seqs[10:30][::-1]
    )


async def test_pages_from_inside_blocks_read_on_past_rows_that_fall_short(
    tiered: Resources,
) -> None:
    """Blocks of three: a page starting inside a block gets fewer from it than its row counts,
    so the blocks fetched at first do not fill the page and the reader must go on."""
    conversation = unique("b")
    messages: list[Message] = []
    for _ in range(15):
        messages += await publish(tiered, conversation, 3)
        await tiers.flush(tiered)
    await tiers.trim(tiered, conversation, 0)
    history = reader(tiered)
    seqs = [seq for seq, _ in messages]
    for at in range(0, 46, 4):
        for limit in (5, 20):
            after = seqs_of(await history.page(conversation, Position("after", at), limit))
            assert after == [s for s in seqs if s > at][:limit]
            before = seqs_of(await history.page(conversation, Position("before", at + 1), limit))
            assert before == [s for s in seqs if s <= at][::-1][:limit]
