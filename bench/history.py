"""History tier: page latency per tier, flusher records/s, publish throughput beside the flusher.

Starts its own moto S3 server and api (granian, one worker; bench/common.py's BenchApi) against
a database of its own (`appliance_bench_<tag>`, created, migrated, dropped at the end), its own
Redis key prefix and bucket. In one run:

1. Page latency of `GET /v1/conversations/{c}/messages?before=N&limit=50` over HTTP, one request
   at a time, from three sets of `--conversations` conversations of `--messages` messages each
   (bodies 150-400 bytes of JSON text): "history" (published, flushed by `flush_pending`, its
   flush rows moved to yesterday and compacted by `compact_day`), "flush" (published and flushed,
   not compacted) and "tail" (published, never flushed: the Redis tail holds every message).
   `before` is random but keeps the page inside one tier (below the newest `tail_max` seqs for
   the S3 tiers). "cold" is the first read of a block in the api process (one per block, before
   any other read of it), "warm" every later read (the decoded-block cache holds them all).
   Every page is checked: 50 messages, seqs before-1 down to before-50.
2. Flusher records/s: `--backlog` messages over `--backlog-conversations` conversations are
   published with no flusher running, then the real program (`appliance run flusher`) starts and
   drains them; the time from its start (and from its first cut) until the ingest streams are
   empty, and its CPU.
3. Publish throughput (HTTP, single messages, closed loop, bench/publish.py's Python client)
   with the flusher program running against the same rounds with it stopped (SIGSTOP), in
   alternating rounds (it drains the previous round's backlog, SIGCONT, before its own round).
   Ratio with/without (target >= 0.9).

    APPLIANCE_CONFIG=config.example.toml .venv/bin/python bench/history.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import msgspec
import psycopg
from common import (
    BIN,
    ROOT,
    BenchApi,
    CpuMeter,
    cpu_seconds,
    descendants,
    load_average,
    machine,
    percentile,
    redis_pid,
    rss_bytes,
)
from psycopg import conninfo, sql

from appliance.auth.principal import Principal
from appliance.config import Config, load_config
from appliance.messages.publish import MessageIn, Publisher
from appliance.resources import Resources, open_resources
from appliance.segments import compact
from appliance.segments.backlog import backlog
from appliance.segments.flush import flush_pending

PRINCIPAL = Principal(id="key:bench-history", scopes=frozenset({"admin"}))
LIMIT = 50
DB_PREFIX = "appliance_bench_"
_WORDS = (  # noqa: SIM905 - one line of text reads better than a list of 120 strings
    "the of and to in is you that it he was for on are as with his they at be this have from"
    " or one had by word but not what all were we when your can said there use an each which"
    " she do how their if will up other about out many then them these so some her would make"
    " like him into time has look two more write go see number no way could people my than"
    " first water been call who oil its now find long down day did get come made may part"
    " meeting tomorrow deploy review ticket build release customer invoice shipped thanks"
    " please update status blocked merged approved lunch call later okay sure great fixed"
).split()


# ---- shared with bench/cost.py -----------------------------------------------------------------


def bench_env(tag: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """BenchApi overrides for a database and bucket of this run's own (`tag`)."""
    os.environ.setdefault("APPLIANCE_CONFIG", str(ROOT / "config.example.toml"))
    dsn = load_config().postgres.dsn.get_secret_value()
    return {
        "APPLIANCE_POSTGRES__DSN": urlunsplit(urlsplit(dsn)._replace(path=f"/{DB_PREFIX}{tag}")),
        "APPLIANCE_S3__BUCKET": f"bench-{tag}",
        **(extra or {}),
    }


