"""What redis-py raises from a dead connection is an outage, never a bug: on a private Redis,
restarted or reset under load, with both event loops (granian runs the api on uvloop, which
raises RuntimeError for a write to a transport it closed; asyncio does not).

- The hub: sockets joining and leaving channels while Redis restarts, each join's failure an
  outage (`Unavailable`); the reader lives on and delivers again once Redis is back. (The old
  hub's race, two tasks reconnecting one pub/sub connection, needed a read to start during a
  handshake: this loop did not hit it against the old code, so it guards the new one.)
- The pooled client: connections reset by the server (RST) fail with ConnectionError, which the
  api answers 503, and the next command reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
import struct
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvloop
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from appliance.config.model import RedisSection
from appliance.errors import Unavailable
from appliance.realtime.hub import Hub
from appliance.redis_keys import Keys, client

PrivateRedis = tuple[int, Callable[[], None], Callable[[], None]]
RESTARTS = 6
LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}


def run(loop: str, scenario: Coroutine[Any, Any, None]) -> None:
    LOOPS[loop](asyncio.wait_for(scenario, 90))


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.05)


class Recorder:
    def __init__(self) -> None:
        self.frames: list[str] = []

    def on_frame(self, seq: int | None, at: float | None, frame: str) -> None:
        self.frames.append(frame)

    def resync(self) -> None:
        pass


@pytest.mark.parametrize("loop", list(LOOPS))
def test_the_hub_meets_redis_restarts_as_outages(
    loop: str, private_redis: PrivateRedis, redis_prefix: str
) -> None:
    port, start, kill = private_redis
    section = RedisSection(url=f"redis://127.0.0.1:{port}/0", connect_timeout=2.0)
    keys = Keys(f"{redis_prefix}:hubfault", 4)
    unexpected: list[BaseException] = []

    async def scenario() -> None:
        hub = Hub(section, keys, lambda _: None)
        await hub.start()
        publisher = client(section, "test")
        steady = Recorder()
        await hub.join("steady", steady)
        stop = asyncio.Event()

        async def churn(n: int) -> None:
            listener = Recorder()
            while not stop.is_set():
                channel = f"churn-{n % 5}"
                try:
                    await hub.join(channel, listener)
                    await asyncio.sleep(0)
                    await hub.leave(channel, listener)
                except Unavailable:
                    await asyncio.sleep(0.01)
                except Exception as exc:  # what this test is about: never anything else
                    unexpected.append(exc)
                    return

        async def delivered(mark: str) -> bool:
            with contextlib.suppress(RedisConnectionError, RedisTimeoutError):
                await publisher.publish("steady", json.dumps({"event": "mark", "mark": mark}))
            await asyncio.sleep(0.05)
            return any(mark in frame for frame in steady.frames)

        tasks = [asyncio.create_task(churn(n)) for n in range(12)]
        try:
            for restart in range(RESTARTS):
                await asyncio.sleep(0.2)  # churning against a live Redis
                kill()
                await asyncio.sleep(0.1)
                start()
                mark = f"back-{restart}"
                await until(functools.partial(delivered, mark), f"a frame after restart {restart}")
                assert not unexpected, unexpected
            assert hub._reader is not None and not hub._reader.done()
        finally:
            stop.set()
            await asyncio.gather(*tasks)
            await hub.aclose()
            await publisher.aclose()
        assert not unexpected, unexpected

    run(loop, scenario())


class ResettingProxy:
    """A TCP proxy to Redis that can reset (RST) every client connection at once."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.clients: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        self.clients.append(writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, RuntimeError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def reset_all(self) -> None:
        for writer in self.clients:
            sock = writer.get_extra_info("socket")
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        self.clients.clear()

    async def aclose(self) -> None:
        self.reset_all()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.mark.parametrize("loop", list(LOOPS))
def test_pooled_connections_reset_by_the_server_fail_as_connection_errors(
    loop: str, private_redis: PrivateRedis
) -> None:
    """A command on a connection the server reset either meets a ConnectionError (a 503) or is
    carried by a new connection (redis-py 8.2 notices a reset connection when the pool hands it
    out, and reconnects): never another error, and the next commands work. A write on such a
    connection, past the pool's check, fails as a ConnectionError whatever the event loop
    raises for it (uvloop raised RuntimeError through older redis-py: redis_keys wraps it)."""
    port, _, _ = private_redis

    async def scenario() -> None:
        proxy = ResettingProxy(port)
        section = RedisSection(url=f"redis://127.0.0.1:{await proxy.start()}/0")
        redis = client(section, "test")
        failures: list[BaseException] = []
        try:
            for _ in range(3):
                await asyncio.gather(*(redis.incr("n") for _ in range(10)))  # ten pooled
                proxy.reset_all()
                await asyncio.sleep(0.2)  # the resets reach the idle connections
                results = await asyncio.gather(
                    *(redis.incr("n") for _ in range(10)), return_exceptions=True
                )
                failures += [r for r in results if isinstance(r, BaseException)]
                # A connection that failed was dropped: the next command on it reconnects.
                await asyncio.gather(*(redis.incr("n") for _ in range(10)))
            assert all(isinstance(e, RedisConnectionError) for e in failures), failures

            # Past the pool's check: a connection reset under a command being sent.
            connection = await redis.connection_pool.get_connection()
            try:
                proxy.reset_all()
                await asyncio.sleep(0.2)
                with pytest.raises(RedisConnectionError):
                    for _ in range(50):  # the first write may still reach the kernel's buffer
                        await connection.send_command("PING", check_health=False)
                        await connection.read_response()
                assert not connection.is_connected
            finally:
                await redis.connection_pool.release(connection)
            assert await redis.incr("n") > 0
        finally:
            await redis.aclose()
            await proxy.aclose()

    run(loop, scenario())
