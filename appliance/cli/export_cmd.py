"""`appliance export CONVERSATION [--out FILE]`: export a conversation's whole history now, in
this process, and download it (zstd-compressed JSON Lines, as `POST .../exports` makes).

The export is recorded like one made through the API (requested by `cli`), so it shows in
`GET /v1/exports/{id}` and expires with the others; no worker is involved.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click
import msgspec

from appliance.cli.common import cli_config, run_async
from appliance.config import Config
from appliance.errors import ApplianceError, NotFound
from appliance.exports import jobs as export_jobs
from appliance.exports import service
from appliance.resources import open_resources

POLL = 0.5  # seconds between looks at the export's progress


async def _export(config: Config, conversation: str, out: Path) -> service.Export:
    async with open_resources(config, "cli") as res:
        async with res.connection() as conn:
            cur = await conn.execute(
                "SELECT 1 FROM conversations WHERE id = %s AND deleted_at IS NULL",
                (conversation,),
            )
            if await cur.fetchone() is None:
                raise NotFound(f"no conversation {conversation!r}", field="conversation")
            export = await service.request(conn, conversation, "cli", enqueue=False)
        job = msgspec.json.encode(service.Job(export.id))
        running = asyncio.create_task(export_jobs.run(res, job))
        # click draws the bar only on a terminal (else it prints the label once).
        with click.progressbar(length=1, label=f"export {export.id}", file=sys.stderr) as bar:
            while not running.done():
                await asyncio.wait({running}, timeout=POLL)
                async with res.connection() as conn:
                    now = await service.get(conn, export.id)
                if now is not None and now.head_seq:
                    bar.length = now.head_seq
                    bar.update(now.last_seq - bar.pos)
            await running
        async with res.connection() as conn:
            found = await service.locate(conn, export.id)
        assert found is not None
        done = found.export
        if done.state != "ready":
            raise ApplianceError(f"export {export.id} {done.state}: {done.error}")
        s3 = res.storage.s3
        await asyncio.to_thread(s3.download_file, res.storage.bucket, found.key, str(out))
        return done


@click.command()
@click.argument("conversation")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Where to write it (default: ./<conversation>.jsonl.zst).",
)
def export(conversation: str, out: Path | None) -> None:
    """Export CONVERSATION's whole history to a .jsonl.zst file (progress on a terminal)."""
    config = cli_config()
    target = out or Path(f"{conversation}.jsonl.zst")
    done = run_async(_export(config, conversation, target))
    click.echo(
        f"{target}: {done.messages} messages up to seq {done.last_seq}, {done.size} bytes"
        f" (export {done.id})"
    )
