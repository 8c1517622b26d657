"""`appliance retention run` over real services: a dry run reports and records nothing, a real
run (as a subprocess) deletes and is recorded (source `cli`), a disabled schedule is skipped, a
schedule whose run is still going is skipped and fails the command, an unknown name is refused,
and a terminal gets a progress bar (a subprocess under `script`). The rest runs in-process."""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog
from click.testing import CliRunner, Result

from appliance.cli import main, retention_cmd
from appliance.cli.status import _schedule_line, _status
from appliance.config import Config
from appliance.programs.scheduler import SCHEDULE_LOCK_NAMESPACE
from appliance.resources import Resources, open_resources
from appliance.schedules import SCHEDULES, Entry, Run
from tests.support import migrated_db, write_toml
from tests.test_cli import cli


async def invoke(config: Path, *args: str) -> Result:
    """`appliance ARGS` in this process, in a thread (the CLI runs its own event loop); the
    logging the command sets up (to its captured stderr) is undone after it."""
    saved = structlog.get_config()
    try:
        return await asyncio.to_thread(
            CliRunner().invoke, main, list(args), env={"APPLIANCE_CONFIG": str(config)}
        )
    finally:
        structlog.configure(**saved)


async def prepared(settings: dict[str, Any], fresh_database: Callable[[], str]) -> str:
    """A database of its own holding one conversation deleted 10 days ago; its DSN."""
    dsn = fresh_database()
    await migrated_db(dsn)
    settings["postgres"]["dsn"] = dsn
    settings["redis"]["key_prefix"] += f"-k{uuid.uuid4().hex[:8]}"
    async with open_resources(Config.model_validate(settings), "test") as res:
        await res.storage.init()
        async with res.connection() as conn:
            await conn.execute(
                "INSERT INTO conversations (id, created_by, deleted_at)"
                " VALUES ('old-gone', 'key:admin', now() - interval '10 days')"
            )
    return dsn


def runs(dsn: str) -> list[tuple[str, str, str]]:
    with psycopg.connect(dsn) as conn:
        return [
            (str(n), str(s), str(src))
            for n, s, src in conn.execute(
                "SELECT name, status, source FROM schedule_runs ORDER BY name"
            ).fetchall()
        ]


