"""Shared plumbing of the HTTP and WebSocket benchmarks (bench/publish.py, bench/fanout.py).

`BenchApi` starts the api as `appliance run api` would (granian with the flags built from the
TOML by `appliance.programs.api.granian_argv`), with overrides that make it a benchmark target:
the api role only, one worker, a free port on 127.0.0.1, rate limits out of the way, a Redis key
prefix of its own (deleted afterwards), a run directory of its own and a moto S3 server of its own.
The factory can be swapped for `noop_app:create` (the product app plus a no-op route).

    python bench/common.py ensure-database   # create the config's database if missing (Makefile)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from appliance import logs
from appliance.config import load_config
from appliance.programs.api import granian_argv, granian_env
from appliance.redis_keys import Keys

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from devrun import ensure_database  # noqa: E402 - `make run`'s helper, one copy

BIN = Path(sys.executable).parent
BENCH_DIR = Path(__file__).resolve().parent
PRODUCT_FACTORY = "appliance.api.app:create_app"
NOOP_FACTORY = "noop_app:create"
BARE_FACTORY = "noop_app:bare"
ADMIN_JSON = ("--scope", "admin", "--json")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """One Content-Length framed HTTP/1.1 response off `reader`: its status line."""
    status = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of unsorted values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def descendants(pid: int) -> list[int]:
    """pid and every process below it (granian's main process and its worker processes)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return total / CLK_TCK


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
    return total


def machine_busy_seconds() -> float:
    """CPU-seconds the machine spent busy since boot (/proc/stat, less idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user..steal, less idle and iowait
    return busy / CLK_TCK


def children_cpu() -> float:
    """CPU of this process's waited-for children (wrk runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """Where the machine's CPU went between start() and stop(): the api, the load generator
    (this process and its waited-for children), redis-server, and everything else on the box
    (other people's work on a shared machine shows up there)."""

    def __init__(self, api_pids: list[int], redis_pid: int | None) -> None:
        self.api_pids = api_pids
        self.redis_pid = redis_pid
        self._start: tuple[float, ...] = ()
        self.shares: dict[str, float] = {}

    def _sample(self) -> tuple[float, ...]:
        redis_cpu = cpu_seconds([self.redis_pid]) if self.redis_pid else 0.0
        return (
            time.monotonic(),
            machine_busy_seconds(),
            cpu_seconds(self.api_pids),
            self_cpu() + children_cpu(),
            redis_cpu,
        )

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        end = self._sample()
        wall, busy, api, load, red = (b - a for a, b in zip(self._start, end, strict=True))
        self.shares = {
            "api": api / wall,
            "generator": load / wall,
            "redis": red / wall,
            "other": max(0.0, busy - api - load - red) / wall,
            "idle": max(0.0, (os.cpu_count() or 1) - busy / wall),
        }
        return self.shares

    def describe(self) -> str:
        s = self.shares
        return (
            f"CPU (cores): api {s['api']:.2f}, load generator {s['generator']:.2f},"
            f" redis {s['redis']:.2f}, other processes {s['other']:.2f}, idle {s['idle']:.2f}"
        )


def thread_cpu(pids: list[int]) -> dict[tuple[int, int, str], float]:
    """CPU-seconds per thread: {(pid, tid, name): seconds}."""
    out: dict[tuple[int, int, str], float] = {}
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat.rsplit(")", 1)[1].split()
            out[(pid, int(task.name), name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def redis_pid(url: str) -> int | None:
    """redis-server's pid when it runs on this machine (for its CPU), else None."""
    client = redis.Redis.from_url(url)
    try:
        pid = int(client.info("server")["process_id"])
    finally:
        client.close()
    return pid if Path(f"/proc/{pid}").exists() else None


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[0]


class BenchApi:
    """moto + the api under granian, with their own key prefix and run directory.

    Use as a context manager; `url`, `admin_key`, `pids()`, `worker_pids()` while it runs.
    """

    def __init__(self, factory: str = PRODUCT_FACTORY, extra_env: dict[str, str] | None = None):
        self.factory = factory
        self.tag = secrets.token_hex(3)
        self.prefix = f"bench-{self.tag}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"appliance-{self.prefix}-"))
        self.log_path = self.run_dir / "api.log"
        self.extra_env = extra_env or {}
        self.moto: subprocess.Popen[bytes] | None = None
        self.api: subprocess.Popen[bytes] | None = None
        self.admin_key = ""
        self.key_id = ""
        self.env: dict[str, str] = {}
        self.redis_url = ""
        self.keys = Keys(self.prefix, 1)
        self._log_file: Any = None

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> BenchApi:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> None:
        moto_port = free_port()
        self.moto = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(moto_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.environ.setdefault("APPLIANCE_CONFIG", str(ROOT / "config.example.toml"))
        overrides = {
            "APPLIANCE_APPLIANCE__ROLES": "api",
            "APPLIANCE_APPLIANCE__RUN_DIR": str(self.run_dir),
            "APPLIANCE_APPLIANCE__INSTANCE": self.prefix,
            "APPLIANCE_API__BIND": "127.0.0.1",
            "APPLIANCE_API__PORT": str(self.port),
            "APPLIANCE_API__WORKERS": "1",
            "APPLIANCE_REDIS__KEY_PREFIX": self.prefix,
            "APPLIANCE_S3__ENDPOINT_URL": f"http://127.0.0.1:{moto_port}",
            "APPLIANCE_MESSAGES__RATE_PER_SECOND": "1000000",
            "APPLIANCE_MESSAGES__RATE_BURST": "10000000",
            **self.extra_env,
        }
        os.environ.update(overrides)
        config = load_config()
        self.keys = Keys(config.redis.key_prefix, config.segments.shards)
        self.redis_url = config.redis.url.get_secret_value()
        problem = ensure_database(
            config.postgres.dsn.get_secret_value(), config.postgres.connect_timeout
        )
        if problem:
            raise RuntimeError(problem)
        subprocess.run([str(BIN / "appliance"), "migrate"], check=True, capture_output=True)
        deadline = time.monotonic() + 30
        while not listening(moto_port):
            if time.monotonic() > deadline or self.moto.poll() is not None:
                raise RuntimeError("moto S3 server did not start")
            time.sleep(0.1)
        subprocess.run([str(BIN / "appliance"), "storage", "init"], check=True, capture_output=True)
        created = subprocess.run(
            [str(BIN / "appliance"), "keys", "create", "--name", self.prefix, *ADMIN_JSON],
            check=True,
            capture_output=True,
            text=True,
        )
        issued = json.loads(created.stdout)
        self.admin_key, self.key_id = issued["key"], issued["id"]

        # What `appliance run api` does (exec_api), with the factory swapped.
        metrics_dir = self.run_dir / "metrics"
        metrics_dir.mkdir()
        log_config = self.run_dir / "granian-logging.json"
        log_config.write_text(
            json.dumps(
                logs.stdlib_config("api", config.appliance.log_level, config.appliance.log_format)
            )
        )
        argv = granian_argv(config, log_config)
        argv[argv.index(PRODUCT_FACTORY)] = self.factory
        env = granian_env(dict(os.environ))
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(BENCH_DIR), env.get("PYTHONPATH", "")) if p
        )
        self._log_file = self.log_path.open("wb")
        self.api = subprocess.Popen(
            argv, env=env, stdout=self._log_file, stderr=subprocess.STDOUT, cwd=ROOT
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        last = ""
        while time.monotonic() < deadline:
            assert self.api is not None
            if self.api.poll() is not None:
                raise RuntimeError(f"api exited {self.api.returncode}:\n{self.log_tail()}")
            try:
                answer = httpx.get(f"{self.url}/readyz", timeout=5)
                if answer.status_code == 200 and len(self.worker_pids()) >= 1:
                    return
                last = answer.text
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise RuntimeError(f"api not ready: {last}\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.key_id:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    [str(BIN / "appliance"), "keys", "revoke", self.key_id],
                    capture_output=True,
                    timeout=30,
                )
        for proc in (self.api, self.moto):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._log_file is not None:
            self._log_file.close()
        if self.redis_url:
            self.clear_redis()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def clear_redis(self) -> int:
        """Delete every key under this run's prefix (tail and ingest streams grow: no flusher)."""
        client = redis.Redis.from_url(self.redis_url)
        deleted = 0
        try:
            batch: list[bytes] = []
            for key in client.scan_iter(match=f"{self.prefix}:*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    deleted += client.unlink(*batch)
                    batch = []
            if batch:
                deleted += client.unlink(*batch)
        finally:
            client.close()
        return deleted

    # -- what the benchmarks read ------------------------------------------------------------
    def pids(self) -> list[int]:
        assert self.api is not None
        return descendants(self.api.pid)

    def worker_pids(self) -> list[int]:
        return self.pids()[1:]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    def create_conversations(self, count: int) -> list[str]:
        names = [f"{self.prefix}-c{i}" for i in range(count)]
        with httpx.Client(base_url=self.url, headers=self.headers(), timeout=10) as client:
            for name in names:
                answer = client.post("/v1/conversations", json={"conversation": name})
                if answer.status_code != 201:
                    raise RuntimeError(f"create {name}: {answer.status_code} {answer.text}")
        return names

    def heads(self, conversations: list[str]) -> int:
        """The sum of the conversations' newest seqs: all published so far, in flight included."""
        client = redis.Redis.from_url(self.redis_url)
        try:
            values = client.mget([self.keys.seq(c) for c in conversations])
        finally:
            client.close()
        return sum(int(v) for v in values if v is not None)

    def delete_conversations(self, names: list[str]) -> None:
        with httpx.Client(base_url=self.url, headers=self.headers(), timeout=10) as client:
            for name in names:
                client.delete(f"/v1/conversations/{name}")


def add_load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--profile", action="store_true", help="py-spy the worker afterwards")


def parse_load_options(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, str]:
    """Parsed arguments and the load generator to use ("wrk" when installed, for "auto")."""
    args = parser.parse_args()
    if args.profile and not py_spy():
        parser.error("--profile needs py-spy: .venv/bin/pip install py-spy")
    generator: str = args.generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"
    return args, generator


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(BIN / "py-spy")
    return found if Path(found).exists() else None


RAW = ("--gil", "--format", "raw", "--nolineno", "--output")


def start_profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """py-spy on one process for `seconds`: 100 samples/s of the thread holding the GIL (so
    blocked threads and idle waits do not count), collapsed stacks without line numbers."""
    return subprocess.Popen(
        [
            py_spy() or "py-spy",
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            *RAW,
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def profile_summary(raw: Path, seconds: float, top: int = 15) -> str:
    """Top functions of a py-spy raw profile: self share (leaf) and inclusive share of samples."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    native = own.pop("", 0)
    inclusive.pop("", None)
    python = total - native
    if not python:
        return "  (no samples)"
    lines = [
        f"  {total} samples with the GIL held (of {int(seconds * 100)} taken: the GIL was busy"
        f" {total / (seconds * 100):.0%} of the time); {native} with no Python frame (granian's"
        f" Rust threads); shares below are of the {python} in Python code. self% = on top of the"
        " stack (native calls such as granian's send/receive count on their caller, the event"
        " loop's own work on the frame that runs it), incl% = anywhere in the stack"
    ]
    lines.append("  self%  incl%  function")
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        share, incl = 100 * count / python, 100 * inclusive[frame] / python
        lines.append(f"  {share:5.1f}  {incl:5.1f}  {frame}")
    lines.append("  largest subtrees (incl%, below the frames every request goes through):")
    shown = 0
    for frame, count in sorted(inclusive.items(), key=lambda kv: -kv[1]):
        if count >= 0.9 * python:
            continue
        lines.append(f"         {100 * count / python:5.1f}  {frame}")
        shown += 1
        if shown >= top + 10:
            break
    return "\n".join(lines)


def machine() -> str:
    cpus = os.cpu_count()
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{cpus} CPUs ({model}), load average {load_average()} at start"


if __name__ == "__main__":
    if sys.argv[1:] == ["ensure-database"]:
        postgres = load_config().postgres
        problem = ensure_database(postgres.dsn.get_secret_value(), postgres.connect_timeout)
        if problem:
            sys.exit(problem)
    else:
        sys.exit(f"usage: {sys.argv[0]} ensure-database")
