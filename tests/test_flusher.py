"""The flusher in-process against real PostgreSQL, Redis and S3: cuts, ordering, replays after a
crash at each step, tail trimming, fencing, the shard count, and outages of each dependency.

Each test has its own database, Redis key prefix and bucket (leases and ingest streams are
global per database and prefix). Conditions are polled with a bound; nothing asserts timing.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from prometheus_client import REGISTRY
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from appliance.auth.principal import Principal
from appliance.config import Config
from appliance.errors import ConfigError
from appliance.messages.publish import MessageIn, Publisher
from appliance.redis_keys import shard_of
from appliance.resources import Resources, open_resources
from appliance.segments import index, store
from appliance.segments.flush import Flusher, flush_pending
from tests.messaging import unique
from tests.segment_check import block_rows, durable_and_tail, indexed_records, tail_seqs
from tests.support import eventually, free_port, migrated_db, port_open, wait_for

SENDER = Principal("key:flusher-test", frozenset({"admin"}))
WAIT = 30.0


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def flush_settings(settings: dict[str, Any], dsn: str, **segments: Any) -> dict[str, Any]:
    """`settings` on database `dsn` with a prefix and bucket of their own, quick cuts and leases."""
    settings["postgres"]["dsn"] = dsn
    settings["redis"]["key_prefix"] = f"fl{uuid.uuid4().hex[:10]}"
    settings["s3"]["bucket"] = f"fl-{uuid.uuid4().hex[:12]}"
    settings["segments"] = {"shards": 4, "max_age": 0.3, "lease_ttl": 2.0, **segments}
    return settings


@asynccontextmanager
async def opened(settings: dict[str, Any], init: bool = True) -> AsyncIterator[Resources]:
    async with open_resources(Config.model_validate(settings), "test") as res:
        if init:
            await res.storage.init()
        yield res


@pytest.fixture
async def env(
    settings: dict[str, Any], fresh_database: Callable[[], str]
) -> AsyncIterator[tuple[dict[str, Any], Resources]]:
    dsn = fresh_database()
    await migrated_db(dsn)
    flush_settings(settings, dsn)
    async with opened(settings) as res:
        yield settings, res


def publisher(res: Resources) -> Publisher:
    return Publisher(res.redis, res.keys, res.config.messages, res.connection)


async def publish(res: Resources, conversation: str, n: int = 1, size: int = 10) -> list[int]:
    """`n` messages, one publish each; their seqs."""
    pub = publisher(res)
    seqs = []
    text = msgspec.json.encode({"text": "x" * size})
    for _ in range(n):
        message = MessageIn(type="text", body=msgspec.Raw(text))
        done = await pub.publish(conversation, SENDER, [message], None, text, batch=False)
        seqs += [a.seq for a in done.acks]
    return seqs


@asynccontextmanager
async def running(res: Resources) -> AsyncIterator[Flusher]:
    """A Flusher's `run` in the background until the block ends (a clean stop)."""
    flusher = Flusher(res)
    stop = asyncio.Event()
    task = asyncio.create_task(flusher.run(stop))
    try:
        yield flusher
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


async def head(res: Resources, conversation: str) -> int:
    """The indexed seq of `conversation` (-1 while PostgreSQL does not answer)."""
    try:
        async with res.connection() as conn:
            return await index.durable_head(conn, conversation)
    except psycopg.OperationalError:
        return -1


async def flushed(res: Resources, conversation: str, seq: int) -> bool:
    return await head(res, conversation) >= seq


async def objects(res: Resources) -> list[str]:
    return [k for k, _ in await res.storage.list_keys(store.FLUSH_PREFIX)]


async def backlog(res: Resources) -> int:
    return sum([await res.redis.xlen(res.keys.ingest(s)) for s in range(res.keys.shards)])


def conversations_over_shards(shards: int, count: int) -> list[str]:
    names = [unique("c") for _ in range(count)]
    assert len({shard_of(c, shards) for c in names}) > 1
    return names


class Boom(Exception):
    pass


def crash_at(step: str) -> Callable[[str], None]:
    def on_step(at: str) -> None:
        if at == step:
            raise Boom(step)

    return on_step


# -- cuts ---------------------------------------------------------------------------------------


