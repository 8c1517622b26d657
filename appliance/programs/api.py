"""The api program: granian serving `create_app`, its flags built from the TOML alone."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import structlog

from appliance import logs
from appliance.config import Config

log = structlog.get_logger()

# File descriptors a worker needs beside its HTTP connections: WebSockets (not counted by
# granian's backpressure), pools, Redis, log and metrics files.
FD_HEADROOM = 4096
# The listen backlog: connections the kernel completes while every permit is taken, or in a burst
# before the worker accepts them (the kernel caps it at net.core.somaxconn, 4096 on Linux >= 5.4).
BACKLOG = 2048


def granian_argv(config: Config, log_config: Path) -> list[str]:
    api = config.api
    return [
        sys.executable, "-m", "granian",
        "--interface", "asgi",
        "--factory", "appliance.api.app:create_app",
        "--host", api.bind,
        "--port", str(api.port),
        "--workers", str(api.workers),
        # Open connections per worker (granian holds a permit per connection, idle keep-alive
        # included, until it closes); with the default (backlog / workers, 1,024) about a thousand
        # slow clients took the api offline.
        "--backpressure", str(api.max_connections),
        "--backlog", str(BACKLOG),
        "--http1-header-read-timeout", str(round(api.header_timeout * 1000)),
        "--workers-kill-timeout", str(int(config.appliance.stop_timeout)),
        "--respawn-failed-workers",
        "--no-access-log",  # the app logs each request itself, with route and request id
        "--log-level", config.appliance.log_level,
        "--log-config", str(log_config),
    ]  # fmt: skip


def granian_env(environ: dict[str, str]) -> dict[str, str]:
    """granian also reads GRANIAN_* variables; drop them so the TOML stays the one source."""
    return {k: v for k, v in environ.items() if not k.startswith("GRANIAN_")}


def raise_fd_limit(needed: int) -> tuple[int, int]:
    """Lift the soft RLIMIT_NOFILE to the hard one (at most 1,048,576); the (soft, hard) after.

    Containers often start with a soft limit of 1,024, which `max_connections` alone exceeds.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = 1_048_576 if hard == resource.RLIM_INFINITY else min(hard, 1_048_576)
    if soft == resource.RLIM_INFINITY or soft >= max(needed, ceiling):
        return soft, hard
    target = max(soft, ceiling)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, hard
    return target, hard


def exec_api(config: Config) -> None:
    """Replace this process with granian (so supervisord signals granian directly)."""
    logs.configure("api", config.appliance.log_level, config.appliance.log_format)
    api = config.api
    needed = api.max_connections + FD_HEADROOM
    soft, hard = raise_fd_limit(needed)
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "api_fd_limit_low",
            nofile=soft,
            hard_limit=hard,
            needed=needed,
            hint="raise the container's nofile limit (docker run --ulimit nofile=65536)",
        )
    slowest = max(api.header_timeout, api.body_timeout)
    if slowest >= config.appliance.stop_timeout:
        log.warning(
            "api_drain_exceeds_stop_timeout",
            header_timeout=api.header_timeout,
            body_timeout=api.body_timeout,
            stop_timeout=config.appliance.stop_timeout,
            hint="a stop waits for slow clients up to these timeouts; keep them below it",
        )
    run_dir = Path(config.appliance.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_config = run_dir / "granian-logging.json"
    log_config.write_text(
        json.dumps(
            logs.stdlib_config("api", config.appliance.log_level, config.appliance.log_format)
        )
    )
    argv = granian_argv(config, log_config)
    os.execve(sys.executable, argv, granian_env(dict(os.environ)))
