"""Dependency checks with latency, shared by `/readyz`, `appliance wait`, `status` and `doctor`.

A check is an async callable returning a short detail string or raising; `run_check` turns it into
a `CheckResult` under a timeout, so no check can hang a probe. A failure's detail starts with its
cause (`connection refused: …`, `DNS failure: …`, `timeout: …`, `authentication failed: …`), so an
operator knows what to fix before reading the client's message.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis
from psycopg import Error as PgError
from redis.exceptions import RedisError, ResponseError

from appliance import heartbeat
from appliance.config import Config
from appliance.db.migrate import expected_version, schema_version
from appliance.errors import ApplianceError
from appliance.redis_keys import Keys
from appliance.resources import ConnFactory, Resources
from appliance.segments import backlog
from appliance.storage import Storage

Check = Callable[[], Awaitable[str]]


class CheckFailed(Exception):
    """A dependency answered, but not as required."""


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    latency_ms: float
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Causes, most specific first, with lower-case fragments of the clients' messages. libpq gives
# only text; redis-py and botocore also chain the socket error, which `cause_of` reads first.
CAUSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("DNS failure", ("could not translate host name", "failed to resolve host",
                     "name or service not known", "nodename nor servname",
                     "temporary failure in name resolution", "no address associated")),
    ("connection refused", ("connection refused", "error 111 ", "connect call failed")),
    ("authentication failed", ("password authentication failed", "authentication failed",
                               "no pg_hba.conf entry", "invalid username-password", "wrongpass",
                               "noauth", "invalidaccesskeyid", "signaturedoesnotmatch",
                               "accessdenied", "forbidden")),
    ("TLS failure", ("ssl error", "sslerror", "certificate verify", "tlsv1")),
    ("timeout", ("timeout", "timed out")),
)  # fmt: skip


def cause_of(exc: BaseException) -> str | None:
    """What kind of failure `exc` is (a key of CAUSES), from its chain or its message."""
    seen: list[BaseException] = []
    node: BaseException | None = exc
    while node is not None and node not in seen and len(seen) < 10:
        seen.append(node)
        node = node.__cause__ or node.__context__
    for node in reversed(seen):  # the socket error at the bottom is the most precise
        if isinstance(node, socket.gaierror):
            return "DNS failure"
        if isinstance(node, ConnectionRefusedError):
            return "connection refused"
        if isinstance(node, ssl.SSLError):
            return "TLS failure"
        if isinstance(node, TimeoutError):
            return "timeout"
    text = " ".join(str(n) for n in seen).lower()
    if re.search(r'\brole "[^"]*" does not exist', text):
        return "authentication failed"
    if re.search(r'\bdatabase "[^"]*" does not exist', text):
        return "database does not exist"
    for cause, fragments in CAUSES:
        if any(f in text for f in fragments):
            return cause
    return None


def describe(exc: BaseException) -> str:
    """One line: the cause, then the client's first line (hosts and ports, never a password)."""
    message = (str(exc) or type(exc).__name__).strip().splitlines()[0].strip()
    cause = cause_of(exc)
    if cause is None or message.lower().startswith(cause.lower()):
        return message
    return f"{cause}: {message}"


async def run_check(name: str, check: Check, timeout: float) -> CheckResult:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            detail = await check()
        ok = True
    except TimeoutError:
        ok, detail = False, f"timeout: no answer within {timeout:g}s"
    except CheckFailed as exc:
        ok, detail = False, str(exc)
    except (ApplianceError, PgError, RedisError, OSError) as exc:
        ok, detail = False, describe(exc)
    except Exception as exc:
        # Anything else is a failed check too: a probe answers 503 with the reason, never 500.
        ok, detail = False, f"{type(exc).__name__}: {describe(exc)}"
    latency = round((time.perf_counter() - started) * 1000, 2)
    return CheckResult(name, ok, latency, detail)


def postgres_check(connection: ConnFactory) -> Check:
    async def check() -> str:
        async with connection() as conn:
            await conn.execute("SELECT 1")
        return "SELECT 1 ok"

    return check


