"""The PostgreSQL pool: opened by its owner (a lifespan or a program), never at import.

The pool knows when PostgreSQL is down, so that its users do not each wait out a connect timeout.
A sign of trouble (a connection broke, none came within the timeout, the pool gave up
reconnecting) starts a probe: one direct connection and `SELECT 1`. If PostgreSQL cannot be
reached, the pool is *down*: `getconn()` raises `PostgresDown` at once (callers already waiting
are released with it too), and the probe repeats every `PROBE_INTERVAL` seconds. Its first success
opens the pool again, then checks the idle connections (those that died or do not answer within
the connect timeout are replaced), so recovery takes one probe interval, not psycopg_pool's
reconnect back-off, which doubles from 1 s for `reconnect_timeout` (kept short here: a failed
slot is given up and regrown on demand at once), nor a half-open idle connection's silence.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from appliance.config.model import PostgresSection

log = structlog.get_logger()
Conn = psycopg.AsyncConnection[Any]
PROBE_INTERVAL = 0.5
# A connection slot that cannot reconnect is given up after this long (psycopg_pool's default,
# 300 s of doubling delays, is what kept the pool empty for 17 s after PostgreSQL was back).
RECONNECT_TIMEOUT = 1.0


class PostgresDown(psycopg.OperationalError):
    """PostgreSQL is known to be down: raised at once, without trying to connect."""


def unreachable(exc: BaseException) -> bool:
    """Whether `exc` says PostgreSQL cannot be reached, not that it answered with an error
    (too many connections, a bad password: PostgreSQL is there). 57P: shutting down, starting."""
    if not isinstance(exc, psycopg.OperationalError | OSError | TimeoutError):
        return False
    state = getattr(exc, "sqlstate", None)
    return state is None or state.startswith("57P")


def conninfo(section: PostgresSection) -> str:
    return section.dsn.get_secret_value()


def _kwargs(section: PostgresSection, name: str) -> dict[str, Any]:
    return {
        "autocommit": True,
        "connect_timeout": max(1, int(section.connect_timeout)),
        "application_name": f"appliance-{name}",
    }


class Pool(AsyncConnectionPool[Conn]):
    """An autocommit pool (statements group with `conn.transaction()`) that fails fast while
    PostgreSQL is down and is back within `PROBE_INTERVAL` of PostgreSQL's return."""

    def __init__(self, section: PostgresSection, name: str) -> None:
        super().__init__(
            conninfo(section),
            min_size=section.pool_min,
            max_size=section.pool_max,
            kwargs=_kwargs(section, name),
            timeout=section.connect_timeout,
            reconnect_timeout=RECONNECT_TIMEOUT,
            name=name,
            open=False,
        )
        self._connect_timeout = section.connect_timeout
        self._probe_with = (conninfo(section), _kwargs(section, f"{name}-probe"))
        self.down_since: float | None = None  # time.monotonic() of the failed probe, or None
        self.last_error = ""
        self._probe: asyncio.Task[None] | None = None
        self._tripped: asyncio.Future[None] | None = None  # done when the pool goes down
        self._returning: set[asyncio.Task[None]] = set()

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def _down_error(self) -> PostgresDown:
        since = time.monotonic() - (self.down_since or time.monotonic())
        return PostgresDown(
            f"postgresql known down for {since:.1f}s, probed every {PROBE_INTERVAL:g}s"
            f" ({self.last_error})"
        )

    async def getconn(self, timeout: float | None = None) -> Conn:
        if self.down_since is not None:
            raise self._down_error()
        if self._tripped is None:
            self._tripped = asyncio.get_running_loop().create_future()
        tripped = self._tripped
        waiter = asyncio.ensure_future(super().getconn(timeout))
        try:
            await asyncio.wait((waiter, tripped), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self._abandon(waiter)
            raise
        if not waiter.done():  # the pool went down while this caller waited
            self._abandon(waiter)
            raise self._down_error()
        try:
            return waiter.result()
        except psycopg.OperationalError as exc:  # PoolTimeout among them
            self.suspect(exc)
            raise

    def _abandon(self, waiter: asyncio.Future[Conn]) -> None:
        """Let go of a getconn() nobody awaits; a connection it yields goes back to the pool."""

        def give_back(done: asyncio.Future[Conn]) -> None:
            if not done.cancelled() and done.exception() is None:
                task = asyncio.ensure_future(self.putconn(done.result()))
                self._returning.add(task)
                task.add_done_callback(self._returning.discard)

        waiter.cancel()
        waiter.add_done_callback(give_back)

    async def putconn(self, conn: Conn) -> None:
        broken = conn.broken
        await super().putconn(conn)
        if broken:
            self.suspect("a connection broke")

    async def reconnect_failed(self) -> None:
        self.suspect(f"no new connection within {RECONNECT_TIMEOUT:g}s")
        await super().reconnect_failed()

    def suspect(self, reason: BaseException | str) -> None:
        """Start a probe (unless one runs): PostgreSQL may be down."""
        if isinstance(reason, BaseException) and not (
            isinstance(reason, PoolTimeout) or unreachable(reason)
        ):
            return
        if self.closed or (self._probe is not None and not self._probe.done()):
            return
        self._probe = asyncio.get_running_loop().create_task(
            self._probe_until_up(), name=f"postgres-probe-{self.name}"
        )

    async def _probe_until_up(self) -> None:
        while (error := await self.probe()) is not None:
            if self.down_since is None:
                self.down_since = time.monotonic()
                log.warning("postgres_down", pool=self.name, error=error)
                if self._tripped is not None:
                    self._tripped.set_result(None)
                    self._tripped = None
            self.last_error = error
            await asyncio.sleep(PROBE_INTERVAL)
        if self.down_since is not None:
            # Up first: the check below must not hold the pool down (a half-open connection
            # answers nothing until its TCP keepalive gives up, many minutes).
            log.info("postgres_up", pool=self.name, down_for=time.monotonic() - self.down_since)
            self.down_since = None
            # Idle connections may have died meanwhile: test them (dead ones are replaced), so
            # the first callers after the outage do not each find one.
            try:
                await self.check()
            except Exception:  # a bug there must not matter: callers find out
                log.exception("postgres_pool_check_failed", pool=self.name)

    async def check_connection(self, conn: Conn) -> None:  # type: ignore[override]
        """psycopg_pool's test of an idle connection (by `check()`), bounded by the connect
        timeout: one that does not answer is closed and replaced like a broken one."""
        try:
            async with asyncio.timeout(self._connect_timeout):
                await super().check_connection(conn)
        except TimeoutError:
            await conn.close()  # closes the socket without waiting for an answer
            raise psycopg.OperationalError(
                f"idle connection did not answer within {self._connect_timeout:g}s"
            ) from None

    async def probe(self) -> str | None:
        """None if PostgreSQL can be reached, else why not (host and port, never the password)."""
        try:
            async with asyncio.timeout(max(2.0, self._connect_timeout)):
                dsn, kwargs = self._probe_with
                conn = await psycopg.AsyncConnection.connect(dsn, **kwargs)
                async with conn:
                    await conn.execute("SELECT 1")
        except (psycopg.Error, OSError, TimeoutError) as exc:
            if not unreachable(exc):
                return None
            return (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        except Exception as exc:
            # Not an answer from PostgreSQL: keep probing (a probe that died would leave the
            # pool down for good), and say so in the log.
            log.exception("postgres_probe_failed", pool=self.name)
            return type(exc).__name__
        return None

    async def close(self, timeout: float = 5.0) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        await super().close(timeout)


@asynccontextmanager
async def open_pool(section: PostgresSection, name: str) -> AsyncIterator[Pool]:
    pool = Pool(section, name)
    await pool.open(wait=False)
    try:
        yield pool
    finally:
        await pool.close()


async def connect(section: PostgresSection, name: str) -> Conn:
    """One autocommit connection outside the pool (migrations, the worker's LISTEN connection)."""
    return await psycopg.AsyncConnection.connect(conninfo(section), **_kwargs(section, name))
