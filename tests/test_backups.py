"""Backups for real: pg_dump of a database streamed to S3 (moto), restored with pg_restore into a
fresh database exactly as the README says, every table's rows counted on both sides; keep-N;
a failing pg_dump; the schedule, the job and the CLI.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from psycopg import sql

from appliance.auth import keys
from appliance.backups import jobs as backup_jobs
from appliance.backups import schedule
from appliance.backups.service import (
    PREFIX,
    BackupFailed,
    backup_key,
    backups,
    dump_command,
    prune,
    take,
)
from appliance.config import Config
from appliance.conversations import service as conversations
from appliance.exports import service as exports
from appliance.resources import Resources
from appliance.schedules import SCHEDULES, Run
from tests.messaging import unique
from tests.support import free_port, migrated_db, write_toml
from tests.test_cli import cli
from tests.test_history_tiers import isolate, opened
from tests.test_image import parse_dockerfile


@pytest.fixture
async def res(
    settings: dict[str, Any], fresh_database: Callable[[], str]
) -> AsyncIterator[Resources]:
    """A fresh, migrated database with rows in it, and resources on it; no backups in S3."""
    dsn = fresh_database()
    await migrated_db(dsn)
    isolate(settings, dsn)
    async with opened(settings) as res:
        await clear(res)
        async with res.connection() as conn:
            for n in range(3):
                await keys.create(conn, keys.KeyCreate(name=unique("k"), scopes=["read"]))
                spec = conversations.ConversationCreate(conversation=unique(f"c{n}"))
                await conversations.create(conn, spec, "key:test")
                await exports.request(conn, spec.conversation, "key:test")
        yield res


async def clear(res: Resources) -> None:
    await res.storage.delete_many([k for k, _ in await res.storage.list_keys(PREFIX)])


async def row_counts(dsn: str) -> dict[str, int]:
    """Rows of every table in the database (partitions counted as themselves)."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT schemaname, tablename FROM pg_tables"
            " WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"
        )
        tables = await cur.fetchall()
        counts = {}
        for schema, table in tables:
            query = sql.SQL("SELECT count(*) FROM ONLY {}").format(sql.Identifier(schema, table))
            row = await (await conn.execute(query)).fetchone()
            assert row is not None
            counts[f"{schema}.{table}"] = int(row[0])
        return counts


async def uploads(res: Resources) -> list[str]:
    answer = await asyncio.to_thread(
        res.storage.s3.list_multipart_uploads, Bucket=res.storage.bucket, Prefix=PREFIX
    )
    return [u["Key"] for u in answer.get("Uploads", [])]


