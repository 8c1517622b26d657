"""Slow, idle and vanishing HTTP clients against a real api process (granian), over raw sockets.

The body deadline answers 408 and closes; a body cut short by its client is a 499, never a 5xx;
and two thousand slow connections from one client leave the probes and other clients served.
"""

from __future__ import annotations

import asyncio
import copy
import json
import resource
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api_process import APPLIANCE, ApiProcess, admin_key, api_settings, process_env

pytestmark = pytest.mark.process

ROUTE = "/v1/conversations/{conversation}/messages"
SLOW = 2000  # connections held at once: half stuck in their headers, half in their bodies


def start_api(base_settings: dict[str, Any], directory: Path, **api: float) -> Iterator[ApiProcess]:
    """One api worker with the default connection limits and these `[api]` settings."""
    settings = api_settings(copy.deepcopy(base_settings), directory, api={"workers": 1, **api})
    proc = ApiProcess(directory, settings)
    # /readyz checks the bucket too.
    subprocess.run(
        [str(APPLIANCE), "storage", "init"],
        env=process_env(proc.config_path),
        check=True,
        capture_output=True,
        timeout=60,
    )
    with proc.running():
        yield proc


@pytest.fixture(scope="module")
def server(
    base_settings: dict[str, Any], migrated: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiProcess]:
    """A short body deadline."""
    yield from start_api(base_settings, tmp_path_factory.mktemp("slow-api"), body_timeout=2.0)


@pytest.fixture
def patient_server(
    base_settings: dict[str, Any], migrated: str, tmp_path: Path
) -> Iterator[ApiProcess]:
    """Deadlines long enough that slow clients stay connected for the whole test."""
    yield from start_api(base_settings, tmp_path, header_timeout=60.0, body_timeout=120.0)


@pytest.fixture(scope="module")
def admin(server: ApiProcess) -> str:
    return admin_key(server.settings)


@pytest.fixture(scope="module")
def conversation(server: ApiProcess, admin: str) -> str:
    name = f"slow-{uuid.uuid4().hex[:8]}"
    answer = httpx.post(
        f"{server.url}/v1/conversations",
        json={"conversation": name},
        headers={"Authorization": f"Bearer {admin}"},
        timeout=10,
    )
    assert answer.status_code == 201, answer.text
    return name


def publish_head(conversation: str, key: str, extra: str) -> bytes:
    """The request line and headers of a publish, ending with the blank line."""
    return (
        f"POST /v1/conversations/{conversation}/messages HTTP/1.1\r\nHost: test\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n{extra}\r\n"
    ).encode()


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"connection still open after {timeout}s; got {data!r}")


