"""Logging: one JSON object per line with ts, level, event, process; URL passwords masked."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import logging, structlog
from appliance import logs
logs.configure("worker", "info", "json")
structlog.get_logger().info("connected", dsn="postgresql://app:pg-secret@db/app", n=3)
logging.getLogger("psycopg").warning("retrying redis://:redis-secret@cache:6379/0")
structlog.get_logger().debug("hidden at info")
try:
    raise ValueError("boom")
except ValueError:
    structlog.get_logger().exception("failed")
"""


def test_json_lines_with_process_and_masked_passwords() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=30, check=True
    )
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["event"] for line in lines[:2]] == [
        "connected",
        "retrying redis://:***@cache:6379/0",
    ]
    assert all({"ts", "level", "event", "process"} <= set(line) for line in lines)
    assert all(line["process"] == "worker" for line in lines)
    assert lines[0]["dsn"] == "postgresql://app:***@db/app"
    assert lines[0]["ts"].endswith("Z")
    assert "hidden at info" not in done.stdout
    assert "pg-secret" not in done.stdout
    assert "redis-secret" not in done.stdout
    assert lines[2]["level"] == "error"
    assert "ValueError: boom" in lines[2]["exception"]
