"""The api program: granian serving `create_app`, its flags built from the TOML alone.

`appliance run api` execs `python -m appliance.programs.api <granian flags>`: granian's own command
line, started through `main()` below, which first mends one race in granian's worker bookkeeping
(see `_reap_once`). Each worker binds itself to granian's main process (`die_with_parent`), so no
worker ever outlives it, serving outside supervision.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import resource
import signal
import sys
import threading
import time
from multiprocessing.connection import wait
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
PR_SET_PDEATHSIG = 1
PARENT_CHECK_INTERVAL = 1.0


def granian_argv(config: Config, log_config: Path) -> list[str]:
    api = config.api
    return [
        sys.executable, "-m", "appliance.programs.api",
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


# -- in the worker processes ------------------------------------------------------------------


def die_with_parent(stop_timeout: float) -> None:
    """Make this granian worker end when granian's main process does (even by kill -9).

    The kernel sends SIGTERM when the parent dies (PR_SET_PDEATHSIG), which granian's worker
    takes as a graceful stop; a thread also checks the parent every second (in case the signal
    was missed or is unsupported), sends the same SIGTERM, and ends the process outright if it
    is still there `stop_timeout` later. A no-op outside a granian worker (tests, the CLI).
    """
    parent = multiprocessing.parent_process()
    if parent is None or multiprocessing.current_process().name != "granian-worker":
        return
    expected = parent.pid
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("api_pdeathsig_failed", errno=ctypes.get_errno())
    if os.getppid() != expected:  # the parent died before the signal was armed
        log.warning("api_parent_gone", parent=expected)
        os._exit(1)
    threading.Thread(
        target=_watch_parent, args=(expected, stop_timeout), name="parent-watch", daemon=True
    ).start()


def _watch_parent(expected: int | None, stop_timeout: float) -> None:
    while os.getppid() == expected:
        time.sleep(PARENT_CHECK_INTERVAL)
    log.warning("api_parent_gone", parent=expected, stop_timeout=stop_timeout)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(stop_timeout)
    log.error("api_worker_drain_timeout", stop_timeout=stop_timeout)
    os._exit(1)


# -- in granian's main process ----------------------------------------------------------------


def _reap_once() -> None:
    """Stop granian from killing workers that already stopped gracefully.

    granian (2.8) watches each worker with a thread blocked in `Process.join()`, while a stop
    calls `join(timeout)` and then `is_alive()` from the main thread. Both end in `waitpid()`: when
    the watcher reaps the worker first, the main thread's `waitpid()` fails with ECHILD, which
    multiprocessing reports as "still running" until the watcher thread has stored the exit code.
    On a busy machine that takes longer than the 1 ms granian allows, and it logs "Killing
    worker-1 after it refused to gracefully stop" (and SIGKILLs a pid already reaped) about 0.1 s
    into a stop that went well. Here a worker is alive while its sentinel pipe is open: the
    kernel closes it when the process exits, whoever reaps it.
    """
    from granian.server.mp import WorkerProcess

    def is_alive(self: WorkerProcess) -> bool:
        return not wait([self.inner.sentinel], 0)

    WorkerProcess.is_alive = is_alive  # type: ignore[method-assign,assignment]


def main() -> None:
    """granian's command line, with `_reap_once` applied first."""
    _reap_once()
    from granian.cli import entrypoint

    sys.argv[0] = "granian"
    entrypoint()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
