"""Jobs (issue 11): no-op throughput and enqueue → start latency, appliance worker against Celery.

The appliance side is the real worker, `appliance run worker` as a child process (SplitDriver,
`[worker]` settings from the config), serving `diagnostics.noop`; the reference is Celery with
RabbitMQ (bench/celery_noop.py), its worker a child process with the same concurrency in one
process (`--pool threads`, as the appliance runs its jobs on one event loop; `--pool prefork`
on request). Both handlers append `"<enqueued> <started>"` to a Redis list in one round trip,
the enqueue time (`time.time()` just before the enqueue) travelling in the payload.

Phases, for each system in turn, `--rounds` times:

- latency: `--latency-jobs` single enqueues paced at `--rate` per second (the appliance's each in
  its own transaction through `appliance.queue.enqueue`), p50/p99 of start - enqueue;
- throughput: the worker is paused (SIGSTOP), `--jobs` jobs are enqueued in batches of `--batch`,
  the worker resumed (SIGCONT): jobs/s from the resume to the last start, a full queue drained.

Celery runs twice: "durable" (persistent messages in a durable queue, publisher confirms, acks
after the task: what pgqueuer gives, durable in PostgreSQL, a job deleted only once it ran) and
"default" (persistent messages, no confirms, acks on receipt: Celery's defaults).

Measuring starts once each appliance worker has outlived its first listener probe (`settle`).
Printed per system: CPU of the worker, its PostgreSQL backends (or RabbitMQ) and Redis while
draining, in cores and in milliseconds per job; `--count-commits` adds transactions per job,
`--profile` a py-spy CPU profile of each worker. `--variant NAME ENV=VALUE...` adds an appliance
worker with other settings (or another tree of the code on PYTHONPATH, e.g. a `git archive` of
an older commit), measured beside the others on a database of its own.

It uses the config's PostgreSQL and Redis (databases of its own, `appliance_bench_jobs_<tag>`,
created, migrated and dropped; a Redis key prefix of its own) and RabbitMQ at `--broker`. Run by
hand (not part of `make bench`: it needs RabbitMQ and the bench extra):

    .venv/bin/pip install -e '.[bench]'
    APPLIANCE_CONFIG=config.example.toml .venv/bin/python bench/jobs.py --rounds 3
    .venv/bin/python bench/jobs.py --profile --variant c20 APPLIANCE_WORKER__CONCURRENCY=20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
import psycopg
import redis
from common import (
    BENCH_DIR,
    BIN,
    ROOT,
    cpu_seconds,
    descendants,
    ensure_database,
    load_average,
    machine,
    machine_busy_seconds,
    percentile,
    py_spy,
    redis_pid,
)
from psycopg import conninfo, sql
from pydantic import SecretStr

from appliance import logs, queue
from appliance.config import load_config
from appliance.diagnostics.jobs import NOOP, NoopTiming, noop_starts
from appliance.redis_keys import Keys
from appliance.resources import Resources, keys_for, open_resources

DB_PREFIX = "appliance_bench_jobs_"
# PostgreSQL 15 backends publish their counters when idle, at the latest after 10 s.
STATS_DELAY = 11.0
BROKER = "amqp://guest:guest@127.0.0.1:5672//"
CELERY_VARIANTS = {
    # name: (task, publisher confirms)
    "celery-durable": ("bench.noop_late", True),
    "celery-default": ("bench.noop", False),
}


class Child:
    """A worker as a child process, its output in a file; paused and resumed with its children."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )

    def events(self, name: str) -> list[dict[str, Any]]:
        """The JSON log lines of the appliance worker whose event is `name`."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if f'"{name}"' in line:
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
        return [e for e in found if e.get("event") == name]

    def settle(self, timeout: float = 120) -> None:
        """Wait until the appliance worker's session has lasted past its first listener health
        probe (pgqueuer sends it every 10 s and gives up after 10 s; the first one can go out
        before LISTEN is in place, and then the worker reconnects ~10 s after starting)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, lost = self.events("worker_ready"), self.events("worker_disconnected")
            if ready and (not lost or lost[-1]["ts"] < ready[-1]["ts"]):
                since = datetime.now(UTC) - datetime.fromisoformat(ready[-1]["ts"])
                if since.total_seconds() > 12:
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"the worker did not settle:\n{self.tail()}")

    def pids(self) -> list[int]:
        return descendants(self.proc.pid)

    def signal_all(self, sig: signal.Signals) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.signal_all(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def rabbitmq_pid() -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "beam.smp":
                    return int(entry.name)
    return None


class Meter:
    """CPU (in cores) of the worker, of its PostgreSQL backends, of RabbitMQ, of Redis and of the
    whole machine between start() and stop()."""

    def __init__(self, parts: dict[str, Callable[[], list[int]]]) -> None:
        self.parts = parts
        self._start: dict[str, float] = {}

    def _sample(self) -> dict[str, float]:
        out = {name: cpu_seconds(pids()) for name, pids in self.parts.items()}
        out["machine"] = machine_busy_seconds()
        out["wall"] = time.monotonic()
        return out

    def start(self) -> None:
        self._start = self._sample()

    def stop(self, jobs: int) -> str:
        """Cores used by each part, and the CPU milliseconds each spent per job."""
        end = self._sample()
        wall = end["wall"] - self._start["wall"]
        used = {k: end[k] - self._start[k] for k in end if k not in ("wall", "machine")}
        cores = ", ".join(f"{k} {v / wall:.2f}" for k, v in used.items())
        per_job = ", ".join(f"{k} {1000 * v / jobs:.2f}" for k, v in used.items())
        busy = (end["machine"] - self._start["machine"]) / wall
        return f"cores: {cores}, whole machine {busy:.2f}; CPU ms per job: {per_job}"


def start_cpu_profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """py-spy on one process: 100 samples/s of the thread holding the GIL (`--gil`), so that the
    shares are of the worker's CPU time in Python, not of its waits."""
    argv = [py_spy() or "py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds))]
    argv += ["--gil", "--format", "raw", "--nolineno", "--rate", "250", "--output", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cpu_profile_summary(raw: Path, top: int = 30) -> str:
    """The frames the CPU samples were in: inclusive share, largest first."""
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        total += int(count_text)
        for frame in set(stack.split(";")):
            inclusive[frame] = inclusive.get(frame, 0) + int(count_text)
    lines = [f"  {total} samples with the GIL held; incl% = share of them with the frame"]
    for frame, count in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * count / max(total, 1):5.1f}  {frame}")
    return "\n".join(lines)


def summary(latencies: list[float]) -> tuple[float, float]:
    return percentile(latencies, 50), percentile(latencies, 99)


def llen(client: redis.Redis, key: str) -> int:
    """LLEN, with -1 when a shared Redis stalls (the caller polls again)."""
    try:
        return int(client.llen(key))
    except redis.RedisError:
        return -1


async def wait_starts(
    client: redis.Redis, key: str, count: int, timeout: float, worker: Child
) -> list[tuple[float, float]]:
    """The (enqueued, started) pairs of a run, once `count` have been recorded."""
    deadline = time.monotonic() + timeout
    while (await asyncio.to_thread(llen, client, key)) < count:
        if time.monotonic() > deadline or worker.proc.poll() is not None:
            raise RuntimeError(
                f"only {client.llen(key)} of {count} jobs ran in {timeout:g}s;"
                f" {worker.proc.args} (exit {worker.proc.poll()}) said:\n{worker.tail()}"
            )
        await asyncio.sleep(0.02)
    entries = await asyncio.to_thread(client.lrange, key, 0, -1)
    client.delete(key)
    pairs = [tuple(float(x) for x in e.split()) for e in entries]
    return [(p[0], p[1]) for p in pairs]


class System:
    """One queue under test: how to enqueue one job or a batch, and the worker to pause."""

    name: str
    worker: Child

    async def enqueue_one(self, run: str) -> None:
        raise NotImplementedError

    async def enqueue_many(self, run: str, count: int) -> None:
        raise NotImplementedError


class Appliance(System):
    def __init__(self, name: str, res: Resources, worker: Child, dsn: str) -> None:
        self.name = name
        self.res = res
        self.worker = worker
        self.dsn = dsn

    @staticmethod
    def payload(run: str) -> bytes:
        return msgspec.json.encode(NoopTiming(run=run, enqueued=time.time()))

    async def enqueue_one(self, run: str) -> None:
        async with self.res.connection() as conn:  # autocommit: its own transaction
            await queue.enqueue(conn, NOOP, self.payload(run))

    async def enqueue_many(self, run: str, count: int) -> None:
        # One INSERT of `count` rows (pgqueuer's batch enqueue) in one transaction.
        async with self.res.connection() as conn, conn.transaction():
            await queue.enqueue_many(conn, NOOP, [self.payload(run) for _ in range(count)])


class CeleryQueue(System):
    def __init__(self, name: str, worker: Child, task: str, confirm: bool) -> None:
        from celery_noop import make_app

        self.name = name
        self.worker = worker
        self.task = task
        self.app = make_app(confirm_publish=confirm)

    def _send(self, run: str, count: int) -> None:
        with self.app.producer_or_acquire() as producer:
            for _ in range(count):
                self.app.send_task(self.task, args=(run, time.time()), producer=producer)

    async def enqueue_one(self, run: str) -> None:
        self._send(run, 1)  # blocking, as the loop has nothing else to do meanwhile

    async def enqueue_many(self, run: str, count: int) -> None:
        self._send(run, count)


async def latency(system: System, client: redis.Redis, keys: Keys, args: Any) -> list[float]:
    run = secrets.token_hex(6)
    start = time.monotonic()
    for i in range(args.latency_jobs):
        delay = start + i / args.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await system.enqueue_one(run)
    pairs = await wait_starts(client, noop_starts(keys, run), args.latency_jobs, 60, system.worker)
    return [(started - enqueued) * 1000 for enqueued, started in pairs]


async def throughput(
    system: System, client: redis.Redis, keys: Keys, meter: Meter, args: Any
) -> tuple[float, float, str]:
    """(jobs/s drained, jobs/s enqueued, CPU while draining)."""
    run = secrets.token_hex(6)
    dsn = system.dsn if isinstance(system, Appliance) else ""
    if args.count_commits and dsn:
        await asyncio.sleep(STATS_DELAY)
        committed = await asyncio.to_thread(commits, dsn)
    system.worker.signal_all(signal.SIGSTOP)
    try:
        began = time.monotonic()
        for done in range(0, args.jobs, args.batch):
            await system.enqueue_many(run, min(args.batch, args.jobs - done))
        enqueue_rate = args.jobs / (time.monotonic() - began)
    finally:
        resumed = time.time()
        meter.start()
        system.worker.signal_all(signal.SIGCONT)
    profiler = None
    if args.profile:
        out = Path(tempfile.gettempdir()) / f"bench-jobs-{system.name}-{run}.txt"
        pid = system.worker.pids()[-1]  # the process that runs the jobs
        profiler = (start_cpu_profile(pid, args.profile_seconds, out), out)
    pairs = await wait_starts(client, noop_starts(keys, run), args.jobs, 600, system.worker)
    shares = meter.stop(args.jobs)
    last = max(started for _, started in pairs)
    if args.count_commits and dsn:
        await asyncio.sleep(STATS_DELAY)
        made = await asyncio.to_thread(commits, dsn) - committed
        batches = -(-args.jobs // args.batch)
        shares += f"; transactions per job {(made - batches) / args.jobs:.2f}"
    if profiler is not None:
        proc, out = profiler
        await asyncio.to_thread(proc.wait)
        print(f"  py-spy of {system.name} while draining ({out}):")
        print(cpu_profile_summary(out))
    return args.jobs / (last - resumed), enqueue_rate, shares


def bench_dsn(dsn: str, tag: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{DB_PREFIX}{tag}"))


def drop_database(dsn: str) -> None:
    name = str(conninfo.conninfo_to_dict(dsn).get("dbname") or "")
    if not name.startswith(DB_PREFIX):
        return  # never anything but this bench's own
    with psycopg.connect(dsn, dbname="postgres", autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def commits(dsn: str) -> int:
    """Transactions committed in the bench's database so far (each autocommit statement is one)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


def backend_pids(dsn: str) -> Callable[[], list[int]]:
    """The PostgreSQL backends of the appliance worker's connections (same machine)."""

    def pids() -> list[int]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'appliance-worker%'"
                " AND datname = current_database()"
            ).fetchall()
        return [int(r[0]) for r in rows]

    return pids


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--latency-jobs", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0, help="latency phase: jobs/s")
    parser.add_argument("--jobs", type=int, default=10000, help="throughput phase: jobs")
    parser.add_argument("--batch", type=int, default=500, help="throughput phase: enqueue batch")
    parser.add_argument(
        "--concurrency", type=int, default=0, help="jobs at once (default: [worker] concurrency)"
    )
    parser.add_argument("--pool", choices=["threads", "prefork"], default="threads")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--systems", default="appliance,celery-durable,celery-default", help="comma-separated"
    )
    parser.add_argument("--broker", default=BROKER)
    parser.add_argument("--log-level", default="", help="both workers' (default: the config's)")
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        metavar=("NAME", "ENV=VALUE"),
        help="one more appliance worker, `appliance-NAME`, with these environment variables"
        " (e.g. --variant async-commit 'PGOPTIONS=-c synchronous_commit=off'); repeatable",
    )
    parser.add_argument(
        "--count-commits",
        action="store_true",
        help="appliance: transactions per job from pg_stat_database (adds 22 s a round)",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy each worker's drain (CPU)")
    parser.add_argument("--profile-seconds", type=float, default=5.0)
    args = parser.parse_args()
    if args.profile and not py_spy():
        parser.error("--profile needs py-spy: .venv/bin/pip install -e '.[bench]'")
    return args


class Setup:
    """This run's database, key prefix, RabbitMQ queue and the two workers (sync, before the
    event loop; `close()` stops and removes them all)."""

    def __init__(self, args: argparse.Namespace) -> None:
        os.environ["APPLIANCE_CONFIG"] = str(
            Path(os.environ.get("APPLIANCE_CONFIG", ROOT / "config.example.toml")).resolve()
        )
        base = load_config()
        self.prefix = prefix = f"bench-jobs-{secrets.token_hex(3)}"
        base_dsn = base.postgres.dsn.get_secret_value()
        self.dsn = bench_dsn(base_dsn, prefix[-6:])
        self.concurrency = args.concurrency or base.worker.concurrency
        self.log_level = args.log_level or base.appliance.log_level
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"appliance-{prefix}-"))
        (self.run_dir / "metrics").mkdir()
        path = os.environ.get("PYTHONPATH")
        env = {
            "APPLIANCE_POSTGRES__DSN": self.dsn,
            "APPLIANCE_REDIS__KEY_PREFIX": prefix,
            "APPLIANCE_APPLIANCE__RUN_DIR": str(self.run_dir),
            "APPLIANCE_APPLIANCE__INSTANCE": prefix,
            "APPLIANCE_APPLIANCE__LOG_LEVEL": self.log_level,
            "APPLIANCE_APPLIANCE__LOG_FORMAT": "json",
            "APPLIANCE_WORKER__CONCURRENCY": str(self.concurrency),
            "PROMETHEUS_MULTIPROC_DIR": str(self.run_dir / "metrics"),
            "BENCH_CELERY_BROKER": args.broker,
            "BENCH_CELERY_QUEUE": prefix,
            "BENCH_CELERY_KEY_PREFIX": prefix,
            "BENCH_CELERY_REDIS": base.redis.url.get_secret_value(),
            "PYTHONPATH": os.pathsep.join(p for p in (str(BENCH_DIR), path) if p),
        }
        os.environ.update(env)  # this process enqueues with the same settings
        self.config = load_config()
        self.workers: dict[str, Child] = {}
        self.dsns: dict[str, str] = {}
        # Each appliance worker has a database (so a queue) of its own: "appliance" and variants.
        self.dsns["appliance"] = self.dsn
        for name, *_ in args.variant or []:
            self.dsns[f"appliance-{name}"] = bench_dsn(base_dsn, f"{prefix[-6:]}_{name}")
        try:
            for dsn in self.dsns.values():
                problem = ensure_database(dsn, base.postgres.connect_timeout)
                if problem:
                    raise RuntimeError(problem)
                subprocess.run(
                    [str(BIN / "appliance"), "migrate"],
                    check=True,
                    capture_output=True,
                    env={**os.environ, "APPLIANCE_POSTGRES__DSN": dsn},
                )
            variants = {f"appliance-{n}": a for n, *a in args.variant or []}
            for name, dsn in self.dsns.items():
                extra = dict(a.split("=", 1) for a in variants.get(name, []))
                self.workers[name] = Child(
                    [str(BIN / "appliance"), "run", "worker"],
                    self.run_dir / f"{name}.log",
                    {"APPLIANCE_POSTGRES__DSN": dsn, **extra},
                )
            self.workers["celery"] = Child(
                [
                    str(BIN / "celery"),
                    *("-A", "celery_noop", "worker", "--pool", args.pool),
                    *("--concurrency", str(self.concurrency)),
                    *("--loglevel", self.log_level.upper()),
                    *("--without-gossip", "--without-mingle", "--hostname", f"{prefix}@%h"),
                ],
                self.run_dir / "celery.log",
            )
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        with contextlib.suppress(Exception):
            from celery_noop import app

            with app.connection_for_write() as conn:
                conn.default_channel.queue_delete(self.prefix)
                conn.default_channel.exchange_delete(self.prefix)
        for dsn in self.dsns.values():
            with contextlib.suppress(psycopg.Error):
                drop_database(dsn)
        print(f"worker logs: {self.run_dir}")


async def measure(setup: Setup, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    config = setup.config
    url = config.redis.url.get_secret_value()
    client = redis.Redis.from_url(url, decode_responses=True)
    redis_process, rabbit = redis_pid(url), rabbitmq_pid()
    celery_worker = setup.workers["celery"]
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    if "appliance" in names:  # its variants right after it
        at = names.index("appliance") + 1
        names[at:at] = [n for n in setup.workers if n.startswith("appliance-")]
    async with contextlib.AsyncExitStack() as stack:
        keys = keys_for(config)
        systems: list[System] = []
        meters: dict[str, Meter] = {}
        redis_part = {"redis": lambda: [redis_process] if redis_process else []}
        for name in names:
            if name.startswith("appliance"):
                worker, dsn = setup.workers[name], setup.dsns[name]
                own = config.model_copy(
                    update={"postgres": config.postgres.model_copy(update={"dsn": SecretStr(dsn)})}
                )
                res = await stack.enter_async_context(open_resources(own, "bench"))
                systems.append(Appliance(name, res, worker, dsn))
                meters[name] = Meter(
                    {
                        "worker": worker.pids,
                        "postgres backends": backend_pids(dsn),
                        **redis_part,
                    }
                )
            else:
                task, confirm = CELERY_VARIANTS[name]
                systems.append(CeleryQueue(name, celery_worker, task, confirm))
                meters[name] = Meter(
                    {
                        "worker": celery_worker.pids,
                        "rabbitmq": lambda: [rabbit] if rabbit else [],
                        **redis_part,
                    }
                )
        for name, worker in setup.workers.items():
            if name.startswith("appliance"):
                await asyncio.to_thread(worker.settle)
        # Warm each (workers up, connections open, code paths run) before anything is timed.
        for system in systems:
            warm = argparse.Namespace(latency_jobs=20, rate=200.0)
            await latency(system, client, keys, warm)
        results: dict[str, dict[str, list[float]]] = {
            s.name: {"p50": [], "p99": [], "tput": []} for s in systems
        }
        for round_no in range(1, args.rounds + 1):
            print(f"round {round_no}, load average {load_average()}")
            for system in systems:
                lat = await latency(system, client, keys, args)
                p50, p99 = summary(lat)
                lost = len(system.worker.events("worker_disconnected"))
                tput, enq, shares = await throughput(
                    system, client, keys, meters[system.name], args
                )
                if len(system.worker.events("worker_disconnected")) > lost:
                    print(f"  ({system.name}'s worker reconnected during this round)")
                results[system.name]["p50"].append(p50)
                results[system.name]["p99"].append(p99)
                results[system.name]["tput"].append(tput)
                print(
                    f"  {system.name:<15} enqueue→start p50 {p50:6.1f} ms  p99 {p99:6.1f} ms"
                    f"  | drain {tput:6.0f} jobs/s (enqueued at {enq:6.0f}/s)"
                    f"  | CPU cores while draining: {shares}"
                )
    client.close()
    return results


def report(results: dict[str, dict[str, list[float]]]) -> None:
    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}
    print("medians over rounds:")
    for name, m in med.items():
        print(
            f"  {name:<15} p50 {m['p50']:6.1f} ms  p99 {m['p99']:6.1f} ms"
            f"  throughput {m['tput']:7.0f} jobs/s"
        )
    celeries = [n for n in med if n.startswith("celery")]
    for name in (n for n in med if n.startswith("appliance")):
        app = med[name]
        for other in celeries:
            m = med[other]
            print(
                f"  {name}/{other}: throughput {app['tput'] / m['tput']:.2f}x,"
                f" p50 {app['p50'] / m['p50']:.2f}x, p99 {app['p99'] / m['p99']:.2f}x"
            )
    if "appliance" in med:
        app = med["appliance"]
        print(
            f"targets (appliance): throughput >= 1.0x Celery's:"
            f" {all(app['tput'] >= med[n]['tput'] for n in celeries)};"
            f" p99 <= 50 ms: {app['p99'] <= 50}"
        )


def main() -> None:
    args = parse()
    logs.configure("cli", "warning", "console", to_stderr=True)
    print(f"machine: {machine()}")
    setup = Setup(args)
    try:
        print(
            f"concurrency {setup.concurrency} (appliance: one process, batch_size"
            f" {max(1, setup.concurrency // 2)}; celery: --pool {args.pool}), log level"
            f" {setup.log_level}; latency: {args.latency_jobs} jobs at {args.rate:g}/s;"
            f" throughput: {args.jobs} jobs enqueued in batches of {args.batch}, then drained"
        )
        report(asyncio.run(measure(setup, args)))
    finally:
        setup.close()


if __name__ == "__main__":
    main()
