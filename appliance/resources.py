"""The connections a program holds: opened together in one async context, closed together."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import redis.asyncio as aioredis

from appliance.config import Config
from appliance.db.pool import Pool, connect, open_pool
from appliance.redis_keys import Keys, client
from appliance.storage import Storage

Conn = psycopg.AsyncConnection[Any]
ConnFactory = Callable[[], AbstractAsyncContextManager[Conn]]


@dataclass
class Resources:
    config: Config
    pool: Pool  # fails fast while PostgreSQL is known down (appliance/db/pool.py)
    redis: aioredis.Redis
    storage: Storage
    keys: Keys

    def connection(self) -> AbstractAsyncContextManager[Conn]:
        return self.pool.connection(timeout=self.config.postgres.connect_timeout)


def keys_for(config: Config) -> Keys:
    return Keys(config.redis.key_prefix, config.segments.shards)


@asynccontextmanager
async def open_resources(config: Config, name: str) -> AsyncIterator[Resources]:
    redis = client(config.redis, name)
    try:
        async with open_pool(config.postgres, name) as pool:
            yield Resources(config, pool, redis, Storage.create(config.s3), keys_for(config))
    finally:
        await redis.aclose()


def direct_connection(config: Config, name: str) -> ConnFactory:
    """A factory of one-off connections (for `wait` and `doctor`, which must not hold a pool)."""

    @asynccontextmanager
    async def factory() -> AsyncIterator[Conn]:
        conn = await connect(config.postgres, name)
        try:
            yield conn
        finally:
            await conn.close()

    return factory
