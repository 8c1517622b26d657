"""Idle and slow HTTP connections one api process holds while /livez answers within a second.

For each kind of connection, a fresh api (one worker, `[api] max_connections` as configured,
header and body deadlines lifted so nothing expires during the run) and one client process:

- `idle`:    TCP connected, nothing sent (granian has no deadline for these: only a proxy does);
- `headers`: a request line and a header, the headers never finished (`header_timeout` ends them);
- `body`:    an authenticated publish declaring Content-Length: 100 with one byte sent
             (`body_timeout` ends them with 408).

Connections are opened `--step` at a time up to `--max`; after each step /livez is asked three
times over new connections and the worker's RSS is read. Printed per kind: the most connections
held while every /livez answered within a second, and the worker's RSS per connection (RSS with
them open minus RSS before, divided by their number; a fresh process per kind, since freed memory
is not given back to the system).

    APPLIANCE_CONFIG=config.example.toml .venv/bin/python bench/idle_connections.py
    .venv/bin/python bench/idle_connections.py --kinds idle,headers,body --step 1000 --max 8000
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time

from common import BenchApi, load_average, machine, rss_bytes

LIVEZ_BOUND = 1.0


def raise_fd_limit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft if soft != resource.RLIM_INFINITY else needed


def payload(kind: str, key: str, conversation: str) -> bytes:
    if kind == "idle":
        return b""
    if kind == "headers":
        return b"GET /livez HTTP/1.1\r\nHost: bench\r\nX-Slow: 1\r\n"
    return (
        f"POST /v1/conversations/{conversation}/messages HTTP/1.1\r\nHost: bench\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        "Content-Length: 100\r\n\r\n{"
    ).encode()


async def livez(port: int) -> float:
    """Seconds for one /livez over a new connection (inf when it fails or takes over 5 s)."""
    started = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        writer.write(b"GET /livez HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    except (OSError, TimeoutError):
        return float("inf")
    return time.monotonic() - started if answer.startswith(b"HTTP/1.1 200") else float("inf")


async def ramp(
    api: BenchApi, kind: str, conversation: str, step: int, most: int
) -> tuple[int, float]:
    port = api.port
    worker = api.worker_pids()
    data = payload(kind, api.admin_key, conversation)
    before = rss_bytes(worker)
    held: list[asyncio.StreamWriter] = []
    best, per_connection = 0, 0.0

    async def hold() -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        if data:
            writer.write(data)
            await writer.drain()
        held.append(writer)

    try:
        while len(held) < most:
            target = min(most, len(held) + step)
            while len(held) < target:
                await asyncio.gather(*(hold() for _ in range(min(250, target - len(held)))))
            await livez(port)  # the step's burst reaches the app first
            await asyncio.sleep(0.5)
            worst = max([await livez(port) for _ in range(3)])
            rss = rss_bytes(worker)
            print(
                f"  {kind:8} {len(held):6} held: /livez worst {worst * 1000:8.1f} ms,"
                f" worker RSS {rss / 1e6:7.1f} MB",
                flush=True,
            )
            if worst >= LIVEZ_BOUND:
                break
            best, per_connection = len(held), (rss - before) / len(held)
    finally:
        for writer in held:
            writer.close()
    return best, per_connection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default="idle,headers,body")
    parser.add_argument("--step", type=int, default=1000)
    parser.add_argument("--max", type=int, default=8000, help="stop there (<= max_connections)")
    args = parser.parse_args()
    limit = raise_fd_limit(args.max + 1024)
    if limit < args.max + 256:
        parser.error(f"this process may open {limit} files; raise `ulimit -n` for --max")
    print(machine(), f"load {load_average()}")
    summary = []
    for kind in args.kinds.split(","):
        env = {
            "APPLIANCE_API__HEADER_TIMEOUT": "60",
            "APPLIANCE_API__BODY_TIMEOUT": "300",
        }
        with BenchApi(extra_env=env) as api:
            (conversation,) = api.create_conversations(1)
            best, per_connection = asyncio.run(ramp(api, kind, conversation, args.step, args.max))
        summary.append(
            f"{kind:8} held {best:6} with /livez < {LIVEZ_BOUND:g} s;"
            f" worker RSS {per_connection / 1000:5.1f} KB per connection"
        )
    print("\n".join(summary))


if __name__ == "__main__":
    main()
