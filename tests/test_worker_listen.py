"""The worker's LISTEN connection going silent, through a TCP proxy that stops forwarding it:
bytes are taken and dropped (TCP still acknowledges them) and nothing comes back, which is a
partition as the worker sees it before any TCP timeout. pgqueuer would only notice at its next
poll (30 s here); the worker's liveness check replaces the connection within seconds."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import structlog

from appliance.config import Config
from appliance.db.queue_driver import SplitDriver, connect_worker
from appliance.diagnostics.roundtrip import ping_worker
from appliance.programs.worker import LIVENESS_INTERVAL, LIVENESS_TIMEOUT, run_worker
from appliance.resources import open_resources

SEEN_BYTES = 4096  # enough of a connection's start to hold its startup packet


class Link:
    """One proxied connection; `silent` drops what goes either way from then on."""

    def __init__(self) -> None:
        self.seen = b""
        self.silent = False
        self.writers: list[asyncio.StreamWriter] = []

    async def pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: bool
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if client and len(self.seen) < SEEN_BYTES:
                    self.seen += data
                if not self.silent:
                    writer.write(data)
                    await writer.drain()
        if not self.silent:
            writer.close()


class SilencingProxy:
    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.links: list[Link] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        link = Link()
        link.writers = [writer, up_writer]
        self.links.append(link)
        for task in (
            asyncio.create_task(link.pump(reader, up_writer, client=True)),
            asyncio.create_task(link.pump(up_reader, writer, client=False)),
        ):
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def silence(self, marker: bytes) -> int:
        """Silence the open connections whose start holds `marker`; how many they were."""
        chosen = [link for link in self.links if marker in link.seen and not link.silent]
        for link in chosen:
            link.silent = True
        return len(chosen)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[int]:
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        try:
            yield server.sockets[0].getsockname()[1]
        finally:
            server.close()
            for link in self.links:
                for writer in link.writers:
                    writer.close()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)


def through(dsn: str, port: int) -> str:
    parts = urlsplit(dsn)
    user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{port}"))


async def test_a_silent_listen_connection_is_replaced_within_seconds(
    settings: dict[str, Any], migrated: str
) -> None:
    target = urlsplit(migrated)
    proxy = SilencingProxy(target.hostname or "127.0.0.1", target.port or 5432)
    async with proxy.running() as port:
        settings["postgres"]["dsn"] = through(migrated, port)
        settings["worker"]["poll_interval"] = 30.0
        settings["appliance"]["instance"] = "listen-silent"
        async with open_resources(Config.model_validate(settings), "test") as res:
            stop = asyncio.Event()
            with structlog.testing.capture_logs() as logs:
                task = asyncio.create_task(run_worker(res, stop))
                try:
                    await ping_worker(res, timeout=15)
                    assert proxy.silence(b"appliance-worker-listen") == 1
                    loop = asyncio.get_running_loop()
                    silenced = loop.time()
                    # Due within LIVENESS_INTERVAL + LIVENESS_TIMEOUT (7 s); 20 s is the margin.
                    while not any(e["event"] == "worker_disconnected" for e in logs):
                        if loop.time() - silenced > 20:
                            pytest.fail("the worker did not notice its silent LISTEN connection")
                        await asyncio.sleep(0.1)
                    noticed = loop.time() - silenced
                    answer = await ping_worker(res, timeout=30)
                finally:
                    stop.set()
                    await asyncio.wait_for(task, 30)
    print(f"silent LISTEN connection noticed after {noticed:.1f}s")
    assert noticed >= LIVENESS_TIMEOUT  # it was the probe's timeout, not an error, that told
    assert noticed <= 3 * (LIVENESS_INTERVAL + LIVENESS_TIMEOUT)
    lost = next(e for e in logs if e["event"] == "worker_disconnected")
    assert "did not answer" in lost["error"], lost
    assert answer["instance"] == "listen-silent"
    assert sum(e["event"] == "worker_ready" for e in logs) >= 2


async def test_a_notify_sent_before_the_listen_waits_for_it(config: Config, migrated: str) -> None:
    """pgqueuer's first health probe may go out before its LISTEN is in place; the driver holds
    it until the LISTEN is, so the probe is heard (it was lost, and the session ended)."""
    queries = await connect_worker(config.postgres, "test-queries")
    listen = await connect_worker(config.postgres, "test-listen")
    driver = SplitDriver(queries, listen)
    heard: list[str] = []
    try:
        probe = asyncio.create_task(driver.notify("appliance_test_probe", "probe-1"))
        await asyncio.sleep(0.2)
        assert not probe.done()  # waiting for a LISTEN
        await driver.add_listener("appliance_test_probe", heard.append)
        await asyncio.wait_for(probe, 5)
        deadline = asyncio.get_running_loop().time() + 10
        while not heard and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert heard == ["probe-1"]
    finally:
        driver.shutdown.set()
        await queries.close()
        await listen.close()
