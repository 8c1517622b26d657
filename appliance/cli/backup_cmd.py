"""`appliance backup [--keep N]`: a backup of the database to S3 now (what the nightly
`backup` schedule does), then all but the newest N backups deleted."""

from __future__ import annotations

import click

from appliance.backups.service import Backup, take
from appliance.cli.common import cli_config, run_async
from appliance.config import Config
from appliance.storage import Storage


async def _backup(config: Config, keep: int) -> Backup:
    return await take(config, Storage.create(config.s3), keep)


@click.command()
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    default=None,
    help="Backups to keep, this one included (default: [schedules.backup] keep).",
)
def backup(keep: int | None) -> None:
    """pg_dump the database to S3 under backups/<UTC time>.dump; delete the oldest past --keep."""
    config = cli_config()
    done = run_async(_backup(config, keep or config.schedules.backup.keep))
    click.echo(f"s3://{config.s3.bucket}/{done.key}: {done.size} bytes")
    for key in done.deleted:
        click.echo(f"deleted s3://{config.s3.bucket}/{key}")