def drop_database(config: Config) -> None:
    dsn = config.postgres.dsn.get_secret_value()
    name = str(conninfo.conninfo_to_dict(dsn).get("dbname") or "")
    if not name.startswith(DB_PREFIX):
        return  # never anything but this bench's own
    with psycopg.connect(dsn, dbname="postgres", autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def text_body(rng: random.Random, low: int = 150, high: int = 400) -> bytes:
    """A JSON object of `low`..`high` bytes with a chat-like text (words, some numbers)."""
    size = rng.randint(low, high)
    words: list[str] = []
    length = 0
    while length < size - 40:
        word = rng.choice(_WORDS) if rng.random() > 0.05 else str(rng.randint(1, 99999))
        words.append(word)
        length += len(word) + 1
    text = " ".join(words)
    return json.dumps({"text": text, "lang": "en"}, separators=(",", ":")).encode()


def messages(rng: random.Random, count: int) -> list[MessageIn]:
    return [MessageIn(type="text", body=msgspec.Raw(text_body(rng))) for _ in range(count)]


def make_publisher(res: Resources) -> Publisher:
    return Publisher(res.redis, res.keys, res.config.messages, res.connection)


async def publish_many(
    publisher: Publisher,
    conversations: Sequence[str],
    per_conversation: int,
    rng: random.Random,
    batch: int = 50,
    parallel: int = 32,
) -> int:
    """`per_conversation` messages to each conversation, in batches, `parallel` at a time."""
    todo = [(c, n) for c in conversations for n in range(0, per_conversation, batch)]
    rng.shuffle(todo)  # interleaved, as many writers would
    sem = asyncio.Semaphore(parallel)
    total = 0

    async def one(conversation: str, done: int) -> None:
        nonlocal total
        count = min(batch, per_conversation - done)
        async with sem:
            out = await publisher.publish(
                conversation, PRINCIPAL, messages(rng, count), None, b"", batch=True
            )
        total += len(out.acks)

    await asyncio.gather(*(one(c, n) for c, n in todo))
    return total


async def backlog_now(res: Resources) -> tuple[int, float]:
    """(entries waiting in the ingest streams, age of the oldest in seconds)."""
    shards = await backlog(res.redis, res.keys)
    return sum(s.entries for s in shards), max((s.oldest_s for s in shards), default=0.0)


class Program:
    """`appliance run <name>` as a child process with this run's environment."""

    def __init__(self, api: BenchApi, name: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = api.run_dir / f"{name}-{secrets.token_hex(2)}.log"
        metrics_dir = api.run_dir / f"metrics-{name}-{secrets.token_hex(2)}"
        metrics_dir.mkdir()
        full = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), **(env or {})}
        self._log = self.log_path.open("wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [str(BIN / "appliance"), "run", name],
            env=full,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    def pids(self) -> list[int]:
        return descendants(self.proc.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def rss(self) -> int:
        return rss_bytes(self.pids())

    def log_lines(self, event: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if event in line:
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc.poll() is None


@contextlib.contextmanager
def bench_api(tag: str, extra: dict[str, str] | None = None) -> Iterator[BenchApi]:
    """BenchApi on this run's own database and bucket; the database is dropped afterwards."""
    api = BenchApi(extra_env=bench_env(tag, extra))
    try:
        with api:
            yield api
    finally:
        with contextlib.suppress(psycopg.Error):
            drop_database(load_config())


@contextlib.asynccontextmanager
async def resources() -> AsyncIterator[Resources]:
    async with open_resources(load_config(), "bench") as res:
        yield res


async def move_to_day(res: Resources, conversations: Sequence[str], day: date) -> int:
    """Give these conversations' flush rows the period `day` (its partition made first), so
    `compact_day(day)` takes them: a bench shortcut for "the day is over"."""
    async with res.connection() as conn:
        await conn.execute("SELECT appliance_ensure_flush_partition(%s)", (day,))
        cur = await conn.execute(
            "UPDATE segment_blocks SET period = %s WHERE tier = 'flush' AND conversation = ANY(%s)",
            (day, list(conversations)),
        )
        await conn.commit()
        return cur.rowcount


async def block_rows(res: Resources, conversations: Sequence[str]) -> list[tuple[str, int, int]]:
    """(conversation, first_seq, last_seq) of every indexed block of these conversations."""
    async with res.connection() as conn:
        cur = await conn.execute(
            "SELECT conversation, first_seq, last_seq FROM segment_blocks"
            " WHERE conversation = ANY(%s) ORDER BY conversation, first_seq",
            (list(conversations),),
        )
        return [(str(c), int(f), int(last)) for c, f, last in await cur.fetchall()]


def create_named(api: BenchApi, names: list[str]) -> list[str]:
    with httpx.Client(base_url=api.url, headers=api.headers(), timeout=10) as client:
        for name in names:
            answer = client.post("/v1/conversations", json={"conversation": name})
            if answer.status_code != 201:
                raise RuntimeError(f"create {name}: {answer.status_code} {answer.text}")
    return names


# ---- 1. page latency per tier ------------------------------------------------------------------


def ms(values: list[float]) -> str:
    if not values:
        return "n=0"
    return (
        f"n={len(values):4d}  p50 {percentile(values, 50) * 1000:6.2f} ms"
        f"  p99 {percentile(values, 99) * 1000:6.2f} ms  max {max(values) * 1000:6.1f} ms"
    )


class Reader:
    def __init__(self, api: BenchApi) -> None:
        self.client = httpx.Client(base_url=api.url, headers=api.headers(), timeout=30)
        self.wrong: list[str] = []

    def page(self, conversation: str, before: int) -> float:
        started = time.perf_counter()
        answer = self.client.get(
            f"/v1/conversations/{conversation}/messages",
            params={"before": before, "limit": LIMIT},
        )
        took = time.perf_counter() - started
        if answer.status_code != 200:
            self.wrong.append(f"{conversation} before={before}: {answer.status_code}")
            return took
        seqs = [m["seq"] for m in answer.json()["messages"]]
        expected = list(range(before - 1, before - 1 - LIMIT, -1))
        if seqs != expected:
            self.wrong.append(
                f"{conversation} before={before}: got {len(seqs)} seqs"
                f" {seqs[:3]}..{seqs[-3:]} expected {expected[0]}..{expected[-1]}"
            )
        return took


def tier_reads(
    reader: Reader,
    blocks: list[tuple[str, int, int]],
    low: int,
    high: int,
    warm: int,
    rng: random.Random,
) -> tuple[list[float], list[float]]:
    """Cold: one read per block, `before` inside it (the page inside the block when it holds
    LIMIT records); then `warm` reads at random `before` in [low, high] of random conversations
    of these blocks."""
    cold: list[float] = []
    order = list(blocks)
    rng.shuffle(order)
    for conversation, first, last in order:
        top = min(last + 1, high)
        bottom = max(first + LIMIT, low)
        if bottom > top:
            bottom = top
        cold.append(reader.page(conversation, rng.randint(bottom, top)))
    names = sorted({b[0] for b in blocks})
    hot = [reader.page(rng.choice(names), rng.randint(low, high)) for _ in range(warm)]
    return cold, hot


async def page_latency(api: BenchApi, args: argparse.Namespace, rng: random.Random) -> None:
    n, count = args.messages, args.conversations
    sets = {
        name: create_named(api, [f"{api.prefix}-{name}-{i}" for i in range(count)])
        for name in ("history", "flush", "tail")
    }
    tail_max = load_config().messages.tail_max
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    async with resources() as res:
        publisher = make_publisher(res)
        t0 = time.perf_counter()
        await publish_many(publisher, sets["history"], n, rng)
        stats = await flush_pending(res)
        moved = await move_to_day(res, sets["history"], yesterday)
        started = time.perf_counter()
        counts = await compact.compact_day(res, yesterday)
        compact_s = time.perf_counter() - started
        print(
            f"history set: {count} x {n} messages flushed in {stats.cuts} cuts"
            f" ({stats.bytes / 1e6:.1f} MB), {moved} flush rows moved to {yesterday},"
            f" compacted in {compact_s:.2f} s: {counts}"
        )
        await publish_many(publisher, sets["flush"], n, rng)
        stats = await flush_pending(res)
        print(f"flush set: {count} x {n} messages flushed in {stats.cuts} cuts")
        await publish_many(publisher, sets["tail"], n, rng)
        print(f"tail set: {count} x {n} messages, never flushed; built in"
              f" {time.perf_counter() - t0:.1f} s")  # fmt: skip
        history_blocks = await block_rows(res, sets["history"])
        flush_blocks = await block_rows(res, sets["flush"])
    tiers_seen = {len(history_blocks), len(flush_blocks)}
    print(f"index: history set {len(history_blocks)} blocks, flush set {len(flush_blocks)} blocks")
    if 0 in tiers_seen:
        raise RuntimeError("a tier is empty: nothing to measure")
    s3_high = n - tail_max + 1  # pages entirely below the tail's newest tail_max
    reader = Reader(api)
    results: dict[str, tuple[list[float], list[float]]] = {}
    # Interleaved per tier, warm-up of the api's code paths on the tail first.
    for _ in range(20):
        reader.page(sets["tail"][0], n)
    results["history (compacted)"] = tier_reads(
        reader, history_blocks, LIMIT + 1, s3_high, args.reads, rng
    )
    results["flush segments"] = tier_reads(
        reader, flush_blocks, LIMIT + 1, s3_high, args.reads, rng
    )
    tail_blocks = [(c, 1, n) for c in sets["tail"]]
    results["tail (Redis)"] = ([], tier_reads(reader, tail_blocks, LIMIT + 1, n + 1, args.reads,
                                              rng)[1])  # fmt: skip
    print(f"-- page latency, GET .../messages?before=N&limit={LIMIT}, one request at a time"
          " (httpx client in this process; the same overhead in every row)")  # fmt: skip
    for name, (cold, warm) in results.items():
        if cold:
            print(f"{name:<22} cold {ms(cold)}")
        print(f"{name:<22} warm {ms(warm)}")
    tail_p50 = percentile(results["tail (Redis)"][1], 50)
    for name in ("history (compacted)", "flush segments"):
        cold, warm = results[name]
        print(
            f"{name}: warm p50 {percentile(warm, 50) / tail_p50:.2f}x the tail's,"
            f" cold p50 {percentile(cold, 50) / tail_p50:.2f}x"
        )
    if reader.wrong:
        print(f"WRONG PAGES: {len(reader.wrong)}, e.g. {reader.wrong[:5]}")
    else:
        print("every page checked: 50 messages, the expected seqs")


# ---- 2. flusher records/s ----------------------------------------------------------------------


async def flusher_rate(api: BenchApi, args: argparse.Namespace, rng: random.Random) -> None:
    names = [f"{api.prefix}-backlog-{i}" for i in range(args.backlog_conversations)]
    per = max(1, args.backlog // len(names))
    async with resources() as res:
        started = time.perf_counter()
        total = await publish_many(make_publisher(res), names, per, rng, batch=50)
        entries, _ = await backlog_now(res)
        print(
            f"-- flusher drain: {total} messages over {len(names)} conversations published in"
            f" {time.perf_counter() - started:.1f} s with no flusher; ingest backlog {entries}"
        )
        flusher = Program(api, "flusher")
        samples: list[tuple[float, int]] = []
        peak_rss = 0
        while True:
            left, _ = await backlog_now(res)
            now = time.monotonic()
            samples.append((now, left))
            peak_rss = max(peak_rss, flusher.rss())
            if left == 0:
                break
            if not flusher.alive() or now - flusher.started > 900:
                raise RuntimeError(f"flusher did not drain: {left} left; {flusher.log_path}")
            await asyncio.sleep(0.05)
        wall = now - flusher.started
        cpu = flusher.cpu()
        cuts = flusher.log_lines('"flush_cut"')
        flusher.stop()
        # The last cut is smaller than max_bytes and waits for max_age (by design): the rate
        # of the full cuts is up to the moment the backlog reached what that last cut took.
        rest = next((v for _, v in reversed(samples) if v > 0), 0)
        plateau = next(t for t, v in samples if v == rest)
        full = entries - rest
        recs = sum(int(c.get("records", 0)) for c in cuts)
        print(
            f"flusher (appliance run flusher): {entries} entries; {full} in {len(cuts) - 1}"
            f" max_bytes cuts within {plateau - flusher.started:.1f} s of its start"
            f" ({full / max(plateau - flusher.started, 1e-3):,.0f} records/s, process start"
            f" included); the last {rest} waited for max_age: all gone {wall:.1f} s after its"
            f" start; {recs} records logged in {len(cuts)} cuts; CPU {cpu:.1f} s"
            f" ({cpu / max(entries, 1) * 1e6:.0f} us/record); peak RSS {peak_rss / 2**20:.0f} MiB"
        )
        sizes = [int(c.get("bytes", 0)) for c in cuts]
        durations = [float(c.get("duration_ms", 0)) for c in cuts]
        if cuts:
            print(
                f"  cuts: median {statistics.median(sizes) / 1e6:.2f} MB compressed,"
                f" median {statistics.median(durations):.0f} ms (PUT + index + ack/trim)"
            )


# ---- 3. publish throughput with and without the flusher ----------------------------------------


def publish_rounds(api: BenchApi, args: argparse.Namespace, rng: random.Random) -> None:
    from publish import Phase, run_python  # bench/publish.py's raw-asyncio client

    conversations = api.create_conversations(64)
    body = json.dumps({"type": "text", "body": json.loads(text_body(rng, 250, 250))},
                      separators=(",", ":")).encode()  # fmt: skip
    phase = Phase("publish", [f"/v1/conversations/{c}/messages" for c in conversations], body, 1)
    meter = CpuMeter(api.pids(), redis_pid(api.redis_url))
    assert api.moto is not None
    moto = descendants(api.moto.pid)
    flusher = Program(api, "flusher")
    time.sleep(3)  # started, leases claimed
    run_python(api.port, api.admin_key, phase, 2, args.connections, None)  # warm-up

    print(f"-- publish throughput (HTTP, single {len(body)} B messages, closed loop,"
          f" {args.connections} connections, Python client), {args.rounds} rounds of"
          f" {args.seconds:g} s, flusher stopped (SIGSTOP) / running, alternating")  # fmt: skip
    rates: dict[str, list[float]] = {"without": [], "with": []}
    for i in range(args.rounds):
        for mode in ("without", "with"):
            if mode == "without":
                flusher.pause()
            else:
                flusher.resume()  # the previous round's backlog is part of what it buffers
            cpu0, moto0 = flusher.cpu(), cpu_seconds(moto)
            meter.start()
            r = run_python(api.port, api.admin_key, phase, args.seconds, args.connections, None)
            meter.stop()
            fl = (flusher.cpu() - cpu0) / r.seconds
            s3 = (cpu_seconds(moto) - moto0) / r.seconds
            rates[mode].append(r.rate)
            print(
                f"#{i + 1} flusher {mode:<7} {r.rate:6.0f} msgs/s p50 {r.p50_ms:5.1f} ms"
                f" p99 {r.p99_ms:6.1f} ms errors {r.errors}; flusher {fl:.2f} cores,"
                f" moto (S3, counted in other processes) {s3:.2f} cores;"
                f" {meter.describe()};"
                f" api CPU {meter.shares['api'] * r.seconds / max(r.requests, 1) * 1e6:.0f} us/msg"
            )
    flusher.stop()
    ratios = [w / o for w, o in zip(rates["with"], rates["without"], strict=True)]
    ratio = statistics.median(ratios)
    print(
        f"publish msgs/s with/without the flusher: {statistics.median(rates['with']):.0f}/"
        f"{statistics.median(rates['without']):.0f}, ratio {ratio:.2f} (rounds:"
        f" {', '.join(f'{x:.2f}' for x in ratios)})  (target >= 0.9:"
        f" {'met' if ratio >= 0.9 else 'MISSED'})"
    )


# ---- main --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=50, help="per tier set")
    parser.add_argument("--messages", type=int, default=1000, help="per conversation")
    parser.add_argument("--reads", type=int, default=500, help="warm reads per tier")
    parser.add_argument("--backlog", type=int, default=200_000)
    parser.add_argument("--backlog-conversations", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5, help="per publish round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--skip", nargs="*", default=[], choices=["pages", "drain", "publish"])
    args = parser.parse_args()
    rng = random.Random(1)  # reproducible bodies and positions
    tag = secrets.token_hex(3)
    print(f"machine: {machine()}; api, flusher, Redis, PostgreSQL, moto and the client on one box")
    with bench_api(tag) as api:
        config = load_config()
        print(
            f"database {urlsplit(config.postgres.dsn.get_secret_value()).path[1:]},"
            f" key prefix {api.prefix}, bucket {config.s3.bucket}; [segments] max_age"
            f" {config.segments.max_age:g} s, max_bytes {config.segments.max_bytes},"
            f" cache_bytes {config.segments.cache_bytes}; [messages] tail_max"
            f" {config.messages.tail_max}"
        )
        if "pages" not in args.skip:
            asyncio.run(page_latency(api, args, rng))
        if "drain" not in args.skip:
            asyncio.run(flusher_rate(api, args, rng))
        if "publish" not in args.skip:
            publish_rounds(api, args, rng)
        print(f"load average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