async def test_one_put_per_cut_holds_every_shard_and_conversation(
    env: tuple[dict[str, Any], Resources],
) -> None:
    _, res = env
    names = conversations_over_shards(4, 12)
    for c in names:
        await publish(res, c, 5)
    before = sample("appliance_segments_total", {"tier": "flush"})
    stats = await flush_pending(res)
    assert stats.cuts == 1 and stats.records == 60
    assert await objects(res) == stats.keys and len(stats.keys) == 1
    assert sample("appliance_segments_total", {"tier": "flush"}) == before + 1
    for c in names:
        rows = await block_rows(res, c)
        assert [(r.object_key, r.first_seq, r.last_seq) for r in rows] == [(stats.keys[0], 1, 5)]
        assert await durable_and_tail(res, c) == [1, 2, 3, 4, 5]
    assert await backlog(res) == 0


async def test_cut_at_max_age(env: tuple[dict[str, Any], Resources]) -> None:
    _, res = env
    c = unique("c")
    async with running(res) as flusher:
        await publish(res, c, 3)
        await eventually(lambda: flushed(res, c, 3), "a cut by age")
        # Indexed comes before the cut is counted (acknowledging and trimming are after it).
        await eventually(lambda: _true(flusher.stats.cuts >= 1), "the cut counted")
        assert flusher.stats.bytes < res.config.segments.max_bytes
        await publish(res, c, 2)
        await eventually(lambda: flushed(res, c, 5), "a second cut by age")
        await eventually(lambda: backlog_is(res, 0), "the ingest stream trimmed")
    assert await durable_and_tail(res, c) == [1, 2, 3, 4, 5]


async def _true(value: bool) -> bool:
    return value


async def backlog_is(res: Resources, n: int) -> bool:
    return await backlog(res) == n


async def test_cut_at_max_bytes(
    settings: dict[str, Any], fresh_database: Callable[[], str]
) -> None:
    dsn = fresh_database()
    await migrated_db(dsn)
    flush_settings(settings, dsn, max_bytes=65536, max_age=600.0)
    async with opened(settings) as res:
        c = unique("c")
        async with running(res) as flusher:
            await publish(res, c, 100, size=2000)  # about 200 KB: at least three cuts by size
            await eventually(lambda: flushed(res, c, 60), "cuts by size")
            await eventually(lambda: _true(flusher.stats.cuts >= 2), "the cuts counted")
        assert len(flusher.stats.keys) == flusher.stats.cuts  # one PUT each, once stopped
        # The clean stop cut what was buffered and released the leases; the next owner
        # flushes what was still unread.
        await flush_pending(res)
        assert await durable_and_tail(res, c) == list(range(1, 101))
        assert await head(res, c) == 100
        assert await backlog(res) == 0


# -- replays ------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["after_put", "after_index", "before_ack", "after_trim"])
async def test_a_cut_broken_at_any_step_replays_without_duplicates(
    env: tuple[dict[str, Any], Resources], step: str
) -> None:
    _, res = env
    names = conversations_over_shards(4, 6)
    for c in names:
        await publish(res, c, 4)
    first = Flusher(res)
    await first.start()
    await first.claim()
    await first.read_available()
    first.on_step = crash_at(step)
    with pytest.raises(Boom):
        await first.cut()
    # The owner died here: its leases run out (released, to be quick); the next owner re-reads
    # the pending entries and finishes the cut.
    await first.release()
    for c in names:
        await publish(res, c, 1)
    stats = await flush_pending(res)
    assert len(set(await objects(res))) == len(await objects(res))
    for c in names:
        assert await durable_and_tail(res, c) == [1, 2, 3, 4, 5]
        assert await head(res, c) == 5
    indexed_before_crash = step != "after_put"
    assert stats.records == 6 if indexed_before_crash else 30
    assert await backlog(res) == 0
    for s in range(4):
        pending = await res.redis.xpending(res.keys.ingest(s), "flusher")
        assert pending["pending"] == 0


# -- tails and fencing --------------------------------------------------------------------------