def schema_check(connection: ConnFactory) -> Check:
    async def check() -> str:
        async with connection() as conn:
            have = await schema_version(conn)
        want = expected_version()
        if have != want:
            raise CheckFailed(f"schema version {have}, expected {want}: run `appliance migrate`")
        return f"version {have}"

    return check


async def redis_persistence(redis: aioredis.Redis) -> str:
    """aof, rdb, aof+rdb, none, or unknown (managed Redis often forbids CONFIG)."""
    try:
        raw: dict[Any, Any] = await redis.config_get("appendonly", "save")
    except ResponseError:
        return "unknown"
    config = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }
    modes = []
    if config.get("appendonly") == "yes":
        modes.append("aof")
    if config.get("save"):
        modes.append("rdb")
    return "+".join(modes) or "none"


def redis_check(redis: aioredis.Redis, require_persistence: bool) -> Check:
    async def check() -> str:
        await redis.ping()
        persistence = await redis_persistence(redis)
        if require_persistence and persistence == "none":
            raise CheckFailed("Redis has no persistence (redis.require_persistence = true)")
        return f"PING ok, persistence={persistence}"

    return check


def s3_check(storage: Storage, missing_ok: bool = False) -> Check:
    """HeadBucket; with `missing_ok`, S3 answering without the bucket passes (init creates it)."""

    async def check() -> str:
        if await storage.bucket_exists():
            return f"bucket {storage.bucket} ok"
        if missing_ok:
            return f"S3 answers; bucket {storage.bucket} missing (storage init creates it)"
        raise CheckFailed(f"bucket {storage.bucket} does not exist: run `appliance storage init`")

    return check


def heartbeat_check(redis: aioredis.Redis, keys: Keys, config: Config) -> Check:
    """Each enabled program of this instance has a heartbeat younger than its TTL."""

    async def check() -> str:
        roles: list[str] = list(config.appliance.roles)
        mine = await heartbeat.read_instance(redis, keys, config.appliance.instance, roles)
        limit = heartbeat.ttl_for(config.appliance.heartbeat_interval)
        stale = [p for p in config.appliance.roles if p not in mine or mine[p].age > limit]
        if stale:
            raise CheckFailed(f"no fresh heartbeat from {', '.join(stale)}")
        return ", ".join(f"{p} {mine[p].age:.1f}s" for p in config.appliance.roles)

    return check


def dependency_checks(
    config: Config,
    connection: ConnFactory,
    redis: aioredis.Redis,
    storage: Storage,
    bucket_missing_ok: bool = False,
) -> dict[str, Check]:
    return {
        "postgres": postgres_check(connection),
        "redis": redis_check(redis, config.redis.require_persistence),
        "s3": s3_check(storage, bucket_missing_ok),
    }


async def run_checks(checks: dict[str, Check], timeout: float) -> list[CheckResult]:
    """Every check concurrently, each under `timeout`; results in the order given."""
    return list(await asyncio.gather(*(run_check(n, c, timeout) for n, c in checks.items())))


def backlog_check(redis: aioredis.Redis, keys: Keys) -> Check:
    """Reports what waits to be flushed; never fails for it. Redis absorbs a backlog while S3 or
    PostgreSQL is away and publishing goes on, so a backlog is a metric to alert on
    (appliance_oldest_unflushed_seconds), not a reason to take the api out of service."""

    async def check() -> str:
        return backlog.summary(await backlog.backlog(redis, keys))

    return check


async def readiness(res: Resources) -> list[CheckResult]:
    """All readiness checks, concurrently, each under `[api] check_timeout`."""
    checks = dependency_checks(res.config, res.connection, res.redis, res.storage)
    checks["schema"] = schema_check(res.connection)
    checks["heartbeats"] = heartbeat_check(res.redis, res.keys, res.config)
    checks["flush_backlog"] = backlog_check(res.redis, res.keys)
    return await run_checks(checks, res.config.api.check_timeout)
