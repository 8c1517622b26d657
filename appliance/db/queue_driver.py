"""A pgqueuer driver over two connections: one runs queries, the other only LISTENs.

pgqueuer's PsycopgDriver shares one connection between its NOTIFY watcher and its queries, and
the watcher holds that connection in `notifies(timeout=1.0)` whenever the queue is idle, so the
dequeue a NOTIFY triggers waits up to a second per query (measured: 1.0-2.0 s from enqueue to
start on an idle worker). With LISTEN on a connection of its own, the wake-up is immediate.
Both connections must be autocommit; the caller opens and closes them.
"""

from __future__ import annotations

import asyncio
from typing import Any, Self

import psycopg
from pgqueuer import PsycopgDriver


class SplitDriver:
    """pgqueuer's Driver protocol: fetch/execute/notify on `queries`, listeners on `listen`."""

    def __init__(
        self, queries: psycopg.AsyncConnection[Any], listen: psycopg.AsyncConnection[Any]
    ) -> None:
        self._queries = PsycopgDriver(queries)
        self._listen = PsycopgDriver(listen)

    async def fetch(self, query: str, *args: object) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = await self._queries.fetch(query, *args)
        return rows

    async def execute(self, query: str, *args: object) -> str:
        status: str = await self._queries.execute(query, *args)
        return status

    async def notify(self, channel: str, payload: str) -> None:
        await self._queries.notify(channel, payload)

    async def add_listener(self, channel: str, callback: Any) -> None:
        await self._listen.add_listener(channel, callback)

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