async def test_tail_keeps_tail_max_and_everything_not_indexed(
    settings: dict[str, Any], fresh_database: Callable[[], str]
) -> None:
    dsn = fresh_database()
    await migrated_db(dsn)
    flush_settings(settings, dsn)
    settings["messages"] = {"tail_max": 5}
    async with opened(settings) as res:
        c = unique("c")
        await publish(res, c, 20)
        await flush_pending(res)
        assert await tail_seqs(res, c) == [16, 17, 18, 19, 20]
        # A flusher that lost its leases (another owner took them) cannot index: the tail
        # keeps everything above the indexed seq 20, however long it gets.
        fenced = Flusher(res)
        await fenced.start()
        await fenced.claim()
        assert fenced.owned == {0, 1, 2, 3}
        async with res.connection() as conn:
            await conn.execute("UPDATE segment_shards SET owner = 'thief'")
        await publish(res, c, 20)
        await fenced.read_available()
        await fenced.cut()
        assert shard_of(c, 4) not in fenced.owned and fenced.stats.cuts == 0
        assert await head(res, c) == 20  # nothing indexed by the fenced flusher
        assert len(await block_rows(res, c)) == 1
        assert await tail_seqs(res, c) == list(range(16, 41))
        # Its entries stay pending for the next owner, which flushes them.
        async with res.connection() as conn:
            await conn.execute("UPDATE segment_shards SET owner = NULL, lease_until = now()")
        await fenced.release()
        await flush_pending(res)
        assert await durable_and_tail(res, c) == list(range(1, 41))
        assert await tail_seqs(res, c) == [36, 37, 38, 39, 40]


async def test_lease_lost_between_reads_drops_the_buffer(
    env: tuple[dict[str, Any], Resources],
) -> None:
    _, res = env
    c = unique("c")
    await publish(res, c, 3)
    flusher = Flusher(res)
    await flusher.start()
    await flusher.claim()
    await flusher.read_available()
    assert flusher.buffered > 0
    async with res.connection() as conn:
        await conn.execute("UPDATE segment_shards SET owner = 'other', lease_until = 'infinity'")
    await flusher.claim()  # the lease task learns the shards are gone
    assert flusher.owned == set() and flusher.buffered == 0
    await flusher.cut()
    assert await head(res, c) == 0 and await objects(res) == []
    assert sample("appliance_flusher_shards_owned") == 0


async def test_changed_shard_count_is_a_config_error(
    env: tuple[dict[str, Any], Resources],
) -> None:
    settings, res = env
    await Flusher(res).start()
    settings["segments"]["shards"] = 8
    async with opened(settings, init=False) as other:
        with pytest.raises(ConfigError) as failed:
            await Flusher(other).start()
    assert [p.key for p in failed.value.problems] == ["segments.shards"]


# -- Redis, S3 and PostgreSQL failures ----------------------------------------------------------


async def test_redis_flushall_recreates_the_group(
    settings: dict[str, Any],
    fresh_database: Callable[[], str],
    private_redis: tuple[int, Callable[[], None], Callable[[], None]],
) -> None:
    port, _, _ = private_redis
    dsn = fresh_database()
    await migrated_db(dsn)
    flush_settings(settings, dsn)
    settings["redis"]["url"] = f"redis://127.0.0.1:{port}/0"
    async with opened(settings) as res:
        c = unique("c")
        async with running(res):
            await publish(res, c, 5)
            await eventually(lambda: flushed(res, c, 5), "the first flush")
            await res.redis.flushall()
            # The publish path seeds the counter from PostgreSQL; the flusher meets NOGROUP
            # and reads the new stream from its start.
            assert await publish(res, c, 5) == [6, 7, 8, 9, 10]
            await eventually(lambda: flushed(res, c, 10), "a flush after FLUSHALL")
        assert await durable_and_tail(res, c) == list(range(1, 11))


async def test_redis_outage_is_retried_and_flushing_resumes(
    settings: dict[str, Any],
    fresh_database: Callable[[], str],
    private_redis: tuple[int, Callable[[], None], Callable[[], None]],
) -> None:
    port, start, kill = private_redis
    dsn = fresh_database()
    await migrated_db(dsn)
    flush_settings(settings, dsn)
    settings["redis"]["url"] = f"redis://127.0.0.1:{port}/0"
    settings["redis"]["connect_timeout"] = 1.0
    async with opened(settings) as res:
        c = unique("c")
        async with running(res):
            await publish(res, c, 3)
            await eventually(lambda: flushed(res, c, 3), "the first flush")
            errors = sample("appliance_flush_errors_total", {"dependency": "redis"})
            await asyncio.to_thread(kill)
            await eventually(
                lambda: asyncio.sleep(
                    0, sample("appliance_flush_errors_total", {"dependency": "redis"}) > errors
                ),
                "a Redis failure counted",
            )
            await asyncio.to_thread(start)  # empty: the group is made again
            # As a client does after a 503: a pooled connection the restart closed fails once.
            seqs: list[int] = []
            for _ in range(3):
                try:
                    seqs = await publish(res, c, 3)
                    break
                except RedisConnectionError:
                    await asyncio.sleep(0.1)
            assert seqs == [4, 5, 6]
            await eventually(lambda: flushed(res, c, 6), "flushing after the outage")
        assert await durable_and_tail(res, c) == list(range(1, 7))


