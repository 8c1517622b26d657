"""The PostgreSQL pool: opened by its owner (a lifespan or a program), never at import."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
from psycopg_pool import AsyncConnectionPool

from appliance.config.model import PostgresSection


def conninfo(section: PostgresSection) -> str:
    return section.dsn.get_secret_value()


@asynccontextmanager
async def open_pool(section: PostgresSection, name: str) -> AsyncIterator[AsyncConnectionPool]:
    """A pool whose connections autocommit (statements group with `conn.transaction()`)."""
    pool = AsyncConnectionPool(
        conninfo(section),
        min_size=section.pool_min,
        max_size=section.pool_max,
        kwargs={
            "autocommit": True,
            "connect_timeout": max(1, int(section.connect_timeout)),
            "application_name": f"appliance-{name}",
        },
        timeout=section.connect_timeout,
        name=name,
        open=False,
    )
    await pool.open(wait=False)
    try:
        yield pool
    finally:
        await pool.close()


async def connect(
    section: PostgresSection, name: str
) -> psycopg.AsyncConnection[tuple[object, ...]]:
    """One autocommit connection outside the pool (migrations, the worker's LISTEN connection)."""
    return await psycopg.AsyncConnection.connect(
        conninfo(section),
        autocommit=True,
        connect_timeout=max(1, int(section.connect_timeout)),
        application_name=f"appliance-{name}",
    )
