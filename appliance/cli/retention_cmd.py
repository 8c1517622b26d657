"""`appliance retention run [--dry-run] [--only NAME]`: the retention schedules, now.

Runs every schedule registered with `retention=True` (appliance/schedules), in the registry's
order, as the scheduler runs it: a real run claims its own tick (now) in `schedule_runs`
(source `cli`), so it shows in `appliance status`, and takes the schedule's lock as the
scheduler does: a schedule whose run (the scheduler's or another operator's) is still going is
skipped (`<name>: already running (skipped)`) and the others still run. A dry run counts what
would go, records nothing and takes no lock. A disabled schedule is skipped unless named with
--only. On a terminal each schedule shows a progress bar; otherwise one plain line each. Exit 1
when a schedule failed or was already running.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import Any

import click

from appliance.cli.common import cli_config, run_async
from appliance.config import Config
from appliance.programs.scheduler import Outcome, execute
from appliance.resources import Resources, open_resources
from appliance.schedules import SCHEDULES, Entry, Run

RETENTION = [e for e in SCHEDULES if e.retention]


class Bar:
    """Run.progress for one schedule: a click progress bar on a terminal, made once the total
    is known (a phase of unknown size shows nothing); nothing elsewhere."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled
        self.bar: Any = None
        self.total: int | None = None

    def __call__(self, done: int, total: int | None) -> None:
        if not self.enabled or total is None or total == 0:
            return
        if self.bar is None or total != self.total:
            self.close()
            self.total = total
            self.bar = click.progressbar(length=total, label=self.label)
            self.bar.__enter__()
        self.bar.update(done - self.bar.pos)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


async def _now(res: Resources) -> datetime:
    # PostgreSQL's clock, as every other time in schedule_runs.
    async with res.connection() as conn:
        cur = await conn.execute("SELECT now()")
        row = await cur.fetchone()
    assert row is not None
    now: datetime = row[0]
    return now


async def _dry(res: Resources, entry: Entry, run: Run) -> Outcome:
    started = time.perf_counter()
    try:
        counts = await entry.run(res, run)
    except Exception as exc:
        # Reported like a failed run; nothing is recorded for a dry run.
        return Outcome("failed", {}, f"{type(exc).__name__}: {exc}", time.perf_counter() - started)
    return Outcome("ok", counts, None, time.perf_counter() - started)


async def _run(config: Config, entries: list[Entry], dry_run: bool, tty: bool) -> bool:
    """Run each entry, printing its result; whether all succeeded."""
    ok = True
    async with open_resources(config, "retention") as res:
        for entry in entries:
            bar = Bar(entry.name, tty)
            try:
                run = Run(dry_run=dry_run, progress=bar)
                if dry_run:
                    outcome: Outcome | None = await _dry(res, entry, run)
                else:
                    outcome = await execute(res, entry, await _now(res), run, source="cli")
            finally:
                bar.close()
            ok = _report(entry.name, outcome, dry_run) and ok
    return ok


def _report(name: str, outcome: Outcome | None, dry_run: bool) -> bool:
    if outcome is None or outcome.status == "skipped":
        # Another run of the schedule is going (or took this very tick): this one did nothing.
        click.echo(f"{name}: already running (skipped)")
        return False
    counts = " ".join(f"{k}={v}" for k, v in outcome.counts.items())
    what = "would delete" if dry_run else "deleted"
    if outcome.status == "ok":
        click.echo(f"{name}: {what} {counts} ({outcome.seconds:.1f}s)")
        return True
    click.echo(f"{name}: FAILED: {outcome.error} ({outcome.seconds:.1f}s)")
    return False


@click.group()
def retention() -> None:
    """Delete what is past retention now (the scheduler does it on its own schedule)."""


@retention.command("run")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; change nothing.")
@click.option(
    "--only",
    "only",
    multiple=True,
    type=click.Choice([e.name for e in RETENTION]),
    help="Run only this schedule (repeatable); runs it even when it is disabled.",
)
def run_retention(dry_run: bool, only: tuple[str, ...]) -> None:
    """Run every retention schedule: history, logs, partitions, expired objects."""
    config = cli_config()
    if only:
        entries = [e for e in RETENTION if e.name in only]
    else:
        entries = [e for e in RETENTION if e.settings(config).enabled]
        for e in RETENTION:
            if e not in entries:
                click.echo(f"{e.name}: skipped (disabled; name it with --only to run it)")
    if not run_async(_run(config, entries, dry_run, sys.stdout.isatty())):
        sys.exit(1)
