"""message.created webhooks: messages published per second against events delivered per second.

Starts its own moto S3 server and api (granian, one worker; bench/common.py's BenchApi) on a
database of its own (dropped at the end), then the real worker and flusher programs
(`appliance run worker|flusher`) and a webhook receiver on 127.0.0.1 (a process of its own: it
parses each POST, counts its events and answers 200). In one run, with the same
load generator (bench/publish.py's raw HTTP/1.1 client, closed loop, `--connections`):

1. reference: `--seconds` of single publishes, then of batch publishes (`--batch` per request),
   with no endpoint (the dispatcher idle, no `webhooks` consumer group);
2. an endpoint subscribed to message.created is registered; once the dispatcher's groups exist,
   the same two phases again. For each: messages published per second, events the receiver got
   per second during the load, the time until every message's event arrived after the load
   stopped, the end-to-end delivery rate (all events / from the first publish to the last
   event), deliveries and events per delivery, repeats (at least once), and how far the
   dispatcher itself was behind (messages whose events were not yet queued) when the load
   stopped and when it had queued them all: whether reading the streams or delivering limits;
3. the dispatcher alone: with the worker stopped, `--seconds` of batch publishes pile up, then a
   Dispatcher in this process reads and queues them: events/s and CPU per event.

With `--deliveries N`, only the cost of one delivery: N deliveries of one event each, one at a
time, by the `webhooks.deliver` job handler in this process to the receiver (by its address,
then by the name localhost), and N POSTs by the delivery client alone: CPU and wall time per
delivery. Run it with another tree first on PYTHONPATH to compare two versions:

    APPLIANCE_CONFIG=config.example.toml .venv/bin/python bench/webhooks.py --deliveries 2000
    PYTHONPATH=/path/to/other/tree APPLIANCE_CONFIG=... .venv/bin/python bench/webhooks.py ...

Prints the ratio of publish rates with and without the endpoint. On a busy machine the rates
follow what CPU each process gets; the CPU per message (api) and per event (worker: reading,
queueing and delivering) do not, and say whether the worker keeps up when it gets a share of
CPU like the api's.

    APPLIANCE_CONFIG=config.example.toml .venv/bin/python bench/webhooks.py --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import msgspec
import redis
from common import BIN, ROOT, BenchApi, cpu_seconds, free_port, listening, load_average, machine
from history import bench_api
from publish import Phase, Result, run_python

import appliance
from appliance.config import load_config
from appliance.resources import open_resources
from appliance.webhooks import client, endpoints
from appliance.webhooks.dispatch import Dispatcher
from appliance.webhooks.events import event
from appliance.webhooks.jobs import deliver
from appliance.webhooks.service import Delivery, new_delivery_id

BODY = {"type": "text", "body": {"text": "hello from bench/webhooks.py", "n": 12345}}
DRAIN_LIMIT = 300.0  # seconds to wait for the last events after a phase


class Received:
    """What the receiver got: deliveries, events, distinct event ids, when the last arrived."""

    def __init__(self) -> None:
        self.deliveries = 0
        self.events = 0
        self.ids: set[str] = set()
        self.last_at = 0.0  # time.time() of the last delivery

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """POST: a delivery, counted; GET: the counts as JSON. HTTP/1.1 with keep-alive."""
        try:
            while request := await reader.readline():
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                if request.startswith(b"GET"):
                    answer = json.dumps(
                        [self.deliveries, self.events, len(self.ids), self.last_at]
                    ).encode()
                else:
                    events = json.loads(body)["events"]
                    self.deliveries += 1
                    self.events += len(events)
                    self.ids.update(e["id"] for e in events)
                    self.last_at = time.time()
                    answer = b"ok"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(answer))
                writer.write(answer)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def receive(port: int) -> None:
    """The receiver process (`--receive PORT`): its own interpreter, so that the load
    generator's event loop does not slow it down."""
    server = await asyncio.start_server(Received().serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


class Receiver:
    """The receiver process, started and asked for its counts from here."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--receive", str(self.port)], cwd=ROOT
        )
        deadline = time.monotonic() + 10
        while not listening(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError("the receiver did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}/hook"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)

    def snapshot(self) -> tuple[int, int, int, float]:
        """Deliveries, events, distinct events, time.time() of the last delivery."""
        answer = httpx.get(f"http://127.0.0.1:{self.port}/stats", timeout=10).json()
        return int(answer[0]), int(answer[1]), int(answer[2]), float(answer[3])


@contextmanager
def stopping(receiver: Receiver) -> Iterator[None]:
    try:
        yield
    finally:
        receiver.stop()


@contextmanager
def programs(names: list[str]) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`appliance run <name>` for each, on the api's config (BenchApi set the environment)."""
    procs = [
        subprocess.Popen(
            [str(BIN / "appliance"), "run", name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )
        for name in names
    ]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(30)


def groups_exist(api: BenchApi) -> bool:
    client = redis.Redis.from_url(api.redis_url)
    try:
        stream = api.keys.ingest(0)
        return client.exists(stream) == 1 and any(
            g["name"] == b"webhooks" for g in client.xinfo_groups(stream)
        )
    finally:
        client.close()


def unread(api: BenchApi) -> int:
    """Entries the dispatcher has not yet queued events for: the webhooks group's lag and
    pending entries, over every shard."""
    client = redis.Redis.from_url(api.redis_url)
    try:
        total = 0
        for shard in range(api.keys.shards):
            for group in client.xinfo_groups(api.keys.ingest(shard)):
                if group["name"] == b"webhooks":
                    total += int(group["lag"] or 0) + int(group["pending"])
        return total
    finally:
        client.close()


async def dispatch_alone(backlog: int) -> None:
    """Read and queue `backlog` messages' events with a Dispatcher in this process, timed."""
    async with open_resources(load_config(), "bench") as res:
        dispatcher = Dispatcher(res)
        started, cpu, done = time.perf_counter(), time.process_time(), 0
        while (got := await dispatcher.step()) > 0:
            done += got
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        await dispatcher.release()
    print(
        f"dispatcher alone: {done} of {backlog} backlogged events queued in {elapsed:.2f} s:"
        f" {done / elapsed:.0f} events/s, {cpu / max(1, done) * 1e6:.0f} us CPU per event"
        f" (in {dispatcher.stats.jobs} jobs)",
        flush=True,
    )


async def deliveries_alone(port: int, n: int) -> None:
    """`n` one-event deliveries by the job handler, one at a time, by address and by name; then
    `n` POSTs by the client alone: CPU and wall time per delivery."""
    print(f"appliance from {os.path.dirname(appliance.__file__)}", flush=True)
    async with open_resources(load_config(), "bench") as res:
        cfg = res.config.webhooks
        for label, host in (("by address", "127.0.0.1"), ("by name", "localhost")):
            url = f"http://{host}:{port}/hook"
            async with res.connection() as conn:
                created = await endpoints.create(
                    conn,
                    endpoints.WebhookCreate(url=url, events=["member.added"]),
                    allow_private=True,
                )
            payloads = [
                msgspec.json.encode(
                    Delivery(
                        created.id,
                        new_delivery_id(),
                        1,
                        [event("member.added", {"principal": "user:bench", "n": i})],
                    )
                )
                for i in range(n + 20)
            ]
            for payload in payloads[:20]:  # warm: imports, pools, the first connection
                await deliver(res, payload)
            started, cpu = time.perf_counter(), time.process_time()
            for payload in payloads[20:]:
                await deliver(res, payload)
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu
            print(
                f"job handler, {label:<10}: {n} deliveries, {cpu / n * 1e3:.2f} ms CPU and"
                f" {wall / n * 1e3:.2f} ms wall per delivery",
                flush=True,
            )
            started, cpu = time.perf_counter(), time.process_time()
            for i in range(n):
                result = await client.post(url, f"d{i}", "whsec_bench", b'{"events":[]}', cfg)
                assert result.ok, result.error
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu
            print(
                f"client alone, {label:<10}: {n} POSTs, {cpu / n * 1e3:.2f} ms CPU and"
                f" {wall / n * 1e3:.2f} ms wall per POST",
                flush=True,
            )


async def register(url: str) -> None:
    async with open_resources(load_config(), "bench") as res, res.connection() as conn:
        await endpoints.create(
            conn,
            endpoints.WebhookCreate(url=url, events=["message.created"]),
            allow_private=True,
        )


def phase(
    api: BenchApi,
    receiver: Receiver | None,
    label: str,
    spec: Phase,
    args: argparse.Namespace,
    worker: int,
) -> Result:
    before = receiver.snapshot() if receiver else (0, 0, 0, 0.0)
    cpu = cpu_seconds([worker])
    api_cpu = cpu_seconds(api.pids())
    result = run_python(api.port, api.admin_key, spec, args.seconds, args.connections, None)
    api_cpu = cpu_seconds(api.pids()) - api_cpu
    published = result.requests * spec.messages
    rate = published / result.seconds
    print(f"{label:<34} published {rate:8.0f} msgs/s ({published} in {result.seconds:.1f} s,"
          f" errors {result.errors}); api CPU {api_cpu / published * 1e6:.0f} us/message",
          flush=True)  # fmt: skip
    if receiver is None:
        return result
    during = receiver.snapshot()[2] - before[2]
    stopped = time.time()
    behind = unread(api)
    deadline = stopped + DRAIN_LIMIT
    queued_after = None
    while receiver.snapshot()[2] - before[2] < published and time.time() < deadline:
        if queued_after is None and unread(api) == 0:
            queued_after = time.time() - stopped
        time.sleep(0.05)
    if queued_after is None:
        queued_after = time.time() - stopped
    after = receiver.snapshot()
    deliveries, events, unique = (b - a for a, b in zip(before[:3], after[:3], strict=True))
    drain = max(0.0, after[3] - stopped)
    total = result.seconds + drain
    worker_cpu = cpu_seconds([worker]) - cpu
    print(
        f"{'':<34} delivered {during / result.seconds:8.0f} events/s during the load;"
        f" all {unique} of {published} after {drain:.2f} s more: {unique / total:.0f} events/s"
        f" end to end; {deliveries} deliveries ({events / max(1, deliveries):.1f} events each),"
        f" {events - unique} repeats; worker CPU {worker_cpu / total:.2f} cores,"
        f" {worker_cpu / max(1, events) * 1e6:.0f} us/event",
        flush=True,
    )
    print(
        f"{'':<34} dispatcher: {behind} messages not yet queued when the load stopped, all"
        f" queued {queued_after:.2f} s later: {published / (result.seconds + queued_after):.0f}"
        " events/s queued",
        flush=True,
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10, help="length of each phase")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--batch", type=int, default=50, help="messages per batch publish")
    parser.add_argument("--batch-max", type=int, default=None, help="[webhooks] batch_max")
    parser.add_argument("--deliveries", type=int, default=0, help="only the cost of a delivery")
    parser.add_argument("--receive", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receive:
        asyncio.run(receive(args.receive))
        return 0
    os.environ.setdefault("APPLIANCE_CONFIG", str(ROOT / "config.example.toml"))
    tag = secrets.token_hex(3)
    print(f"machine: {machine()}; api, worker, flusher, Redis, PostgreSQL, moto, the load")
    print("generator and the receiver on one box", flush=True)
    extra = {"APPLIANCE_WEBHOOKS__ALLOW_PRIVATE": "true"}
    if args.batch_max:
        extra["APPLIANCE_WEBHOOKS__BATCH_MAX"] = str(args.batch_max)
    if args.deliveries:
        with bench_api(tag, extra):
            receiver = Receiver()
            receiver.start()
            with stopping(receiver):
                asyncio.run(deliveries_alone(receiver.port, args.deliveries))
        print(f"load average at the end: {load_average()}")
        return 0
    with bench_api(tag, extra) as api:
        config = load_config()
        print(
            f"[webhooks] batch_max {config.webhooks.batch_max}; [worker] concurrency"
            f" {config.worker.concurrency}; {args.connections} connections, closed loop"
        )
        single = json.dumps(BODY).encode()
        batch = json.dumps({"messages": [BODY] * args.batch}).encode()
        base = [f"/v1/conversations/{c}/messages" for c in api.create_conversations(16)]
        phases = [
            Phase("single publish", base, single, 1),
            Phase(f"batch publish ({args.batch}/req)", [b + "/batch" for b in base],
                  batch, args.batch),
        ]  # fmt: skip
        receiver = Receiver()
        url = receiver.start()
        with programs(["worker", "flusher"]) as procs, stopping(receiver):
            time.sleep(3)  # the programs start
            reference = [phase(api, None, f"reference: {p.name}", p, args, procs[0].pid)
                         for p in phases]  # fmt: skip
            asyncio.run(register(url))
            deadline = time.monotonic() + 30
            while not groups_exist(api):
                if time.monotonic() > deadline:
                    raise RuntimeError("the dispatcher made no consumer group in 30 s")
                time.sleep(0.1)
            hooked = [phase(api, receiver, f"webhooks: {p.name}", p, args, procs[0].pid)
                      for p in phases]  # fmt: skip
        for p, ref, hook in zip(phases, reference, hooked, strict=True):
            print(f"{p.name}: publish rate with the endpoint / without {hook.rate / ref.rate:.2f}")
        # The dispatcher alone (the worker stopped): a backlog read and queued in this process.
        backlog = run_python(
            api.port, api.admin_key, phases[1], args.seconds, args.connections, None
        )
        asyncio.run(dispatch_alone(backlog.requests * phases[1].messages))
    print(f"load average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
