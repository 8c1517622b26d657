"""Migrations: apply, record, concurrent migrate, drift detection, pgqueuer schema, CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from appliance.db.migrate import available, drift, expected_version, migrate, schema_version
from tests.support import write_toml


async def _connect(dsn: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True)


async def test_migrate_applies_records_and_installs_pgqueuer(
    fresh_database: Callable[[], str],
) -> None:
    dsn = fresh_database()
    conn = await _connect(dsn)
    try:
        assert await schema_version(conn) == 0
        assert "migration 0001_foundation is not applied" in await drift(conn)
        ran = await migrate(conn)
        assert [m.version for m in ran] == [m.version for m in available()]
        assert await schema_version(conn) == expected_version()
        assert await drift(conn) == []
        cur = await conn.execute("SELECT to_regclass('pgqueuer'), to_regclass('pgqueuer_log')")
        assert await cur.fetchone() == ("pgqueuer", "pgqueuer_log")
        # A second run finds nothing to do.
        assert await migrate(conn) == []
    finally:
        await conn.close()


async def test_concurrent_migrates_apply_each_migration_once(
    fresh_database: Callable[[], str],
) -> None:
    dsn = fresh_database()
    conns = [await _connect(dsn) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        applied = sorted(m.version for ran in results for m in ran)
        assert applied == [m.version for m in available()]
        cur = await conns[0].execute("SELECT count(*) FROM appliance_migrations")
        assert await cur.fetchone() == (expected_version(),)
        assert await drift(conns[0]) == []
    finally:
        for c in conns:
            await c.close()


def test_concurrent_migrate_processes(fresh_database: Callable[[], str], tmp_path: Path) -> None:
    """Two `appliance migrate` processes at once (as two containers starting) both succeed."""
    dsn = fresh_database()
    config = write_toml(tmp_path / "c.toml", {"postgres": {"dsn": dsn}})
    env = {"APPLIANCE_CONFIG": str(config), "PATH": "/usr/bin:/bin"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "appliance", "migrate"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    applied = sorted(out for out, _ in outs)
    assert applied[0].startswith("applied 0 migration(s)")
    assert applied[1].startswith(f"applied {expected_version()} migration(s)")


async def test_drift_detects_changed_and_unknown_migrations(
    fresh_database: Callable[[], str],
) -> None:
    dsn = fresh_database()
    conn = await _connect(dsn)
    try:
        await migrate(conn)
        await conn.execute("UPDATE appliance_migrations SET checksum = 'x' WHERE version = 1")
        await conn.execute(
            "INSERT INTO appliance_migrations (version, name, checksum) VALUES (999, 'future', 'y')"
        )
        found = await drift(conn)
        assert "migration 0001_foundation was changed after it was applied" in found
        assert "migration 0999_future is applied but not shipped (newer code?)" in found
    finally:
        await conn.close()


def test_db_verify_cli_exit_codes(fresh_database: Callable[[], str], tmp_path: Path) -> None:
    dsn = fresh_database()
    config = write_toml(tmp_path / "c.toml", {"postgres": {"dsn": dsn}})
    env = {"APPLIANCE_CONFIG": str(config), "PATH": "/usr/bin:/bin"}

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "appliance", "db", "verify"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    before = verify()
    assert before.returncode == 1
    assert "not applied" in before.stderr
    assert "pgqueuer schema is not installed" in before.stderr
    subprocess.run([sys.executable, "-m", "appliance", "migrate"], env=env, check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    after = verify()
    assert after.returncode == 0, after.stderr


def test_migrate_cli_reports_unreachable_database(tmp_path: Path) -> None:
    from tests.support import free_port

    config = write_toml(
        tmp_path / "c.toml",
        {"postgres": {"dsn": f"postgresql://u:pw-secret@127.0.0.1:{free_port()}/x",
                      "connect_timeout": 1.0}},
    )  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "migrate"],
        env={"APPLIANCE_CONFIG": str(config), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [line["event"] for line in lines] == ["command_failed"]
    assert "Connection refused" in lines[0]["error"]
    assert "Traceback" not in done.stderr
    assert "pw-secret" not in done.stderr + done.stdout
