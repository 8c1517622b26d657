"""A pgqueuer driver over two connections: one runs queries, the other only LISTENs.

pgqueuer's PsycopgDriver shares one connection between its NOTIFY watcher and its queries, and
the watcher holds that connection in `notifies(timeout=1.0)` whenever the queue is idle, so the
dequeue a NOTIFY triggers waits up to a second per query (measured: 1.0-2.0 s from enqueue to
start on an idle worker). With LISTEN on a connection of its own, the wake-up is immediate.
Both connections must be autocommit; the caller opens them (`connect_worker`) and closes them.

A LISTEN connection that dies says nothing: pgqueuer's watcher task ends, and pgqueuer's own
NOTIFY probe only surfaces at its next poll (`[worker] poll_interval`, 30 s by default).
`watch_listen` notices within seconds instead, and TCP keepalives cover a peer that vanished
without closing the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Self

import psycopg
from pgqueuer import PsycopgDriver

from appliance.config.model import PostgresSection
from appliance.db.pool import conninfo


async def connect_worker(section: PostgresSection, name: str) -> psycopg.AsyncConnection[Any]:
    """An autocommit connection of the worker's own (outside the pool), with TCP keepalives: an
    idle connection whose peer vanished without a FIN (a failover, a dropped NAT or proxy entry)
    is found dead by the kernel after 5 + 2 x 3 = 11 s; data unacknowledged for 10 s fails."""
    return await psycopg.AsyncConnection.connect(
        conninfo(section),
        autocommit=True,
        connect_timeout=max(1, int(section.connect_timeout)),
        application_name=f"appliance-{name}",
        keepalives=1,
        keepalives_idle=5,
        keepalives_interval=2,
        keepalives_count=3,
        tcp_user_timeout=10_000,
    )


LISTEN_WAIT = 5.0  # seconds a NOTIFY waits for the LISTEN connection to be listening


class SplitDriver:
    """pgqueuer's Driver protocol: fetch/execute/notify on `queries`, listeners on `listen`."""

    def __init__(
        self, queries: psycopg.AsyncConnection[Any], listen: psycopg.AsyncConnection[Any]
    ) -> None:
        self._queries = PsycopgDriver(queries)
        self._listen = PsycopgDriver(listen)
        self._listen_conn = listen
        self._listening = asyncio.Event()  # set once a LISTEN is in place

    async def watch_listen(self, interval: float, timeout: float) -> None:
        """Every `interval` seconds, `SELECT 1` on the LISTEN connection (psycopg keeps a
        NOTIFY that arrives meanwhile for the watcher); returns never, and raises
        `psycopg.OperationalError` once the connection is lost or has not answered within
        `timeout` (which includes waiting for the watcher's lock, held up to a second).

        A probe that does not answer is left running, not cancelled: psycopg would first try
        to cancel it on the server, up to 10 s more on a connection that may be gone. Closing
        the connection ends it."""
        while True:
            await asyncio.sleep(interval)
            probe = asyncio.ensure_future(self._listen_conn.execute("SELECT 1"))
            try:
                done, _ = await asyncio.wait({probe}, timeout=timeout)
            finally:
                if not probe.done():
                    probe.add_done_callback(_ignore_outcome)
            if not done:
                raise psycopg.OperationalError(
                    f"the LISTEN connection did not answer within {timeout:g}s"
                )
            probe.result()  # raises when the connection is lost

    async def fetch(self, query: str, *args: object) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = await self._queries.fetch(query, *args)
        return rows

    async def execute(self, query: str, *args: object) -> str:
        status: str = await self._queries.execute(query, *args)
        return status

    async def notify(self, channel: str, payload: str) -> None:
        # pgqueuer's first health probe is a NOTIFY that its listener must hear: sent before
        # the LISTEN is in place it is lost, and the probe's timeout ends the session (seen:
        # 2 of 3 sessions of an idle worker in 45 s, each a reconnect). Wait for the LISTEN,
        # briefly: without one, a NOTIFY goes out as before.
        if not self._listening.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._listening.wait(), LISTEN_WAIT)
        await self._queries.notify(channel, payload)

    async def add_listener(self, channel: str, callback: Any) -> None:
        await self._listen.add_listener(channel, callback)
        self._listening.set()

    async def remove_listener(self, channel: str, callback: Any) -> None:
        await self._listen.remove_listener(channel, callback)

    @property
    def shutdown(self) -> asyncio.Event:
        event: asyncio.Event = self._listen.shutdown
        return event

    @property
    def tm(self) -> Any:
        return self._listen.tm

    async def __aenter__(self) -> Self:
        await self._listen.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._listen.__aexit__(*exc)


def _ignore_outcome(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned probe's outcome (its connection is being closed anyway)."""
    if not task.cancelled():
        task.exception()
