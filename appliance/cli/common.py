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


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; a dependency failure exits 1 with one clear line, no traceback."""
    from psycopg import Error as PgError
    from redis.exceptions import RedisError

    try:
        return asyncio.run(coro)
    except (PgError, RedisError, ApplianceError, OSError) as exc:
        error = str(exc) or type(exc).__name__
        if isinstance(exc, ApplianceError) and exc.field:
            error = f"{exc.field}: {exc.message}"
        structlog.get_logger().error("command_failed", error=error)
        sys.exit(1)


def mark(ok: bool) -> str:
    if sys.stdout.isatty():
        return click.style("ok", fg="green") if ok else click.style("FAIL", fg="red", bold=True)
    return "ok" if ok else "FAIL"
