"""Logging: one JSON object per line with ts, level, event, process; URL passwords masked; lines
that repeat per request during an outage bounded (a first line, then one summary per window)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from appliance.api import errors
from appliance.api.app import create_app
from appliance.config import Config
from appliance.logthrottle import Throttle
from appliance.resources import Resources
from tests.messaging import bearer, body, issue_key, unique

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


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_throttle_writes_the_first_line_then_one_summary_per_window_with_the_count() -> None:
    clock, lines = Clock(), []  # no event loop: summaries come with the next occurrence
    throttle = Throttle(every=5.0, clock=clock)

    def emit(event: str, **fields: Any) -> None:
        lines.append({"event": event, **fields})

    for _ in range(1000):
        throttle(emit, "dependency_unavailable", "redis", error="refused")
    throttle(emit, "dependency_unavailable", "postgresql", error="down")  # another key: at once
    assert lines == [
        {"event": "dependency_unavailable", "error": "refused"},
        {"event": "dependency_unavailable", "error": "down"},
    ]
    clock.now += 5.0
    throttle(emit, "dependency_unavailable", "redis", error="refused")
    assert lines[2] == {
        "event": "dependency_unavailable",
        "error": "refused",
        "repeated": 1000,  # the 999 held back and this one
        "seconds": 5.0,
    }
    clock.now += 60.0  # quiet for a window: the next one is a first line again
    throttle(emit, "dependency_unavailable", "redis", error="refused")
    assert lines[3] == {"event": "dependency_unavailable", "error": "refused"}
    assert len(lines) == 4


def requests_503() -> float:
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "appliance_http_requests"
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels.get("status") == "503"
    )


async def test_a_redis_outage_logs_a_bounded_number_of_lines_and_counts_every_request(
    settings: dict[str, Any],
    resources: Resources,
    private_redis: tuple[int, Callable[[], None], Callable[[], None]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port, _, kill = private_redis
    settings["redis"]["url"] = f"redis://127.0.0.1:{port}/0"
    settings["redis"]["connect_timeout"] = 0.5
    settings["appliance"]["roles"] = ["api"]
    every, requests = 1.0, 400
    monkeypatch.setattr(errors, "OUTAGE_LOG", Throttle(every=every))
    key = await issue_key(resources, ["admin"])
    async with AsyncTestClient(app=create_app(Config.model_validate(settings))) as client:
        created = await client.post(
            "/v1/conversations", json={"conversation": unique("c")}, headers=bearer(key)
        )
        assert created.status_code == 201, created.text
        path = f"/v1/conversations/{created.json()['conversation']}/messages"
        kill()
        counted = requests_503()
        with capture_logs() as logs:
            began = time.monotonic()
            for _ in range(requests):
                response = await client.post(path, json=body(), headers=bearer(key))
                assert response.status_code == 503, response.text
            took = time.monotonic() - began

            def outage_lines() -> list[dict[str, Any]]:
                events = ("dependency_unavailable", "request_failed")
                return [line for line in logs if line["event"] in events]

            def accounted() -> int:  # a first line stands for itself, a summary for `repeated`
                return sum(line.get("repeated", 1) for line in outage_lines())

            deadline = time.monotonic() + 30.0  # the last window's summary, written by a timer
            while accounted() < requests:
                assert time.monotonic() < deadline, outage_lines()
                await asyncio.sleep(0.1)
        assert requests_503() - counted == requests  # metrics count every request
        lines = outage_lines()
        assert lines[0]["dependency"] == "redis" and "repeated" not in lines[0]
        assert [line["dependency"] for line in lines] == ["redis"] * len(lines)
        assert all("repeated" in line for line in lines[1:])
        assert accounted() == requests
        assert len(lines) <= 2 + took / every  # one first line, at most one summary per window
