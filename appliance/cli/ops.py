"""`appliance wait`, `migrate`, `db verify`, `storage init`: the steps start.sh runs in order."""

from __future__ import annotations

import asyncio
import sys
import time

import click
import structlog

from appliance.checks import CheckResult, dependency_checks, run_check
from appliance.cli.common import cli_config, run_async
from appliance.config import Config
from appliance.db.migrate import drift
from appliance.db.migrate import migrate as apply_migrations
from appliance.redis_keys import client
from appliance.resources import direct_connection
from appliance.storage import Storage

log = structlog.get_logger()

# The config keys that say where each dependency is, named when it does not answer.
WHERE = {"postgres": "postgres.dsn", "redis": "redis.url", "s3": "s3.endpoint_url"}


async def _wait(config: Config, deadline: float) -> list[CheckResult]:
    """Retry each dependency until it answers or the deadline passes; return the last results."""
    redis = client(config.redis, "wait")
    storage = Storage.create(config.s3)
    checks = dependency_checks(
        config, direct_connection(config, "wait"), redis, storage, config.s3.create_bucket
    )
    # Each attempt is bounded by the dependency's own timeout and by what is left of the deadline.
    timeouts = {
        "postgres": config.postgres.connect_timeout,
        "redis": config.redis.connect_timeout,
        "s3": config.s3.timeout,
    }
    pending = dict(checks)
    results: dict[str, CheckResult] = {}
    attempt = 0
    try:
        while pending:
            attempt += 1
            left = max(0.5, deadline - time.monotonic())
            round_results = await asyncio.gather(
                *(run_check(n, c, min(timeouts[n], left)) for n, c in pending.items())
            )
            for result in round_results:
                name = result.name
                results[name] = result
                if result.ok:
                    log.info(
                        "dependency_ready",
                        dependency=name,
                        attempt=attempt,
                        latency_ms=result.latency_ms,
                    )
                    del pending[name]
                else:
                    log.warning(
                        "dependency_waiting", dependency=name, attempt=attempt, error=result.detail
                    )
            remaining = deadline - time.monotonic()
            if not pending or remaining <= 0:
                break
            await asyncio.sleep(min(2.0, 0.25 * 2**attempt, remaining))
    finally:
        await redis.aclose()
    return list(results.values())


@click.command()
@click.option(
    "--timeout",
    type=float,
    default=None,
    help="Seconds to keep trying (default: [appliance] wait_timeout).",
)
def wait(timeout: float | None) -> None:
    """Wait for PostgreSQL, Redis and S3; exit 1 naming any that did not answer."""
    config = cli_config()
    deadline = time.monotonic() + (
        timeout if timeout is not None else config.appliance.wait_timeout
    )
    results = run_async(_wait(config, deadline))
    failed = [r for r in results if not r.ok]
    for r in failed:
        log.error("dependency_not_ready", dependency=r.name, error=r.detail, check=WHERE[r.name])
    if failed:
        sys.exit(1)
    click.echo("dependencies ready: " + ", ".join(r.name for r in results))


async def _migrate(config: Config) -> list[str]:
    async with direct_connection(config, "migrate")() as conn:
        return [f"{m.version:04d}_{m.name}" for m in await apply_migrations(conn)]


@click.command()
def migrate() -> None:
    """Apply pending migrations and install/upgrade pgqueuer's schema (safe to run concurrently)."""
    config = cli_config()
    ran = run_async(_migrate(config))
    log.info("migrated", applied=ran)
    click.echo(f"applied {len(ran)} migration(s)" + (": " + ", ".join(ran) if ran else ""))


@click.group()
def db() -> None:
    """Database schema checks."""


async def _drift(config: Config) -> list[str]:
    async with direct_connection(config, "verify")() as conn:
        return await drift(conn)


@db.command()
def verify() -> None:
    """Exit 1 when the database differs from the shipped migrations (drift)."""
    config = cli_config()
    problems = run_async(_drift(config))
    for problem in problems:
        click.echo(f"drift: {problem}", err=True)
    if problems:
        sys.exit(1)
    click.echo("schema in step with the shipped migrations")


@click.group()
def storage() -> None:
    """S3 bucket set-up."""


@storage.command()
def init() -> None:
    """Create the bucket if allowed and missing, then prove write access."""
    config = cli_config()
    created = run_async(Storage.create(config.s3).init())
    log.info("storage_ready", bucket=config.s3.bucket, created=created)
    click.echo(f"bucket {config.s3.bucket} {'created' if created else 'exists'}; write access ok")