async def test_a_backup_restores_into_a_fresh_database_as_the_readme_says(
    res: Resources,
    settings: dict[str, Any],
    fresh_database: Callable[[], str],
    tmp_path: Path,
) -> None:
    source = res.config.postgres.dsn.get_secret_value()
    before = await row_counts(source)
    assert before["public.conversations"] == 3 and before["public.exports"] == 3
    assert sum(before.values()) > 20

    backup = await take(res.config, res.storage, keep=3)
    assert backup.key.startswith("backups/") and backup.key.endswith(".dump")
    assert await res.storage.size(backup.key) == backup.size > 0
    assert await uploads(res) == []

    # README, "Backup and restore": download, pg_restore into a fresh database, migrate, verify.
    dump = tmp_path / "appliance.dump"
    dump.write_bytes(await res.storage.get(backup.key))
    target = fresh_database()
    restored = subprocess.run(
        ["pg_restore", "--no-owner", "--exit-on-error", f"--dbname={target}", str(dump)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert restored.returncode == 0, restored.stderr
    assert await row_counts(target) == before
    settings["postgres"]["dsn"] = target
    config = write_toml(tmp_path / "restored.toml", settings)
    migrated = cli(config, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert "applied 0 migration(s)" in migrated.stdout
    verified = cli(config, "db", "verify")
    assert verified.returncode == 0, verified.stderr


async def test_keep_n_deletes_the_oldest_and_nothing_else(res: Resources) -> None:
    other = f"{PREFIX}notes.txt"  # not a backup's name: left alone
    await res.storage.put(other, b"kept")
    start = datetime(2026, 1, 1, 3, 30, tzinfo=UTC)
    taken = []
    for n in range(4):
        backup = await take(res.config, res.storage, keep=2, at=start + timedelta(days=n))
        taken.append(backup.key)
        assert backup.deleted == ([taken[n - 2]] if n >= 2 else [])
    assert [k for k, _ in await backups(res.storage)] == taken[2:]
    assert await res.storage.get(other) == b"kept"
    assert re.fullmatch(r"backups/20260101T033000\.000Z-[0-9a-f]{4}\.dump", taken[0])
    await res.storage.delete(other)


async def test_backups_of_one_moment_get_keys_of_their_own_and_keep_n_orders_by_time(
    res: Resources,
) -> None:
    """Names to the millisecond with a random suffix: two backups of one millisecond are two
    objects; keep-N orders by the time in the name, a name from before milliseconds (no
    suffix) counting as .000 of its second."""
    at = datetime(2026, 5, 1, 3, 30, 0, 250_000, tzinfo=UTC)
    same = {backup_key(at) for _ in range(20)}
    assert len(same) == 20 and all(k.startswith("backups/20260501T033000.250Z-") for k in same)
    legacy = "backups/20260501T033000Z.dump"  # .000: older than every key of `same`
    older = backup_key(at - timedelta(milliseconds=1))  # .249
    newer = backup_key(at + timedelta(seconds=1))
    for key in [*same, legacy, older, newer]:
        await res.storage.put(key, b"dump")
    found = [k for k, _ in await backups(res.storage)]
    assert found[:2] == [legacy, older] and found[-1] == newer
    assert set(found[2:-1]) == same
    assert await prune(res.storage, 3) == found[:-3]
    assert [k for k, _ in await backups(res.storage)] == found[-3:]


async def test_a_failing_pg_dump_fails_clearly_and_leaves_no_object(
    res: Resources, settings: dict[str, Any]
) -> None:
    await take(res.config, res.storage, keep=5)
    before = await backups(res.storage)
    port = free_port()  # nothing listens there
    settings["postgres"]["dsn"] = f"postgresql://appliance:s3cret-pw@127.0.0.1:{port}/appliance"
    bad = Config.model_validate(settings)
    with pytest.raises(BackupFailed) as failed:
        await take(bad, res.storage, keep=1, at=datetime(2030, 1, 1, tzinfo=UTC))
    message = failed.value.message
    assert message.startswith("pg_dump exited with status 1: ")
    assert str(port) in message and "s3cret-pw" not in message
    assert await res.storage.list_keys(f"{PREFIX}20300101") == []
    assert await uploads(res) == []
    assert await backups(res.storage) == before  # keep=1 deleted nothing: the dump failed

    # The job fails the same way (the worker then retries it with back-off).
    res.config = bad
    with pytest.raises(BackupFailed):
        await backup_jobs.run(res, msgspec.json.encode(backup_jobs.Job(keep=1)))
    assert await backups(res.storage) == before


async def test_a_missing_pg_dump_is_a_clear_error(
    res: Resources, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(BackupFailed, match="cannot run pg_dump"):
        await take(res.config, res.storage, keep=1)
    assert await backups(res.storage) == []
    assert await uploads(res) == []


def test_the_password_goes_in_the_environment_not_argv(settings: dict[str, Any]) -> None:
    settings["postgres"]["dsn"] = "postgresql://app:pa%20ss@db.example:5433/appl?sslmode=require"
    with_password = Config.model_validate(settings)
    argv, env = dump_command(with_password)
    assert env["PGPASSWORD"] == "pa ss"
    assert not any("pa ss" in arg or "pa%20ss" in arg for arg in argv)
    assert argv[1:3] == ["--format=custom", "--no-password"]
    dbname = argv[3].removeprefix("--dbname=")
    assert psycopg.conninfo.conninfo_to_dict(dbname) == {
        "user": "app",
        "host": "db.example",
        "port": "5433",
        "dbname": "appl",
        "sslmode": "require",
        "connect_timeout": "3",
    }


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app@db.example/appl?sslpassword=k3y-pass&sslkey=/run/key.pem",
        "postgresql://app:pw@db.example/appl?sslpassword=k3y%20pass&sslmode=require",
    ],
)
async def test_a_dsn_with_sslpassword_is_refused_before_pg_dump_runs(
    res: Resources, settings: dict[str, Any], dsn: str
) -> None:
    """libpq reads the client key's passphrase from no environment variable: on pg_dump's
    command line `ps` would show it, so the backup refuses, naming the setting."""
    settings["postgres"]["dsn"] = dsn
    config = Config.model_validate(settings)
    with pytest.raises(BackupFailed) as refused:
        dump_command(config)
    assert refused.value.field == "postgres.dsn"
    assert "postgres.dsn" in refused.value.message and "sslpassword" in refused.value.message
    assert "k3y" not in refused.value.message
    with pytest.raises(BackupFailed):
        await take(config, res.storage, keep=1)
    assert await backups(res.storage) == [] and await uploads(res) == []


async def test_the_backup_schedule_and_its_dry_run(res: Resources) -> None:
    entry = next(e for e in SCHEDULES if e.name == "backup")
    assert not entry.retention and entry.settings(res.config) is res.config.schedules.backup
    keep = res.config.schedules.backup.keep
    start = datetime(2026, 2, 1, tzinfo=UTC)
    for n in range(keep):
        await take(res.config, res.storage, keep=keep, at=start + timedelta(hours=n))
    assert await schedule.run(res, Run(dry_run=True)) == {"backups": 0, "bytes": 0, "deleted": 1}
    assert len(await backups(res.storage)) == keep
    counts = await entry.run(res, Run())
    assert counts["backups"] == 1 and counts["deleted"] == 1 and counts["bytes"] > 0
    found = [k for k, _ in await backups(res.storage)]
    assert len(found) == keep and not any(k.startswith("backups/20260201T000000") for k in found)


async def test_the_backup_command(res: Resources, settings: dict[str, Any], tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", settings)
    done = await asyncio.to_thread(cli, config, "backup", "--keep", "1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"s3://{settings['s3']['bucket']}/backups/")
    listed = await backups(res.storage)
    assert len(listed) == 1 and listed[0][0] in done.stdout
    refused = await asyncio.to_thread(cli, config, "backup", "--keep", "0")
    assert refused.returncode == 2

    port = free_port()
    settings["postgres"]["dsn"] = f"postgresql://appliance:s3cret-pw@127.0.0.1:{port}/appliance"
    broken = write_toml(tmp_path / "broken.toml", settings)
    failed = await asyncio.to_thread(cli, broken, "backup")
    assert failed.returncode == 1
    assert "pg_dump exited with status 1" in failed.stderr and str(port) in failed.stderr
    assert "s3cret-pw" not in failed.stderr + failed.stdout
    assert await backups(res.storage) == listed


async def test_the_job_takes_a_backup_with_the_keep_it_is_given(res: Resources) -> None:
    start = datetime(2026, 3, 1, tzinfo=UTC)
    for n in range(3):
        await take(res.config, res.storage, keep=5, at=start + timedelta(hours=n))
    await backup_jobs.run(res, msgspec.json.encode(backup_jobs.Job(keep=2)))
    found = [k for k, _ in await backups(res.storage)]
    assert len(found) == 2 and found[0].startswith("backups/20260301T020000.000Z-")
    await backup_jobs.run(res, b"")  # no payload: the schedule's keep (7) deletes none
    assert set(found) <= {k for k, _ in await backups(res.storage)}


def test_the_image_installs_the_pg_dump_the_docs_name() -> None:
    """pg_dump refuses a newer server: the image's client version is the one the docs state."""
    root = Path(__file__).resolve().parent.parent
    final = parse_dockerfile((root / "image" / "Dockerfile").read_text())[-1]
    args = [i.args for i in final if i.keyword == "ARG" and i.args.startswith("POSTGRES_CLIENT=")]
    assert len(args) == 1
    version = args[0].split("=", 1)[1]
    runs = " ".join(i.args for i in final if i.keyword == "RUN")
    assert "apt.postgresql.org.sh -y" in runs
    assert '"postgresql-client-${POSTGRES_CLIENT}"' in runs
    readme = (root / "README.md").read_text()
    assert f"PostgreSQL {version}'s" in readme and f"servers 9.2 to {version}" in readme
    operations = (root / "docs" / "operations.md").read_text()
    assert f"PostgreSQL {version}'s" in operations