def conversations(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM conversations").fetchone()
    return int(row[0]) if row else -1


async def test_retention_run_dry_then_real(
    settings: dict[str, Any], fresh_database: Callable[[], str], tmp_path: Path
) -> None:
    dsn = await prepared(settings, fresh_database)
    settings["schedules"] = {"prune_job_log": {"enabled": False}}
    config = write_toml(tmp_path / "c.toml", settings)

    dry = await invoke(config, "retention", "run", "--dry-run")
    assert dry.exit_code == 0, dry.output
    lines = dry.stdout.splitlines()
    assert "prune_job_log: skipped (disabled; name it with --only to run it)" in lines
    for entry in SCHEDULES:
        if entry.retention and entry.name != "prune_job_log":
            assert any(line.startswith(f"{entry.name}: would delete ") for line in lines), lines
    assert any("conversations=1" in line for line in lines if line.startswith("expire_segments"))
    assert runs(dsn) == [] and conversations(dsn) == 1, "a dry run records and deletes nothing"

    # Named, a disabled schedule runs too. The one real process of this file: the command as
    # an operator runs it.
    only = ("--only", "expire_segments", "--only", "prune_job_log")
    done = cli(config, "retention", "run", *only)
    assert done.returncode == 0, done.stdout + done.stderr
    (expired,) = [line for line in done.stdout.splitlines() if line.startswith("expire_segments")]
    assert expired.startswith("expire_segments: deleted ") and "conversations=1" in expired
    assert any(line.startswith("prune_job_log: deleted ") for line in done.stdout.splitlines())
    assert runs(dsn) == [("expire_segments", "ok", "cli"), ("prune_job_log", "ok", "cli")]
    assert conversations(dsn) == 0
    # `appliance status` shows the run: status, age, who ran it, counts, last success.
    data = await _status(Config.model_validate(settings))
    (shown,) = [s for s in data["schedules"] if s["schedule"] == "expire_segments"]
    assert (shown["status"], shown["source"], shown["counts"]["conversations"]) == ("ok", "cli", 1)
    assert shown["age_s"] >= 0 and shown["last_ok_age_s"] is not None
    line = _schedule_line(shown)
    assert line.startswith("expire_segments") and " ok " in line and "(cli)" in line


def test_retention_run_refuses_a_schedule_that_is_not_retention() -> None:
    refused = CliRunner().invoke(main, ["retention", "run", "--only", "compact_segments"])
    assert refused.exit_code == 2
    assert "compact_segments" in refused.output and "expire_segments" in refused.output


async def test_retention_run_shows_a_progress_bar_on_a_terminal(
    settings: dict[str, Any], fresh_database: Callable[[], str], tmp_path: Path
) -> None:
    dsn = await prepared(settings, fresh_database)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Two days of history index past retention (rows whose objects are long gone).
        conn.execute(
            "INSERT INTO segment_blocks (tier, period, conversation, first_seq, last_seq,"
            " object_key, byte_offset, byte_length, records, min_ts, max_ts)"
            " SELECT 'history', current_date - d, 'c', d, d, 'segments/history/x' || d, 0, 1, 1,"
            " now(), now() FROM unnest(ARRAY[40, 41]) d"
        )
    config = write_toml(tmp_path / "c.toml", settings)
    command = [sys.executable, "-m", "appliance", "retention", "run", "--dry-run"]
    command += ["--only", "expire_segments"]
    # `script` gives the command a terminal of its own.
    done = subprocess.run(
        ["script", "-qec", shlex.join(command), "/dev/null"],
        env={"APPLIANCE_CONFIG": str(config), "PATH": os.environ["PATH"], "TERM": "xterm"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout
    assert "expire_segments  [" in done.stdout and "100%" in done.stdout
    assert "expire_segments: would delete days=2 index_rows=2" in done.stdout


async def test_a_failing_schedule_is_reported_and_fails_the_command(
    config: Config, migrated: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def broken(res: Resources, run: Run) -> dict[str, int]:
        raise RuntimeError("S3 said no")

    entry = Entry(
        f"test_broken_{uuid.uuid4().hex[:6]}", lambda c: c.schedules.prune_job_log, broken
    )
    for dry_run in (True, False):
        assert await retention_cmd._run(config, [entry], dry_run, tty=False) is False
        assert f"{entry.name}: FAILED: RuntimeError: S3 said no" in capsys.readouterr().out
    with psycopg.connect(migrated) as conn:
        recorded = conn.execute(
            "SELECT status, source FROM schedule_runs WHERE name = %s", (entry.name,)
        ).fetchall()
    assert recorded == [("failed", "cli")]  # the real run only


async def test_a_schedule_already_running_is_skipped_and_fails_the_command(
    settings: dict[str, Any], fresh_database: Callable[[], str], tmp_path: Path
) -> None:
    """The scheduler is running prune_job_log (it holds the schedule's lock): the command skips
    it, says so, runs the others, and exits 1."""
    dsn = await prepared(settings, fresh_database)
    config = write_toml(tmp_path / "c.toml", settings)
    with psycopg.connect(dsn, autocommit=True) as scheduler:
        scheduler.execute(
            "SELECT pg_advisory_lock(%s, hashtext('prune_job_log'))", (SCHEDULE_LOCK_NAMESPACE,)
        )
        done = await invoke(
            config, "retention", "run", "--only", "prune_job_log", "--only", "expire_segments"
        )
    assert done.exit_code == 1, done.output
    lines = done.stdout.splitlines()
    assert "prune_job_log: already running (skipped)" in lines
    assert any(line.startswith("expire_segments: deleted ") for line in lines), lines
    # Only the run that happened is recorded; the conversation went.
    assert runs(dsn) == [("expire_segments", "ok", "cli")] and conversations(dsn) == 0
