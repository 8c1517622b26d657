"""`appliance jobs list|failed|retry|discard`: the job queue as the worker sees it, and parked jobs.

A job that used up its attempts is parked (appliance/job_attempts.py); `retry ID` (or `--all`)
enqueues its payload again as a new job with a fresh count, and prints the new job's id;
`discard ID` (or `--all`) forgets it for good.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

import click
import msgspec

from appliance import job_attempts
from appliance.cli.common import cli_config, run_async
from appliance.errors import Invalid, NotFound
from appliance.resources import Conn, direct_connection

LIMIT = 1000
T = TypeVar("T")


def _age(since: datetime, now: datetime) -> str:
    seconds = max(0.0, (now - since).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


@click.group("jobs")
def jobs_group() -> None:
    """Jobs: what is queued or running, what failed for good (parked), and re-queueing it."""


def _fetch(query: Callable[[Conn, int], Awaitable[Sequence[T]]], limit: int) -> Sequence[T]:
    """`query`'s rows, on a connection of the command's own."""
    config = cli_config()

    async def run() -> Sequence[T]:
        async with direct_connection(config, "cli")() as conn:
            return await query(conn, limit)

    return run_async(run())


@jobs_group.command("list")
@click.option("--limit", default=LIMIT, show_default=True, help="Show at most this many jobs.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array.")
def list_cmd(limit: int, as_json: bool) -> None:
    """Queued and running jobs, oldest first: entrypoint, attempts so far, age, last error."""
    found = _fetch(job_attempts.active, limit)
    if as_json:
        click.echo(msgspec.json.encode(found))
        return
    now = datetime.now(UTC)
    if not found:
        click.echo("(no queued or running jobs)")
    for job in found:
        line = (
            f"{job.id:<10} {job.entrypoint:<24} {job.status:<8} attempts {job.attempts:<3} "
            f"age {_age(job.created, now)}"
        )
        if job.status == "queued" and job.execute_after > now:
            line += f"  starts in {_age(now, job.execute_after)}"
        if job.last_error:
            line += f"  last error: {job.last_error}"
        click.echo(line)


@jobs_group.command("failed")
@click.option("--limit", default=LIMIT, show_default=True, help="Show at most this many jobs.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array.")
def failed(limit: int, as_json: bool) -> None:
    """Parked jobs (out of attempts), oldest first, with their last error."""
    found = _fetch(job_attempts.parked, limit)
    if as_json:
        click.echo(msgspec.json.encode(found))
        return
    now = datetime.now(UTC)
    if not found:
        click.echo("(no failed jobs)")
    for job in found:
        first = _age(job.first_attempt_at, now)
        click.echo(
            f"{job.id:<10} {job.entrypoint:<24} attempts {job.attempts:<3} "
            f"parked {_age(job.parked_at, now)} ago, first attempt {first} ago, "
            f"payload {job.payload_bytes} bytes\n{'':<11}{job.last_error}"
        )


@jobs_group.command("retry")
@click.argument("job_id", type=int, required=False)
@click.option("--all", "every", is_flag=True, help="Re-queue every parked job.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array.")
def retry(job_id: int | None, every: bool, as_json: bool) -> None:
    """Re-queue parked job JOB_ID (or --all) as a new job with a fresh count of attempts."""
    if (job_id is None) == (not every):
        raise click.UsageError("give a JOB_ID or --all (not both)")
    config = cli_config()

    async def run() -> list[job_attempts.Requeued]:
        async with direct_connection(config, "cli")() as conn:
            done = await job_attempts.requeue(conn, job_id)
        if job_id is not None and not done:
            raise NotFound(f"no parked job {job_id} (`appliance jobs failed` lists them)")
        if job_id is not None and done[0].new_id is None:
            raise Invalid(
                f"job {job_id}: this version has no entrypoint {done[0].entrypoint!r}; it stays"
                " parked"
            )
        return done

    done = run_async(run())
    if as_json:
        click.echo(msgspec.json.encode(done))
    else:
        for r in done:
            if r.new_id is None:
                click.echo(f"{r.id:<10} {r.entrypoint:<24} skipped: {r.skipped}")
            else:
                click.echo(f"{r.id:<10} {r.entrypoint:<24} queued again as job {r.new_id}")
        if not done:
            click.echo("(no failed jobs)")
    if any(r.new_id is None for r in done):
        sys.exit(1)


@jobs_group.command("discard")
@click.argument("job_id", type=int, required=False)
@click.option("--all", "every", is_flag=True, help="Discard every parked job.")
@click.option("--json", "as_json", is_flag=True, help="Print the ids discarded as a JSON array.")
def discard(job_id: int | None, every: bool, as_json: bool) -> None:
    """Forget parked job JOB_ID (or --all) for good: it will not run."""
    if (job_id is None) == (not every):
        raise click.UsageError("give a JOB_ID or --all (not both)")
    config = cli_config()

    async def run() -> list[int]:
        async with direct_connection(config, "cli")() as conn:
            gone = await job_attempts.discard(conn, job_id)
        if job_id is not None and not gone:
            raise NotFound(f"no parked job {job_id} (`appliance jobs failed` lists them)")
        return gone

    gone = run_async(run())
    if as_json:
        click.echo(msgspec.json.encode(gone))
    else:
        click.echo(f"discarded {len(gone)} parked job(s)" + (f": {gone}" if gone else ""))