@pytest.fixture
def private_s3(tmp_path: Path) -> Iterator[tuple[str, Callable[[], None], Callable[[], None]]]:
    """A moto server of this test's own: (endpoint, start, stop). A restart loses its data."""
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        procs.append(
            subprocess.Popen(
                [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                 "-p", str(port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
        wait_for(lambda: port_open(port), 30, "private moto server")

    def stop() -> None:
        procs[-1].terminate()
        procs[-1].wait(10)

    start()
    yield f"http://127.0.0.1:{port}", start, stop
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


async def test_s3_outage_backs_up_and_drains(
    settings: dict[str, Any],
    fresh_database: Callable[[], str],
    private_s3: tuple[str, Callable[[], None], Callable[[], None]],
) -> None:
    endpoint, start, stop = private_s3
    dsn = fresh_database()
    await migrated_db(dsn)
    flush_settings(settings, dsn)
    settings["s3"]["endpoint_url"] = endpoint
    settings["s3"]["timeout"] = 1.0
    async with opened(settings, init=False) as res:
        c = unique("c")
        shard = str(shard_of(c, 4))
        await asyncio.to_thread(stop)  # S3 is down before anything was written
        errors = sample("appliance_flush_errors_total", {"dependency": "s3"})
        async with running(res):
            await publish(res, c, 10)
            await eventually(
                lambda: asyncio.sleep(
                    0, sample("appliance_flush_errors_total", {"dependency": "s3"}) > errors
                ),
                "an S3 failure counted",
            )
            await publish(res, c, 10)  # publishing goes on
            await eventually(
                lambda: asyncio.sleep(
                    0, sample("appliance_ingest_backlog", {"shard": shard}) >= 20
                ),
                "the backlog gauge",
            )
            assert await head(res, c) == 0
            await asyncio.to_thread(start)
            await res.storage.init()  # a new moto has no bucket
            await eventually(lambda: flushed(res, c, 20), "the backlog drained")
            await eventually(lambda: backlog_is(res, 0), "the ingest stream trimmed")
        assert await durable_and_tail(res, c) == list(range(1, 21))


async def test_postgres_outage_backs_up_and_drains(
    settings: dict[str, Any],
    private_postgres: tuple[str, Callable[[], None], Callable[[], None]],
) -> None:
    dsn, start, kill = private_postgres
    await migrated_db(dsn)
    flush_settings(settings, dsn)
    settings["postgres"]["connect_timeout"] = 1.0
    async with opened(settings) as res:
        c = unique("c")
        shard = str(shard_of(c, 4))
        await publish(res, c, 1)  # a new conversation's first publish asks PostgreSQL
        errors = sample("appliance_flush_errors_total", {"dependency": "postgres"})
        async with running(res):
            await eventually(lambda: flushed(res, c, 1), "the first flush")
            await asyncio.to_thread(kill)
            await publish(res, c, 20)  # publishing needs only Redis
            await eventually(
                lambda: asyncio.sleep(
                    0,
                    sample("appliance_flush_errors_total", {"dependency": "postgres"}) > errors,
                ),
                "a PostgreSQL failure counted",
            )
            await eventually(
                lambda: asyncio.sleep(
                    0, sample("appliance_ingest_backlog", {"shard": shard}) >= 20
                ),
                "the backlog gauge",
            )
            await asyncio.to_thread(start)
            await eventually(lambda: flushed(res, c, 21), "the backlog drained", 60)
            await eventually(lambda: backlog_is(res, 0), "the ingest stream trimmed")
        assert await durable_and_tail(res, c) == list(range(1, 22))


async def test_flush_pending_refuses_shards_held_elsewhere(
    env: tuple[dict[str, Any], Resources],
) -> None:
    _, res = env
    async with res.connection() as conn:
        await index.ensure_shards(conn, 4)
        await conn.execute("UPDATE segment_shards SET owner = 'x', lease_until = 'infinity'")
    with pytest.raises(RuntimeError, match="held by another flusher"):
        await flush_pending(res)


async def test_a_newcomer_gets_a_fair_share(env: tuple[dict[str, Any], Resources]) -> None:
    _, res = env
    first, second = Flusher(res), Flusher(res)
    await first.start()
    await first.claim()
    assert first.owned == {0, 1, 2, 3}
    await second.claim()  # seen alive, but every lease is held
    assert second.owned == set()
    await first.claim()  # hands the shards above its share over
    await second.claim()
    assert len(first.owned) == len(second.owned) == 2
    assert not first.owned & second.owned
    await first.release()  # a clean stop: the other takes them at its next claim
    await second.claim()
    assert second.owned == {0, 1, 2, 3}
    await second.release()


async def test_a_counter_restored_below_the_indexed_head_is_raised(
    env: tuple[dict[str, Any], Resources],
) -> None:
    """Redis back from an older snapshot: the counter says 2 though 5 were flushed. The next cut
    that flushes the conversation raises it, so seqs 3-5 are not handed out again."""
    _, res = env
    c = unique("c")
    await publish(res, c, 5)
    await flush_pending(res)
    await res.redis.set(res.keys.seq(c), 2)  # what an RDB restore of an older moment does
    await res.redis.delete(res.keys.tail(c))
    # A message published meanwhile takes seq 3 (the collision this bounds), then a cut runs.
    assert await publish(res, c, 1) == [3]
    await flush_pending(res)
    assert await res.redis.get(res.keys.seq(c)) == b"5"
    assert await publish(res, c, 1) == [6]


async def test_records_buffered_when_redis_lost_its_data_never_share_a_seq(
    settings: dict[str, Any], fresh_database: Callable[[], str]
) -> None:
    """The flusher has read seqs 6-10 but not cut them when Redis loses the conversation's data
    (only this test's keys are deleted, as a data loss would): the publish script goes on from
    the indexed head (5), so 6-8 go to new messages. The cut indexes those new ones, never the
    lost copies: one message per seq, the acknowledged ones after the loss all kept."""
    dsn = fresh_database()
    await migrated_db(dsn)
    flush_settings(settings, dsn, shards=1)
    async with opened(settings) as res:
        c = unique("c")
        await publish(res, c, 5)
        await flush_pending(res)
        await publish(res, c, 5, size=20)  # seqs 6-10: read below, never flushed
        flusher = Flusher(res)
        await flusher.start()
        await flusher.claim()
        await flusher.read_available()
        assert flusher.buffered > 0
        await res.redis.delete(res.keys.tail(c), res.keys.seq(c), res.keys.ingest(0))
        assert await publish(res, c, 3, size=30) == [6, 7, 8]
        with capture_logs() as logs:
            await flusher.read(None)
            await flusher.read_available()
            await flusher.cut()
        await flusher.release()
        # 6-8 were read again as the new messages (the later read wins); 9 and 10 were lost.
        assert [e["records"] for e in logs if e["event"] == "flush_dropped_lost_records"] == [2]
        await flush_pending(res)
        records = await indexed_records(res, c)
        assert [r.seq for r in records] == list(range(1, 9))
        texts = [msgspec.json.decode(r.payload)["body"]["text"] for r in records]
        assert texts[5:] == ["x" * 30] * 3  # the messages acknowledged after the loss


async def test_a_trickle_is_read_about_once_a_second_not_once_a_message(
    settings: dict[str, Any], fresh_database: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blocking read returns at the first entry: unpaced, a message every 50 ms would be a
    read every 50 ms (Redis and CPU time at low rates). Paced, the reads stay near one a
    second, and what they leave waiting is as safe in Redis; the clean stop flushes it all."""
    dsn = fresh_database()
    await migrated_db(dsn)
    flush_settings(settings, dsn, max_age=5.0)
    reads = 0
    real = Flusher.read

    async def counted(self: Flusher, block: float | None) -> int:
        nonlocal reads
        got = await real(self, block)
        reads += bool(got)
        return got

    monkeypatch.setattr(Flusher, "read", counted)
    async with opened(settings) as res:
        c = unique("c")
        async with running(res):
            for _ in range(50):
                await publish(res, c, 1)
                await asyncio.sleep(0.05)
        assert 1 <= reads <= 12, reads  # about one a second over ~3 s; unpaced it was ~50
        assert await head(res, c) == 50
