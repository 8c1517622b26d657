"""The publish pipeline (appliance/messages/coalesce.py) against real Redis servers: concurrent
calls share round trips and keep their order, an emptied script cache is survived, one caller's
script error stays its own, a lost server fails every waiting caller and nothing is resent.

What touches a whole server (SCRIPT FLUSH, a script that keeps it busy, a kill) runs on a
private redis-server of the test's own, never on the shared one other runs may be using."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from appliance.config import Config
from appliance.config.model import RedisSection
from appliance.messages.coalesce import ScriptCoalescer
from appliance.redis_keys import client
from tests.messaging import unique

# Appends ARGV[1] to the list KEYS[1] and answers the list's length; "bad" is an error reply.
SCRIPT = """
if ARGV[1] == "bad" then return redis.error_reply("bad argument") end
return redis.call("RPUSH", KEYS[1], ARGV[1])
"""


@pytest.fixture
async def redis(config: Config) -> AsyncIterator[aioredis.Redis]:
    name = unique("coalesce")
    r = client(config.redis, name)
    yield r
    await r.aclose()


PrivateRedis = tuple[int, Callable[[], None], Callable[[], None]]


def private_section(private_redis: PrivateRedis) -> RedisSection:
    return RedisSection.model_validate({"url": f"redis://127.0.0.1:{private_redis[0]}/0"})


@pytest.fixture
async def own_redis(private_redis: PrivateRedis) -> AsyncIterator[aioredis.Redis]:
    """A client on this test's own redis-server."""
    r = client(private_section(private_redis), unique("coalesce"))
    yield r
    await r.aclose()


async def connections_named(r: aioredis.Redis, name: str) -> int:
    clients = await r.client_list()
    return sum(1 for c in clients if c["name"] == f"appliance-{name}")


async def test_concurrent_calls_share_one_connection_and_keep_their_order(
    config: Config,
) -> None:
    name = unique("coalesce")
    r = client(config.redis, name)
    key = f"{config.redis.key_prefix}:{unique('list')}"
    try:
        run = ScriptCoalescer(r, SCRIPT)
        replies = await asyncio.gather(*(run([key], [str(i)]) for i in range(200)))
        assert replies == list(range(1, 201))
        assert await r.lrange(key, 0, -1) == [str(i).encode() for i in range(200)]
        # 200 concurrent calls, one pipeline out at a time: one connection was ever needed.
        assert await connections_named(r, name) == 1
    finally:
        await r.delete(key)
        await r.aclose()


async def test_calls_after_a_batch_form_the_next_one(redis: aioredis.Redis) -> None:
    key = f"coalesce:{unique('list')}"
    run = ScriptCoalescer(redis, SCRIPT)
    try:
        first = asyncio.gather(*(run([key], ["a"]) for _ in range(10)))
        await asyncio.sleep(0)  # the first call is out, nine queue behind it; these behind them
        second = asyncio.gather(*(run([key], ["b"]) for _ in range(10)))
        assert await first == list(range(1, 11))
        assert await second == list(range(11, 21))
        assert await run([key], ["c"]) == 21  # an idle coalescer sends a lone call at once
    finally:
        await redis.delete(key)


async def test_an_emptied_script_cache_is_reloaded_and_each_script_runs_once(
    own_redis: aioredis.Redis,
) -> None:
    key = f"coalesce:{unique('list')}"
    run = ScriptCoalescer(own_redis, SCRIPT)
    assert await run([key], ["x"]) == 1
    await own_redis.script_flush()  # what a Redis restart does to the script cache
    assert await asyncio.gather(*(run([key], ["y"]) for _ in range(5))) == [2, 3, 4, 5, 6]
    assert await own_redis.llen(key) == 6


