"""WebSocket fan-out: deliveries/s, publish→deliver latency, api CPU and memory per socket.

`--sockets` WebSocket subscribers (one process, uvloop) spread evenly over `--conversations`;
one api worker. In one run:

1. RSS per idle socket: api RSS (granian main + worker) with the sockets open and subscribed, minus
   its RSS before they were opened (after a warm-up socket), divided by their number;
2. for each `--rate` (publishes/s in total, round-robin over the conversations, sent over HTTP by
   a paced wrk, or a Python publisher in another process without wrk) for `--seconds`: deliveries/s
   (received until every expected frame arrived or 10 s passed), p50/p99 latency = receive time
   minus the message's `ts` (same clock; `ts` has millisecond precision, truncated, so figures
   read up to 1 ms high), api CPU-seconds per 1,000 deliveries (utime+stime of granian's processes,
   the publish requests included);
3. the reference: the same frames PUBLISHed straight to Redis at the same rate, to the same number
   of redis-py subscriber connections in this process (each its own SUBSCRIBE, as raw Redis pub/sub
   fan-out would be used without the appliance), measured the same way, with redis-server's
   CPU-seconds per 1,000 deliveries in place of the api's;
4. the memory reference: RSS per idle socket of a bare ASGI WebSocket app (bench/noop_app.py
   `bare`: accept, answer the subscribe, wait) on the same granian with the same flags, i.e.
   granian's own share of the figure in 1.

Targets: api CPU <= 0.1 s per 1,000 deliveries, RSS <= 100 KB per idle socket.

    make bench        # or, e.g.:
    APPLIANCE_CONFIG=config.example.toml .venv/bin/python bench/fanout.py --sockets 1000 --rate 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis
import uvloop
from common import (
    BARE_FACTORY,
    BenchApi,
    CpuMeter,
    add_load_options,
    cpu_seconds,
    load_average,
    machine,
    parse_load_options,
    percentile,
    profile_summary,
    redis_pid,
    rss_bytes,
    self_cpu,
    start_profile,
)
from publish import BODY, Phase, run_python, run_wrk
from websockets.asyncio.client import ClientConnection, connect


class _Message(msgspec.Struct):
    ts: str


class _Frame(msgspec.Struct):
    event: str
    message: _Message | None = None


_decode = msgspec.json.Decoder(_Frame).decode
_epoch: dict[str, float] = {}


def epoch(ts: str) -> float:
    """`2026-11-23T10:00:00.123Z` → seconds since the epoch (many deliveries share one ts)."""
    value = _epoch.get(ts)
    if value is None:
        if len(_epoch) > 100_000:
            _epoch.clear()
        value = _epoch[ts] = datetime.fromisoformat(ts).timestamp()
    return value


@dataclass
class Tally:
    """Deliveries seen by all subscribers while `recording`."""

    recording: bool = False
    count: int = 0
    last: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def on_frame(self, raw: str | bytes) -> None:
        now = time.time()
        if not self.recording:
            return
        frame = _decode(raw)
        if frame.event != "message" or frame.message is None:
            return
        self.count += 1
        self.last = now
        self.latencies.append(now - epoch(frame.message.ts))

    def reset(self) -> None:
        self.recording, self.count, self.last, self.latencies = True, 0, 0.0, []


@dataclass
class Outcome:
    name: str
    published: int
    expected: int
    delivered: int
    seconds: float
    p50_ms: float
    p99_ms: float
    server_cpu: float
    client_cpu: float

    def show(self, server: str) -> None:
        rate = self.delivered / self.seconds if self.seconds else 0.0
        per_k = self.server_cpu / self.delivered * 1000 if self.delivered else float("nan")
        missing = self.expected - self.delivered
        print(
            f"{self.name:<30} {rate:8.0f} deliveries/s   p50 {self.p50_ms:7.2f} ms"
            f"   p99 {self.p99_ms:7.2f} ms   {server} CPU {per_k:6.3f} s/1k deliveries"
            f" ({self.server_cpu / self.seconds:4.0%} of a core)   client CPU"
            f" {self.client_cpu / self.seconds:4.0%}   ({self.delivered}/{self.expected}"
            + (f", {missing} MISSING" if missing > 0 else "")
            + f", {self.published} published)",
            flush=True,
        )


async def drain(tally: Tally, expected: int, started: float, timeout: float = 10.0) -> float:
    """Wait until every expected frame arrived (or timeout); the delivery window in seconds."""
    deadline = time.monotonic() + timeout
    while tally.count < expected and time.monotonic() < deadline:  # noqa: ASYNC110 (polls a count)
        await asyncio.sleep(0.05)
    return (tally.last or time.time()) - started


# ---- the appliance -----------------------------------------------------------------------------


async def subscriber(url: str, conversation: str, tally: Tally) -> ClientConnection:
    ws = await connect(url, compression=None, ping_interval=None, proxy=None, max_queue=None)
    await ws.send(json.dumps({"op": "subscribe", "conversation": conversation}))
    while (answer := json.loads(await ws.recv())).get("event") != "subscribed":
        if answer.get("event") == "error":  # presence events of other sockets may come first
            raise RuntimeError(f"subscribe {conversation}: {answer}")

    async def read() -> None:
        async for raw in ws:
            tally.on_frame(raw)

    ws.reader = asyncio.create_task(read())  # type: ignore[attr-defined]
    return ws


async def open_sockets(
    url: str, conversations: list[str], count: int, tally: Tally
) -> list[ClientConnection]:
    gate = asyncio.Semaphore(50)

    async def one(i: int) -> ClientConnection:
        async with gate:
            return await subscriber(url, conversations[i % len(conversations)], tally)

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def close_sockets(sockets: list[Any]) -> None:
    async def one(ws: Any) -> None:
        ws.reader.cancel()
        await ws.close()

    await asyncio.gather(*(one(ws) for ws in sockets), return_exceptions=True)


async def appliance_phase(
    api: BenchApi,
    conversations: list[str],
    tally: Tally,
    per_conversation: int,
    rate: float,
    seconds: float,
    generator: str,
) -> Outcome:
    phase = Phase(
        "publish",
        [f"/v1/conversations/{c}/messages" for c in conversations],
        json.dumps(BODY, separators=(",", ":")).encode(),
        1,
    )
    pids = api.pids()
    cpu0, own0 = cpu_seconds(pids), self_cpu()
    heads0 = api.heads(conversations)
    tally.reset()
    started = time.time()
    if generator == "wrk":
        result = await asyncio.to_thread(run_wrk, api.url, api.admin_key, phase, seconds, 8, rate)
    else:
        with ProcessPoolExecutor(1) as pool:
            result = await asyncio.get_running_loop().run_in_executor(
                pool, run_python, api.port, api.admin_key, phase, seconds, 8, rate
            )
    # From the seq counters: wrk does not count the requests still in flight at its end (and
    # the server may finish them just after it exits).
    await asyncio.sleep(0.5)
    published = api.heads(conversations) - heads0
    expected = published * per_conversation
    window = await drain(tally, expected, started)
    tally.recording = False
    outcome = Outcome(
        f"appliance @ {rate:g} publishes/s",
        published,
        expected,
        tally.count,
        window,
        percentile(tally.latencies, 50) * 1000,
        percentile(tally.latencies, 99) * 1000,
        cpu_seconds(pids) - cpu0,
        self_cpu() - own0,
    )
    if result.errors:
        print(f"  publish errors: {result.errors}")
    print(f"  (publish requests meanwhile: p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms)")
    return outcome


# ---- the reference: raw Redis pub/sub fan-out --------------------------------------------------


def frame(channel_index: int, seq: int) -> bytes:
    ts = datetime.now(UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
    message = {
        "conversation": f"ref-{channel_index}",
        "seq": seq,
        "id": "01JD0000000000000000000000",
        "ts": ts,
        "sender": "key:bench",
        **BODY,
    }
    return msgspec.json.encode({"event": "message", "message": message})


async def reference_phase(
    redis_url: str,
    prefix: str,
    channels: int,
    sockets: int,
    rate: float,
    seconds: float,
    server_pids: list[int],
) -> Outcome:
    names = [f"{prefix}:ref:{i}" for i in range(channels)]
    tally = Tally()
    clients: list[aioredis.Redis] = []
    subs: list[Any] = []
    gate = asyncio.Semaphore(50)

    async def one(i: int) -> None:
        async with gate:
            client = aioredis.Redis.from_url(redis_url, single_connection_client=False)
            pubsub = client.pubsub()
            await pubsub.subscribe(names[i % channels])
            await pubsub.get_message(timeout=5)  # the subscribe confirmation
            clients.append(client)
            subs.append(pubsub)

    await asyncio.gather(*(one(i) for i in range(sockets)))

    async def read(pubsub: Any) -> None:
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is not None and message["type"] == "message":
                tally.on_frame(message["data"])

    readers = [asyncio.create_task(read(p)) for p in subs]
    publisher = aioredis.Redis.from_url(redis_url)
    await asyncio.sleep(0.5)
    cpu0, own0 = cpu_seconds(server_pids), self_cpu()
    tally.reset()
    started = time.time()
    published = 0
    at = time.monotonic()
    end = at + seconds
    while at < end:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        await publisher.publish(names[published % channels], frame(published % channels, published))
        published += 1
        at += 1 / rate
    expected = published * (sockets // channels)
    window = await drain(tally, expected, started)
    tally.recording = False
    outcome = Outcome(
        f"raw Redis @ {rate:g} publishes/s",
        published,
        expected,
        tally.count,
        window,
        percentile(tally.latencies, 50) * 1000,
        percentile(tally.latencies, 99) * 1000,
        cpu_seconds(server_pids) - cpu0,
        self_cpu() - own0,
    )
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    for pubsub in subs:
        await pubsub.aclose()
    for client in clients:
        await client.aclose()
    await publisher.aclose()
    return outcome


# ---- the benchmark -----------------------------------------------------------------------------


async def idle_rss(
    api: BenchApi, url: str, conversations: list[str], count: int, tally: Tally
) -> tuple[list[ClientConnection], int, int, float]:
    """Open `count` subscribed sockets; (sockets, RSS before, RSS after, seconds to open)."""
    await asyncio.sleep(2)
    pids = api.pids()
    before = rss_bytes(pids)
    opened = time.monotonic()
    sockets = await open_sockets(url, conversations, count, tally)
    took = time.monotonic() - opened
    await asyncio.sleep(3)
    return sockets, before, rss_bytes(pids), took


@dataclass
class Report:
    sockets: int = 0
    rss_per_socket: float = 0.0
    bare_per_socket: float | None = None
    outcomes: list[Outcome] = field(default_factory=list)
    references: list[Outcome] = field(default_factory=list)


async def run(args: argparse.Namespace, api: BenchApi, generator: str, report: Report) -> None:
    conversations = api.create_conversations(args.conversations)
    per_conversation = args.sockets // args.conversations
    report.sockets = sockets_total = per_conversation * args.conversations
    ws_url = api.url.replace("http://", "ws://") + f"/v1/stream?token={api.admin_key}"
    tally = Tally()

    # Warm-up: one socket and a few publishes through the whole path; then the idle RSS.
    warm = await open_sockets(ws_url, conversations, 1, tally)
    await appliance_phase(api, conversations[:1], tally, 1, 20, 1, generator)
    await close_sockets(warm)
    sockets, before, after, took = await idle_rss(api, ws_url, conversations, sockets_total, tally)
    report.rss_per_socket = (after - before) / sockets_total
    print(
        f"{sockets_total} sockets over {args.conversations} conversations"
        f" ({per_conversation} each) opened and subscribed in {took:.1f} s"
    )
    print(
        f"api RSS: {before / 2**20:.1f} MiB before, {after / 2**20:.1f} MiB with the sockets:"
        f" {report.rss_per_socket / 1024:.1f} KiB per idle socket"
    )

    meter = CpuMeter(api.pids(), redis_pid(api.redis_url))
    for rate in args.rate:
        meter.start()
        outcome = await appliance_phase(
            api, conversations, tally, per_conversation, rate, args.seconds, generator
        )
        meter.stop()
        outcome.show("api")
        print(f"  {meter.describe()}")
        report.outcomes.append(outcome)

    if args.profile:
        worker = api.worker_pids()[-1]
        out = api.run_dir / "profile-fanout.txt"
        spy = start_profile(worker, args.seconds, out)
        await asyncio.sleep(0.5)
        await appliance_phase(
            api, conversations, tally, per_conversation, args.rate[0], args.seconds, generator
        )
        spy.wait()
        print(f"-- py-spy on the worker (pid {worker}) at {args.rate[0]:g} publishes/s")
        print(profile_summary(out, args.seconds))
        kept = Path(tempfile.gettempdir()) / "bench-fanout-profile.txt"
        shutil.copy(out, kept)
        print(f"  (collapsed stacks kept in {kept})")

    await close_sockets(sockets)
    api.delete_conversations(conversations)

    if not args.no_reference:
        pid = redis_pid(api.redis_url)
        server = [pid] if pid else []  # a remote Redis: its CPU is not measured
        for rate in args.rate:
            ref = await reference_phase(
                api.redis_url, api.prefix, args.conversations, sockets_total, rate,
                args.seconds, server,
            )  # fmt: skip
            ref.show("redis-server")
            report.references.append(ref)


async def bare_rss(api: BenchApi, count: int, report: Report) -> None:
    url = api.url.replace("http://", "ws://") + "/"
    tally = Tally()
    await close_sockets(await open_sockets(url, ["-"], 1, tally))
    sockets, before, after, _ = await idle_rss(api, url, ["-"], count, tally)
    report.bare_per_socket = (after - before) / count
    print(
        f"bare ASGI WebSocket app on the same granian: {before / 2**20:.1f} MiB before,"
        f" {after / 2**20:.1f} MiB with {count} sockets:"
        f" {report.bare_per_socket / 1024:.1f} KiB per idle socket"
    )
    await close_sockets(sockets)


def summarize(args: argparse.Namespace, report: Report) -> None:
    print("-- summary")
    first = report.outcomes[0]
    per_k = first.server_cpu / first.delivered * 1000 if first.delivered else float("nan")
    print(
        f"api CPU per 1,000 deliveries at {args.rate[0]:g} publishes/s"
        f" ({report.sockets} sockets): {per_k:.3f} s"
        f"  (target <= 0.1 s: {'met' if per_k <= 0.1 else 'MISSED'})"
    )
    rss = report.rss_per_socket
    line = f"api RSS per idle socket: {rss / 1024:.1f} KiB"
    if report.bare_per_socket is not None:
        line += f" (bare granian ASGI WebSocket: {report.bare_per_socket / 1024:.1f} KiB)"
    print(f"{line}  (target <= 100 KB: {'met' if rss <= 100_000 else 'MISSED'})")
    for outcome, ref in zip(report.outcomes, report.references, strict=False):
        print(
            f"{outcome.name} vs {ref.name}: deliveries/s"
            f" {outcome.delivered / outcome.seconds:.0f} vs {ref.delivered / ref.seconds:.0f},"
            f" p50 {outcome.p50_ms:.1f} vs {ref.p50_ms:.1f} ms,"
            f" p99 {outcome.p99_ms:.1f} vs {ref.p99_ms:.1f} ms, server CPU per 1,000 deliveries"
            f" {outcome.server_cpu / max(outcome.delivered, 1) * 1000:.3f}"
            f" vs {ref.server_cpu / max(ref.delivered, 1) * 1000:.3f} s"
        )
    print(f"load average at the end: {load_average()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--conversations", type=int, default=10)
    parser.add_argument(
        "--rate",
        type=lambda text: [float(x) for x in text.split(",")],
        default=[100.0],
        help="publishes/s in total; a comma list runs one phase per rate (default 100)",
    )
    parser.add_argument("--seconds", type=float, default=15, help="length of each phase")
    parser.add_argument("--no-reference", action="store_true", help="skip the raw Redis run")
    parser.add_argument(
        "--no-bare", action="store_true", help="skip the bare-granian RSS reference"
    )
    add_load_options(parser)
    args, generator = parse_load_options(parser)

    # Room for the sockets on both ends (the api inherits this limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * args.sockets + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    print(f"machine: {machine()}; api, subscribers and publisher on the same box")
    print(
        f"subscribers: websockets {__import__('websockets').__version__} on uvloop, one process;"
        f" publisher: {generator} over HTTP (8 connections, paced); 1 granian worker"
    )
    report = Report()
    # Every subscriber is one principal here: lift the per-principal socket limit out of the way.
    sockets = {"APPLIANCE_REALTIME__MAX_SOCKETS_PER_PRINCIPAL": str(args.sockets + 10)}
    with BenchApi(extra_env=sockets) as api:
        uvloop.run(run(args, api, generator, report))
    if not args.no_bare:
        with BenchApi(BARE_FACTORY) as bare:
            uvloop.run(bare_rss(bare, report.sockets, report))
    summarize(args, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
