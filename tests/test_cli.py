"""CLI commands as subprocesses: wait, storage init, status, doctor; log lines and redaction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

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


def test_status_exits_1_when_a_dependency_is_down(settings: dict[str, Any], tmp_path: Path) -> None:
    settings["postgres"]["dsn"] = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    settings["postgres"]["connect_timeout"] = 1.0
    done = cli(write_toml(tmp_path / "c.toml", settings), "status")
    assert done.returncode == 1
    assert "postgres" in done.stdout
    assert "FAIL" in done.stdout


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
