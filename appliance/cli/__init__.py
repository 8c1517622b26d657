"""The `appliance` command line (click). Each module adds one group of commands."""

from __future__ import annotations

import click

from appliance import __version__
from appliance.cli import config_cmd, ops, run, status


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="appliance")
def main() -> None:
    """Operate the messaging appliance: config, dependencies, schema, programs."""


main.add_command(config_cmd.config)
main.add_command(ops.wait)
main.add_command(ops.migrate)
main.add_command(ops.db)
main.add_command(ops.storage)
main.add_command(run.run)
main.add_command(status.status)
main.add_command(status.doctor)
