"""`appliance run api|worker|flusher|scheduler`: the programs supervisord starts."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import cast

import click
import structlog

from appliance import logs
from appliance.cli.common import cli_config
from appliance.config import PROGRAMS, Config, Program
from appliance.metrics import MULTIPROC_ENV, multiproc_dir


def _ensure_multiproc(config: Config, program: str) -> None:
    """Re-exec with PROMETHEUS_MULTIPROC_DIR set when it is missing.

    prometheus_client chooses multiprocess mode when it is first imported, which `appliance.metrics`
    above has already done; a fresh interpreter with the variable set is the only clean way in.
    start.sh sets it, so under supervisord this never re-execs.
    """
    if MULTIPROC_ENV in os.environ:
        os.makedirs(os.environ[MULTIPROC_ENV], exist_ok=True)
        return
    directory = str(multiproc_dir(config.appliance.run_dir))
    os.makedirs(directory, exist_ok=True)
    env = {**os.environ, MULTIPROC_ENV: directory}
    os.execve(sys.executable, [sys.executable, "-m", "appliance", "run", program], env)


@click.command()
@click.argument("name", type=click.Choice(PROGRAMS))
def run(name: str) -> None:
    """Run one program in the foreground until SIGTERM."""
    program = cast(Program, name)
    config = cli_config()
    _ensure_multiproc(config, program)
    if program == "api":
        from appliance.programs.api import exec_api

        exec_api(config)
        return
    from appliance.programs.flusher import run_flusher
    from appliance.programs.runner import supervise
    from appliance.programs.scheduler import run_scheduler
    from appliance.programs.worker import run_worker

    bodies = {"worker": run_worker, "flusher": run_flusher, "scheduler": run_scheduler}
    logs.configure(program, config.appliance.log_level, config.appliance.log_format)
    try:
        asyncio.run(supervise(program, config, bodies[program]))
    except Exception:
        # One JSON line with the traceback (not a bare one on stderr); supervisord restarts us.
        structlog.get_logger().exception("program_failed", program=program)
        sys.exit(1)