def http_samples(server: ApiProcess, route: str) -> dict[str, float]:
    """{status: count} of appliance_http_requests_total for POSTs to `route`."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "appliance_http_requests_total"
                and labels.get("route") == route
                and labels.get("method") == "POST"
            ):
                out[labels["status"]] = out.get(labels["status"], 0.0) + sample.value
    return out


def request_lines(server: ApiProcess) -> list[dict[str, Any]]:
    lines = []
    for line in server.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "request":
                lines.append(event)
    return lines


def test_a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_closes(
    server: ApiProcess, admin: str, conversation: str
) -> None:
    request_id = f"slow-{uuid.uuid4().hex[:8]}"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            publish_head(
                conversation, admin, f"X-Request-ID: {request_id}\r\nContent-Length: 100\r\n"
            )
            + b"{"
        )
        started = time.monotonic()
        answer = read_until_closed(sock, 30)
        elapsed = time.monotonic() - started
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer
    assert b"connection: close" in head.lower(), answer
    error = json.loads(body)["error"]
    assert error["code"] == "timeout", error
    assert error["field"] is None, error
    assert elapsed >= 1.5, f"answered after {elapsed:.2f}s, before body_timeout (2 s)"
    logged = [e for e in request_lines(server) if e.get("request_id") == request_id]
    assert [e["status"] for e in logged] == [408], logged


def test_a_body_cut_short_by_its_client_is_a_499_never_a_5xx(
    server: ApiProcess, admin: str, conversation: str
) -> None:
    before = http_samples(server, ROUTE)
    ids = [f"gone-{uuid.uuid4().hex[:8]}", f"chunk-{uuid.uuid4().hex[:8]}"]

    # 1. The client sends part of a declared body and goes away.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            publish_head(conversation, admin, f"X-Request-ID: {ids[0]}\r\nContent-Length: 100\r\n")
            + b'{"type": "te'
        )
    # 2. Broken chunked framing: a chunk size that is not hexadecimal.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            publish_head(
                conversation, admin, f"X-Request-ID: {ids[1]}\r\nTransfer-Encoding: chunked\r\n"
            )
            + b'5\r\n{"typ\r\nzz\r\nbroken\r\n'
        )
        answer = read_until_closed(sock, 30)
    # The one still listening hears a 400 naming the body, then the connection closes.
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["field"] == "body", answer

    def logged() -> list[dict[str, Any]]:
        return [e for e in request_lines(server) if e.get("request_id") in ids]

    deadline = time.monotonic() + 30
    while len(logged()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sorted(e["status"] for e in logged()) == [499, 499], logged()
    after = http_samples(server, ROUTE)
    assert after.get("499", 0) - before.get("499", 0) == 2, (before, after)
    fives = {s: n - before.get(s, 0) for s, n in after.items() if s.startswith("5")}
    assert not any(fives.values()), f"counted as 5xx: {fives}"
    assert "unhandled_exception" not in server.log(400)


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        top = needed * 2 if hard == resource.RLIM_INFINITY else min(hard, needed * 2)
        assert top >= needed, f"`ulimit -Hn` is {hard}; this test needs {needed} descriptors"
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))


async def test_2000_slow_connections_leave_probes_and_other_clients_served(
    patient_server: ApiProcess, admin: str, conversation: str
) -> None:
    """All held at once, from one client; no deadline frees any of them during the test."""
    server = patient_server
    raise_fd_limit(SLOW + 512)
    headers_only = b"GET /livez HTTP/1.1\r\nHost: test\r\nX-Slow: 1\r\n"  # never ends
    slow_body = publish_head(conversation, admin, "Content-Length: 100\r\n") + b"{"
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def hold(payload: bytes) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(payload)
        await writer.drain()
        held.append((reader, writer))

    async def silent(reader: asyncio.StreamReader) -> bool:
        try:
            await asyncio.wait_for(reader.read(1), 0.2)
        except TimeoutError:
            return True
        return False

    try:
        for payload in (headers_only, slow_body):
            for _ in range(SLOW // 2 // 200):
                await asyncio.gather(*(hold(payload) for _ in range(200)))
        assert len(held) == SLOW

        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            # Once the burst of slow requests has reached the app, every probe answers in time.
            answer = await client.get("/livez")
            assert answer.status_code == 200, answer.text
            for _ in range(3):
                for path in ("/livez", "/readyz"):
                    started = time.monotonic()
                    answer = await client.get(path, headers={"Connection": "close"})
                    elapsed = time.monotonic() - started
                    assert answer.status_code == 200, f"{path}: {answer.text}"
                    assert elapsed < 1.0, f"{path} took {elapsed:.2f}s beside {SLOW} slow clients"
            answer = await client.post(
                f"/v1/conversations/{conversation}/messages",
                json={"type": "text", "body": {"text": "still here"}},
                headers={"Authorization": f"Bearer {admin}", "Connection": "close"},
            )
            assert answer.status_code == 201, answer.text
        # The slow clients were all still connected (nothing answered or closed them).
        still = await asyncio.gather(*(silent(reader) for reader, _ in held))
        assert all(still), f"{still.count(False)} slow connections ended early"
    finally:
        for _, writer in held:
            writer.close()
