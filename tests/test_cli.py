"""CLI commands as subprocesses: wait, storage init, status, doctor; log lines and redaction."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import redis as sync_redis

from appliance.db.migrate import migrate
from appliance.redis_keys import Keys
from appliance.segments import index
from tests.support import free_port, write_toml


def cli(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        env={"APPLIANCE_CONFIG": str(config), "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def log_lines(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_wait_succeeds_when_everything_answers(settings: dict[str, Any], tmp_path: Path) -> None:
    done = cli(write_toml(tmp_path / "c.toml", settings), "wait")
    assert done.returncode == 0, done.stderr
    assert "dependencies ready: postgres, redis, s3" in done.stdout
    ready = [line["dependency"] for line in log_lines(done.stderr)
             if line["event"] == "dependency_ready"]  # fmt: skip
    assert sorted(ready) == ["postgres", "redis", "s3"]


def test_wait_names_the_failing_dependency_after_retries(
    settings: dict[str, Any], tmp_path: Path
) -> None:
    settings["redis"]["url"] = f"redis://:r-secret@127.0.0.1:{free_port()}/0"
    settings["redis"]["connect_timeout"] = 0.5
    config = write_toml(tmp_path / "c.toml", settings)
    started = time.monotonic()
    done = cli(config, "wait", "--timeout", "3")
    elapsed = time.monotonic() - started
    assert done.returncode == 1
    not_ready = [
        line["dependency"]
        for line in log_lines(done.stderr)
        if line["event"] == "dependency_not_ready"
    ]
    assert not_ready == ["redis"]
    (failed,) = [line for line in log_lines(done.stderr) if line["event"] == "dependency_not_ready"]
    assert failed["error"].startswith("connection refused: ")
    assert failed["check"] == "redis.url"
    attempts = [
        line["attempt"]
        for line in log_lines(done.stderr)
        if line["event"] == "dependency_waiting" and line["dependency"] == "redis"
    ]
    assert len(attempts) >= 2, "wait should log each retry"
    assert elapsed < 30
    assert "r-secret" not in done.stderr + done.stdout


def test_storage_init_creates_bucket_and_refuses_when_not_allowed(
    settings: dict[str, Any], tmp_path: Path
) -> None:
    settings["s3"]["bucket"] = f"cli-{uuid.uuid4().hex[:12]}"
    created = cli(write_toml(tmp_path / "a.toml", settings), "storage", "init")
    assert created.returncode == 0, created.stderr
    assert "created; write access ok" in created.stdout
    again = cli(write_toml(tmp_path / "a.toml", settings), "storage", "init")
    assert "exists; write access ok" in again.stdout
    settings["s3"]["bucket"] = f"cli-{uuid.uuid4().hex[:12]}"
    settings["s3"]["create_bucket"] = False
    refused = cli(write_toml(tmp_path / "b.toml", settings), "storage", "init")
    assert refused.returncode == 1
    failed = [line for line in log_lines(refused.stderr) if line["event"] == "command_failed"]
    assert "create_bucket is false" in failed[0]["error"]


def test_status_json_reports_dependencies_schema_and_queue(
    settings: dict[str, Any], migrated: str, tmp_path: Path
) -> None:
    config = write_toml(tmp_path / "c.toml", settings)
    assert cli(config, "storage", "init").returncode == 0
    done = cli(config, "status", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert {d["name"] for d in data["dependencies"]} == {"postgres", "redis", "s3"}
    assert all(d["ok"] and d["latency_ms"] >= 0 for d in data["dependencies"])
    assert data["schema"] == data["expected_schema"]
    assert isinstance(data["programs"], list)
    assert isinstance(data["queue"], list)
    assert isinstance(data["schedules"], list)


def test_status_shows_each_shard_with_owner_backlog_and_lag(
    settings: dict[str, Any], fresh_database: Any, tmp_path: Path
) -> None:
    """A database and key prefix of its own: shard rows and ingest streams are global to them."""
    dsn = fresh_database()
    prefix = f"st{uuid.uuid4().hex[:8]}"
    settings["postgres"]["dsn"] = dsn
    settings["redis"]["key_prefix"] = prefix
    settings["segments"] = {"shards": 2}

    async def prepare() -> None:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        try:
            await migrate(conn)
            await index.ensure_shards(conn, 2)
            assert await index.claim_shards(conn, "flusher-a", 60, 2) == [0, 1]
        finally:
            await conn.close()

    asyncio.run(prepare())
    client = sync_redis.Redis.from_url(settings["redis"]["url"])
    ingest = Keys(prefix, 2).ingest(1)
    client.xadd(ingest, {"c": "x", "s": 1, "m": "{}"})
    try:
        config = write_toml(tmp_path / "c.toml", settings)
        done = cli(config, "status", "--json")
        assert done.returncode == 0, done.stderr
        shards = json.loads(done.stdout)["shards"]
        assert [(r["shard"], r["owner"], r["backlog"]) for r in shards] == [
            (0, "flusher-a", 0),
            (1, "flusher-a", 1),
        ]
        assert 0 < shards[0]["lease_left_s"] <= 60
        assert shards[1]["last_flush_s_ago"] is None and shards[1]["lag_s"] >= 0
        text = cli(config, "status").stdout
        assert "shards (owner, backlog, lag" in text
        assert "s1    flusher-a" in text and "last flush never" in text
        assert "segment index: 0 flush rows, 0 history rows" in text
    finally:
        client.delete(ingest)
        client.close()


def test_status_exits_1_when_a_dependency_is_down(settings: dict[str, Any], tmp_path: Path) -> None:
    settings["postgres"]["dsn"] = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    settings["postgres"]["connect_timeout"] = 1.0
    done = cli(write_toml(tmp_path / "c.toml", settings), "status")
    assert done.returncode == 1
    assert "postgres" in done.stdout
    assert "FAIL" in done.stdout
    assert "Traceback" not in done.stderr


def test_status_names_the_cause_and_what_it_skipped(
    settings: dict[str, Any], tmp_path: Path
) -> None:
    """Refused is said as refused (not "no answer within 2s"), and only what needs it is skipped."""
    settings["postgres"]["dsn"] = f"postgresql://postgres:pg-secret@127.0.0.1:{free_port()}/x"
    done = cli(write_toml(tmp_path / "c.toml", settings), "status", "--json")
    assert done.returncode == 1
    data = json.loads(done.stdout)
    deps = {d["name"]: d for d in data["dependencies"]}
    assert deps["postgres"]["detail"].startswith("connection refused: ")
    assert deps["postgres"]["latency_ms"] < 1000  # said at once, not after check_timeout
    assert deps["redis"]["ok"] and deps["s3"]["ok"]
    assert data["skipped"] == {
        "schema": "needs postgres, which failed",
        "queue": "needs postgres, which failed",
        "schedules": "needs postgres, which failed",
        "shards": "needs postgres, which failed",
    }
    assert isinstance(data["programs"], list)  # Redis answered: heartbeats are still shown
    assert "pg-secret" not in done.stdout + done.stderr
    text = cli(write_toml(tmp_path / "c.toml", settings), "status")
    assert "queue:\n  (skipped: needs postgres, which failed)" in text.stdout
    assert "programs:\n  (no heartbeats)" in text.stdout


def test_doctor_names_the_cause_the_key_and_the_skipped_checks(
    settings: dict[str, Any], migrated: str, tmp_path: Path
) -> None:
    settings["redis"]["url"] = f"redis://:r-secret@127.0.0.1:{free_port()}/0"
    done = cli(write_toml(tmp_path / "c.toml", settings), "doctor")
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    redis_line = next(i for i, line in enumerate(lines) if line.startswith("redis "))
    assert lines[redis_line].split()[:2] == ["redis", "FAIL"]
    assert "connection refused: " in lines[redis_line]
    assert "hint: nothing listens at the host and port of redis.url" in lines[redis_line + 1]
    # PostgreSQL answered: the schema is still checked; the job round trip needs Redis.
    assert any(line.split()[:2] == ["schema", "ok"] for line in lines), done.stdout
    assert "jobs       SKIP  needs redis, which failed" in lines
    assert "r-secret" not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_doctor_names_a_missing_database_and_a_refused_user(
    settings: dict[str, Any], tmp_path: Path
) -> None:
    base = settings["postgres"]["dsn"].rsplit("/", 1)[0]
    settings["postgres"]["dsn"] = f"{base}/no_such_db_{uuid.uuid4().hex[:8]}"
    done = cli(write_toml(tmp_path / "a.toml", settings), "doctor")
    assert done.returncode == 1
    assert "postgres   FAIL" in done.stdout
    assert "database does not exist: " in done.stdout
    assert "hint: create the database named in postgres.dsn" in done.stdout
    assert "schema     SKIP  needs postgres, which failed" in done.stdout
    settings["postgres"]["dsn"] = base.replace("//postgres@", "//no_such_role@") + "/postgres"
    done = cli(write_toml(tmp_path / "b.toml", settings), "doctor")
    assert "authentication failed: " in done.stdout, done.stdout
    assert "hint: the credentials (postgres.dsn) are refused" in done.stdout


async def test_check_causes_from_the_real_clients() -> None:
    """DNS failure, refusal and timeout, read from what psycopg and redis-py really raise."""
    import socket

    import psycopg
    import redis.asyncio as aioredis

    from appliance.checks import run_check

    async def pg(dsn: str) -> str:
        async with await psycopg.AsyncConnection.connect(dsn, connect_timeout=2):
            return "ok"

    def redis_ping(url: str) -> Any:
        async def check() -> str:
            client = aioredis.Redis.from_url(url, socket_connect_timeout=2)
            try:
                await client.ping()
            finally:
                await client.aclose()
            return "ok"

        return check

    closed = free_port()
    refused = await run_check("postgres", lambda: pg(f"postgresql://u@127.0.0.1:{closed}/x"), 5)
    assert refused.detail.startswith("connection refused: "), refused.detail
    refused = await run_check("redis", redis_ping(f"redis://127.0.0.1:{closed}/0"), 5)
    assert refused.detail.startswith("connection refused: "), refused.detail
    dns = await run_check("redis", redis_ping("redis://no-such-host.invalid:6379/0"), 5)
    assert dns.detail.startswith(("DNS failure: ", "timeout: ")), dns.detail
    dns = await run_check("postgres", lambda: pg("postgresql://u@no-such-host.invalid/x"), 5)
    assert dns.detail.startswith(("DNS failure: ", "timeout: ")), dns.detail
    # A listener that never answers: the check's own deadline, said as a timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        hung = await run_check("postgres", lambda: pg(f"postgresql://u@127.0.0.1:{port}/x"), 0.5)
    assert hung.detail == "timeout: no answer within 0.5s"


def test_doctor_fails_the_job_line_with_a_hint_when_no_worker_runs(
    settings: dict[str, Any], migrated: str, tmp_path: Path
) -> None:
    settings["s3"]["bucket"] = f"doc-{uuid.uuid4().hex[:12]}"
    config = write_toml(tmp_path / "c.toml", settings)
    assert cli(config, "storage", "init").returncode == 0
    # A database whose queue no worker serves: the ping job is never answered.
    done = cli(config, "doctor", "--job-timeout", "2")
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["config", "ok"]
    for name in ("postgres", "redis", "s3", "schema"):
        assert any(line.split()[:2] == [name, "ok"] for line in lines), done.stdout
    assert any(line.split()[:2] == ["jobs", "FAIL"] for line in lines), done.stdout
    assert "hint: the worker did not answer" in done.stdout
    # The unanswered ping was taken back, not left for a worker that starts later.
    import psycopg

    with psycopg.connect(migrated) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pgqueuer WHERE entrypoint = 'diagnostics.ping'"
            " AND status = 'queued'"
        ).fetchone()
    assert row == (0,)


def test_doctor_reports_bad_config_first(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", {"api": {"port": "x"}})
    done = cli(config, "doctor")
    assert done.returncode == 2
    assert done.stdout.split()[:2] == ["config", "FAIL"]


def test_commands_fail_in_one_line_naming_the_cause_and_the_key(
    settings: dict[str, Any], fresh_database: Any, tmp_path: Path
) -> None:
    """A dependency down is one log line with the cause and the key to fix: no traceback."""
    settings["postgres"]["dsn"] = f"postgresql://postgres:pg-secret@127.0.0.1:{free_port()}/x"
    config = write_toml(tmp_path / "a.toml", settings)
    for args in (("keys", "list"), ("keys", "create", "--name", "k", "--scope", "read"),
                 ("migrate",), ("db", "verify")):  # fmt: skip
        done = cli(config, *args)
        assert done.returncode == 1, args
        assert "Traceback" not in done.stderr, args
        assert "pg-secret" not in done.stderr + done.stdout
        lines = log_lines(done.stderr)
        assert len(done.stderr.strip().splitlines()) == len(lines) == 1, done.stderr
        assert lines[0]["event"] == "command_failed"
        assert lines[0]["error"].startswith("connection refused: "), lines[0]
        assert "postgres.dsn" in lines[0]["fix"]
    # A database that answers but was never migrated: the fix is the step to run.
    settings["postgres"]["dsn"] = fresh_database()
    done = cli(write_toml(tmp_path / "b.toml", settings), "keys", "list")
    assert done.returncode == 1
    (line,) = log_lines(done.stderr)
    assert line["fix"] == "the schema is missing: run `appliance migrate`"


def test_make_run_with_postgres_unreachable_says_so_in_one_line(
    settings: dict[str, Any], tmp_path: Path
) -> None:
    """scripts/devrun.py (`make run`) exits 1 with one line naming the cause and the key."""
    settings["postgres"]["dsn"] = f"postgresql://postgres:pg-secret@127.0.0.1:{free_port()}/devdb"
    config = write_toml(tmp_path / "c.toml", settings)
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, str(root / "scripts" / "devrun.py")],
        env={"APPLIANCE_CONFIG": str(config), "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()], (
        "one line, not a psycopg traceback"
    )
    assert done.stderr.startswith(
        "devrun: cannot reach PostgreSQL to create database 'devdb': connection refused: "
    )
    assert "postgres.dsn" in done.stderr
    assert "pg-secret" not in done.stderr
