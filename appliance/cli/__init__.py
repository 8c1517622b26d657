"""The `appliance` command line (click). Each module adds one group of commands.

Commands are imported when invoked, not at start: `appliance config check` then loads only the
config code, which keeps start.sh's five CLI steps and the image HEALTHCHECK quick.
"""

from __future__ import annotations

import importlib

import click

from appliance import __version__

# command name → "module:attribute" under appliance.cli
COMMANDS = {
    "config": "config_cmd:config",
    "wait": "ops:wait",
    "migrate": "ops:migrate",
    "db": "ops:db",
    "storage": "ops:storage",
    "run": "run:run",
    "status": "status:status",
    "doctor": "status:doctor",
    "keys": "keys_cmd:keys_group",
    "retention": "retention_cmd:retention",
    "export": "export_cmd:export",
    "backup": "backup_cmd:backup",
    "jobs": "jobs_cmd:jobs_group",
    "webhooks": "webhooks_cmd:webhooks_group",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attribute = target.partition(":")
        command = getattr(importlib.import_module(f"appliance.cli.{module}"), attribute)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="appliance")
def main() -> None:
    """Operate the messaging appliance: config, dependencies, schema, programs."""
