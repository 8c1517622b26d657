"""Helpers every command uses: load the config or exit 2, configure logging, run a coroutine."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar

import click
import structlog

from appliance import logs
from appliance.config import Config, load_config
from appliance.errors import ApplianceError, ConfigError

T = TypeVar("T")

EXIT_CONFIG = 2


def fail_config(error: ConfigError) -> NoReturn:
    click.echo(f"config: {len(error.problems)} problem(s):", err=True)
    for problem in error.problems:
        click.echo(f"  {problem}", err=True)
    sys.exit(EXIT_CONFIG)


def cli_config() -> Config:
    """The validated config with CLI logging (stderr) set up, or exit 2 listing every problem."""
    try:
        config = load_config()
    except ConfigError as exc:
        fail_config(exc)
    logs.configure("cli", config.appliance.log_level, config.appliance.log_format, to_stderr=True)
    return config


def failure(exc: BaseException) -> dict[str, str]:
    """What a failed command logs: the cause and message on one line, and the config key to fix
    (or the step to run) when the failure points at one. Never a password: libpq, redis-py and
    botocore name hosts and ports only."""
    from psycopg import Error as PgError
    from psycopg.errors import UndefinedTable
    from redis.exceptions import RedisError

    from appliance.checks import cause_of, describe
    from appliance.storage import StorageError

    if isinstance(exc, ApplianceError) and exc.field:
        return {"error": f"{exc.field}: {exc.message}"}
    out = {"error": describe(exc)}
    if isinstance(exc, UndefinedTable):
        out["fix"] = "the schema is missing: run `appliance migrate`"
    elif cause_of(exc) is not None:
        key = (
            "postgres.dsn" if isinstance(exc, PgError)
            else "redis.url" if isinstance(exc, RedisError)
            else "the [s3] section" if isinstance(exc, StorageError)
            else None
        )  # fmt: skip
        if key is not None:
            out["fix"] = f"check {key} and that the service answers there"
    return out


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; a known failure exits 1 with one clear line, no traceback.

    Ctrl-C exits 130 quietly, as a shell expects.
    """
    from psycopg import Error as PgError
    from redis.exceptions import RedisError

    try:
        return asyncio.run(coro)
    except (PgError, RedisError, ApplianceError, OSError) as exc:
        structlog.get_logger().error("command_failed", **failure(exc))
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def mark(ok: bool) -> str:
    if sys.stdout.isatty():
        return click.style("ok", fg="green") if ok else click.style("FAIL", fg="red", bold=True)
    return "ok" if ok else "FAIL"