async def test_one_callers_error_reply_is_its_own(redis: aioredis.Redis) -> None:
    key = f"coalesce:{unique('list')}"
    run = ScriptCoalescer(redis, SCRIPT)
    try:
        results = await asyncio.gather(
            run([key], ["a"]), run([key], ["bad"]), run([key], ["b"]), return_exceptions=True
        )
        assert results[0] == 1 and results[2] == 2
        assert isinstance(results[1], ResponseError) and "bad argument" in str(results[1])
    finally:
        await redis.delete(key)


async def test_a_caller_cancelled_before_its_batch_leaves_is_not_sent(
    redis: aioredis.Redis,
) -> None:
    key = f"coalesce:{unique('list')}"
    run = ScriptCoalescer(redis, SCRIPT)
    try:
        calls = [asyncio.ensure_future(run([key], [str(i)])) for i in range(3)]
        await asyncio.sleep(0)  # the first is out; the other two queue behind it
        calls[1].cancel()
        done = await asyncio.gather(*calls, return_exceptions=True)
        assert done[0] == 1 and done[2] == 2
        assert isinstance(done[1], asyncio.CancelledError)
        assert await redis.lrange(key, 0, -1) == [b"0", b"2"]
    finally:
        await redis.delete(key)


async def test_a_caller_cancelled_while_its_script_is_out_leaves_the_others_their_replies(
    private_redis: PrivateRedis, own_redis: aioredis.Redis
) -> None:
    redis = own_redis
    name = unique("out")
    r = client(private_section(private_redis), name)
    key = f"coalesce:{unique('list')}"
    run = ScriptCoalescer(r, SCRIPT)
    try:
        assert await run([f"{key}:warm"], ["w"]) == 1  # the script cached, as on a live server
        # The server holds every write (scripts included) until unpaused: the first call sits
        # sent but unanswered, and the next two queue behind it.
        await redis.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
        calls = [asyncio.ensure_future(run([key], [str(i)])) for i in range(3)]
        try:
            async with asyncio.timeout(10):  # until the server holds the first call
                while not any(
                    c["name"] == f"appliance-{name}" and c["cmd"] == "evalsha" and "b" in c["flags"]
                    for c in await redis.client_list()
                ):
                    await asyncio.sleep(0.01)
            calls[0].cancel()
            await asyncio.sleep(0)
        finally:
            await redis.execute_command("CLIENT", "UNPAUSE")
        done = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
        assert isinstance(done[0], asyncio.CancelledError)
        # The cancelled call's connection was closed with its command held unrun (Redis drops
        # a paused client's command when it goes): the others got their own replies, in order,
        # on a new connection, and nothing sent the cancelled one again.
        assert done[1:] == [1, 2]
        assert await redis.lrange(key, 0, -1) == [b"1", b"2"]
    finally:
        await r.aclose()


async def test_a_lost_server_fails_every_waiting_caller_and_nothing_is_resent(
    private_redis: PrivateRedis,
) -> None:
    _, start, kill = private_redis
    r = client(private_section(private_redis), unique("lost"))
    run = ScriptCoalescer(r, SCRIPT)
    try:
        assert await run(["k"], ["before"]) == 1
        kill()
        results = await asyncio.wait_for(
            asyncio.gather(*(run(["k"], ["lost"]) for _ in range(20)), return_exceptions=True), 10
        )
        assert all(isinstance(e, RedisConnectionError) for e in results), results
        start()  # a new, empty server
        assert await run(["k"], ["after"]) == 1  # the script loaded again; no "lost" was resent
        assert await r.lrange("k", 0, -1) == [b"after"]
    finally:
        await r.aclose()


async def test_a_script_redis_cannot_load_fails_each_caller_with_its_error(
    redis: aioredis.Redis,
) -> None:
    run = ScriptCoalescer(redis, "this is not lua")
    results = await asyncio.wait_for(
        asyncio.gather(*(run(["k"], ["a"]) for _ in range(3)), return_exceptions=True), 10
    )
    assert all(isinstance(e, ResponseError) and "compil" in str(e).lower() for e in results)
