"""`appliance config check|show|startenv`."""

from __future__ import annotations

import json
import os
import shlex

import click

from appliance.cli.common import fail_config
from appliance.config import PROGRAMS, config_path, load_config, redacted
from appliance.errors import ConfigError


@click.group()
def config() -> None:
    """Check or show the configuration (APPLIANCE_CONFIG plus APPLIANCE_* overrides)."""


@config.command()
def check() -> None:
    """Validate; exit 0, or 2 listing every problem by dotted key path."""
    try:
        load_config()
    except ConfigError as exc:
        fail_config(exc)
    click.echo(f"config ok: {config_path(os.environ)}")


@config.command()
def show() -> None:
    """Print the effective configuration as JSON, secrets redacted."""
    try:
        cfg = load_config()
    except ConfigError as exc:
        fail_config(exc)
    click.echo(json.dumps(redacted(cfg), indent=2))


@config.command(hidden=True)
def startenv() -> None:
    """Shell `export` lines start.sh evaluates before it runs supervisord."""
    try:
        cfg = load_config()
    except ConfigError as exc:
        fail_config(exc)
    from appliance.metrics import MULTIPROC_ENV, multiproc_dir

    run_dir = cfg.appliance.run_dir
    values = {
        "SUPERVISOR_RUN_DIR": run_dir,
        MULTIPROC_ENV: str(multiproc_dir(run_dir)),
        # supervisord must outwait each program's own drain deadline.
        "SUPERVISOR_STOPWAITSECS": str(int(cfg.appliance.stop_timeout) + 10),
    }
    for program in PROGRAMS:
        values[f"SUPERVISOR_AUTOSTART_{program.upper()}"] = (
            "true" if program in cfg.appliance.roles else "false"
        )
    for name, value in values.items():
        click.echo(f"export {name}={shlex.quote(value)}")
