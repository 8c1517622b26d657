"""Cost of the history tier per day at the design load: S3 PUTs, index rows, bytes, Redis, CPU.

The design load is `--users` (1,000) at `--per-minute` (10) messages a minute each across
`--conversations` (1,000): 166.7 messages/s, 14.4 M a day. A real day is too slow to run, so it
is replayed in accelerated time: messages are published (the real publish script, through
`Publisher`, single messages with 150-400 byte JSON text bodies, to a uniformly random
conversation) at `--speedup` x the rate (x `--load`), and the real flusher program (`appliance
run flusher`) runs with `[segments] max_age` divided by the same factor, so each cut holds what
a real `max_age` cut holds (max_bytes is a byte count, not scaled). `--sim-minutes` simulated
minutes are measured; per-day figures are the measured counts x 1,440 / sim-minutes
("extrapolated xN"). Before the measured window every conversation's tail is filled to
`tail_max` (batches, flushed), so Redis is at its steady state; the flusher's idle CPU is
measured first for `--idle-seconds` and added per real second (the accelerated run has fewer
real seconds than a day: its lease renewals and report loop would be undercounted). Then the
configuration's flush rows are moved to a past day and compacted by the real `compact_day`
(S3 operations counted on its Storage); the day's history object and parts are extrapolated
from the measured compressed bytes per message.

Each `--configs` entry (`max_age:tail_max`, seconds and messages; default the shipped
thresholds and one alternative of each) is run in turn on its own conversations. Then the
design load runs in real time for `--realtime-seconds` (single publishes, default thresholds)
to check the flusher CPU the accelerated run extrapolates (at a real 167 msgs/s each of its
reads returns fewer entries, so its CPU per message is higher). Then `--live`
runs the appliance at `--live-load` x the design load (default 10x) for `--live-seconds` real
seconds through the HTTP api (granian, one worker, batches of `--live-batch` messages a
request) with the real flusher (default thresholds), worker and scheduler programs, and reports
whether the ingest backlog stays bounded, the oldest unflushed age, and the total RSS.

    APPLIANCE_CONFIG=config.example.toml .venv/bin/python bench/cost.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import resource
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from common import BenchApi, load_average, machine, percentile, read_response
from history import (
    PRINCIPAL,
    Program,
    backlog_now,
    bench_api,
    make_publisher,
    messages,
    move_to_day,
    publish_many,
    resources,
    text_body,
)

from appliance.config import load_config
from appliance.messages.publish import MessageIn
from appliance.resources import Resources
from appliance.segments import compact, store

DAY_MINUTES = 1440
MIB = 2**20


@dataclass
class Sample:
    at: float
    backlog: int
    oldest: float
    ingest_bytes: int
    tail_bytes: int
    used_memory: int


@dataclass
class Outcome:
    name: str
    figures: dict[str, Any] = field(default_factory=dict)


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def memory_usage(res: Resources, keys: list[str]) -> int:
    """Sum of MEMORY USAGE (every element counted: SAMPLES 0) of these keys."""
    total = 0
    for start in range(0, len(keys), 500):
        pipe = res.redis.pipeline(transaction=False)
        for key in keys[start : start + 500]:
            pipe.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0")
        total += sum(int(v or 0) for v in await pipe.execute())
    return total


async def used_memory(res: Resources) -> int:
    return int((await res.redis.info("memory"))["used_memory"])


def count_storage(res: Resources) -> dict[str, int]:
    """Count the S3 calls made through `res.storage` from now on (by method name)."""
    counts: dict[str, int] = {}
    storage = res.storage
    for name in ("put", "get", "start_upload", "upload_part", "complete_upload", "delete_many"):
        original: Callable[..., Awaitable[Any]] = getattr(storage, name)

        def counted(*a: Any, _n: str = name, _f: Any = original, **k: Any) -> Awaitable[Any]:
            counts[_n] = counts.get(_n, 0) + 1
            result: Awaitable[Any] = _f(*a, **k)
            return result

        setattr(storage, name, counted)
    return counts


async def flush_objects(res: Resources, like: str) -> tuple[int, int]:
    """(distinct flush objects, flush rows) of conversations named `like%`."""
    async with res.connection() as conn:
        cur = await conn.execute(
            "SELECT count(DISTINCT object_key), count(*) FROM segment_blocks"
            " WHERE tier = 'flush' AND conversation LIKE %s",
            (like + "%",),
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def paced_publish(
    res: Resources, names: list[str], rate: float, seconds: float, rng: random.Random
) -> tuple[int, float, list[float]]:
    """Single-message publishes at `rate`/s (open loop) for `seconds`: (published, seconds,
    latencies)."""
    publisher = make_publisher(res)
    bodies = [messages(rng, 1) for _ in range(2000)]
    latencies: list[float] = []
    done = 0
    pending: set[asyncio.Task[None]] = set()

    async def one(body: list[MessageIn]) -> None:
        nonlocal done
        started = time.perf_counter()
        await publisher.publish(rng.choice(names), PRINCIPAL, body, None, b"", batch=False)
        latencies.append(time.perf_counter() - started)
        done += 1

    start = time.perf_counter()
    sent = 0
    while (now := time.perf_counter()) - start < seconds:
        due = int((now - start) * rate) - sent
        for _ in range(due):
            task = asyncio.create_task(one(bodies[sent % len(bodies)]))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
        await asyncio.sleep(0.005)
    if pending:
        await asyncio.gather(*pending)
    return done, time.perf_counter() - start, latencies


async def sampler(
    res: Resources, names: list[str], out: list[Sample], stop: asyncio.Event, every: float
) -> None:
    keys = res.keys
    ingest = [keys.ingest(s) for s in range(keys.shards)]
    tails = [keys.tail(c) for c in names] + [keys.seq(c) for c in names]
    tail_bytes = await memory_usage(res, tails)
    last_tails = time.monotonic()
    while not stop.is_set():
        entries, oldest = await backlog_now(res)
        if time.monotonic() - last_tails > 5:
            tail_bytes = await memory_usage(res, tails)
            last_tails = time.monotonic()
        out.append(
            Sample(
                time.monotonic(),
                entries,
                oldest,
                await memory_usage(res, ingest),
                tail_bytes,
                await used_memory(res),
            )
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


async def wait_drained(res: Resources, limit: float) -> float:
    started = time.monotonic()
    while (await backlog_now(res))[0] > 0:
        if time.monotonic() - started > limit:
            raise RuntimeError(f"backlog not drained within {limit:.0f} s")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def idempotency_bytes(res: Resources, rng: random.Random, count: int = 2000) -> float:
    """Bytes of Redis memory per remembered Idempotency-Key (a UUID-like key, one message)."""
    publisher = make_publisher(res)
    conversation = f"{res.keys.prefix}-idem-conversation-0001"
    before = await used_memory(res)
    keys = []
    for i in range(count):
        idem = f"{rng.getrandbits(128):032x}-{i}"
        body = messages(rng, 1)
        raw = json.dumps({"type": "text", "body": json.loads(bytes(body[0].body))}).encode()
        await publisher.publish(conversation, PRINCIPAL, body, idem, raw, batch=False)
        keys.append(res.keys.idempotency(conversation, PRINCIPAL.id, idem))
    per_key = await memory_usage(res, keys) / count
    after = await used_memory(res)
    await res.redis.unlink(*keys)
    print(
        f"idempotency: {count} keys, MEMORY USAGE {per_key:.0f} B/key (used_memory grew"
        f" {(after - before) / count:.0f} B per publish, tail and ingest entries included)"
    )
    return per_key


async def one_config(
    api: BenchApi,
    args: argparse.Namespace,
    index: int,
    max_age: float,
    tail_max: int,
    rng: random.Random,
) -> Outcome:
    name = f"max_age {max_age:g} s, tail_max {tail_max}"
    outcome = Outcome(name)
    f = outcome.figures
    speed = args.speedup
    design = args.users * args.per_minute / 60 * args.load
    rate = design * speed
    wall = args.sim_minutes * 60 / speed
    tag = f"{api.prefix}-k{index}-"
    names = [f"{tag}{i:04d}" for i in range(args.conversations)]
    env = {
        "APPLIANCE_SEGMENTS__MAX_AGE": f"{max_age / speed:g}",
        "APPLIANCE_SEGMENTS__MAX_BYTES": str(args.max_bytes),
        "APPLIANCE_MESSAGES__TAIL_MAX": str(tail_max),
    }
    print(
        f"-- {name}: {design:.1f} msgs/s simulated, published at {rate:.0f} msgs/s for"
        f" {wall:.0f} s = {args.sim_minutes:g} simulated minutes; flusher max_age"
        f" {max_age / speed:g} s real (x{speed:g})",
        flush=True,
    )
    async with resources() as res:
        flusher = Program(api, "flusher", env)
        await asyncio.sleep(3)
        cpu0 = flusher.cpu()
        await asyncio.sleep(args.idle_seconds)
        idle_cores = (flusher.cpu() - cpu0) / args.idle_seconds
        # Steady state first: every tail holds tail_max (batches), flushed and trimmed.
        started = time.monotonic()
        await publish_many(make_publisher(res), names, tail_max, rng, batch=50)
        await wait_drained(res, 600)
        print(f"   tails filled to {tail_max} and flushed in {time.monotonic() - started:.0f} s")
        objects0, rows0 = await flush_objects(res, tag)
        cpu0 = flusher.cpu()
        mem_before = await used_memory(res)
        samples: list[Sample] = []
        stop = asyncio.Event()
        watch = asyncio.create_task(sampler(res, names, samples, stop, 0.5))
        done, took, latencies = await paced_publish(res, names, rate, wall, rng)
        drain = await wait_drained(res, max_age / speed * 3 + 30)
        stop.set()
        await watch
        cpu = flusher.cpu() - cpu0
        rss = flusher.rss()
        flusher.stop()
        objects, rows = await flush_objects(res, tag)
        cuts, cut_rows = objects - objects0, rows - rows0
        sizes: list[int] = []
        for conversation in names[:4]:
            got: Any = await res.redis.xrevrange(res.keys.tail(conversation), count=50)
            sizes += [len(fields[b"m"]) for _, fields in got]
        raw_msg = statistics.mean(sizes)
        flush_sizes = {k: s for k, s in await res.storage.list_keys(store.FLUSH_PREFIX)}
        async with res.connection() as conn:
            cur = await conn.execute(
                "SELECT DISTINCT object_key FROM segment_blocks WHERE tier = 'flush'"
                " AND conversation LIKE %s",
                (tag + "%",),
            )
            mine = [str(r[0]) for r in await cur.fetchall()]
        flush_bytes = sum(flush_sizes.get(k, 0) for k in mine)
        # Compaction of what this configuration flushed (tail fill included), as a past day.
        day = datetime.now(UTC).date() - timedelta(days=2 + index)
        await move_to_day(res, names, day)
        ops = count_storage(res)
        c0, t0 = cpu_self(), time.perf_counter()
        counts = await compact.compact_day(res, day)
        compact_s, compact_cpu = time.perf_counter() - t0, cpu_self() - c0
        async with res.connection() as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM segment_blocks WHERE tier = 'history' AND period = %s",
                (day,),
            )
            row = await cur.fetchone()
        history_rows = int(row[0]) if row else 0
        # Clean up this configuration's Redis keys (the next measures its own memory).
        for start in range(0, len(names), 500):
            part = names[start : start + 500]
            await res.redis.unlink(*[res.keys.tail(c) for c in part])
            await res.redis.unlink(*[res.keys.seq(c) for c in part])

    x = DAY_MINUTES / args.sim_minutes
    steady = [s for s in samples if s.at > samples[0].at + 2] or samples
    records_day = design * 86400
    hist_per_msg = counts["bytes"] / max(counts["records"], 1)
    day_bytes = records_day * hist_per_msg
    parts = math.ceil(day_bytes / store.PART_BYTES)
    per_conv_raw = records_day / args.conversations * (raw_msg + 20)
    blocks_per_conv = math.ceil(per_conv_raw / compact.MAX_HISTORY_BLOCK_RAW)
    grace = load_config().schedules.compact_segments.grace_minutes
    f.update(
        published=done,
        achieved_rate=done / took,
        target_rate=rate,
        publish_p99_ms=percentile(latencies, 99) * 1000,
        drain_s=drain,
        cuts=cuts,
        cut_rows=cut_rows,
        flush_puts_day=cuts * x,
        x=x,
        compaction_ops=dict(ops),
        compaction_counts=counts,
        compaction_s=compact_s,
        compaction_cpu=compact_cpu,
        compaction_puts_day=parts + 2,
        parts_day=parts,
        history_rows_sample=history_rows,
        history_rows_day=args.conversations * blocks_per_conv,
        flush_rows_day=cut_rows * x,
        flush_rows_peak=cut_rows * x * (DAY_MINUTES + grace + 60) / DAY_MINUTES,
        raw_msg=raw_msg,
        flush_per_msg=flush_bytes / max(counts["records"], 1),
        hist_per_msg=hist_per_msg,
        day_bytes=day_bytes,
        ingest_peak=max(s.ingest_bytes for s in steady),
        backlog_peak=max(s.backlog for s in steady),
        oldest_peak=max(s.oldest for s in steady),
        tails=statistics.median(s.tail_bytes for s in steady),
        redis_peak=max(s.ingest_bytes + s.tail_bytes for s in steady),
        used_memory_delta=max(s.used_memory for s in steady) - mem_before,
        flusher_cpu_day=cpu * x + idle_cores * 86400,
        flusher_cpu_measured=cpu,
        idle_cores=idle_cores,
        flusher_rss=rss,
    )
    puts_day = f["flush_puts_day"] + f["compaction_puts_day"]
    print(
        f"   published {done} in {took:.1f} s ({done / took:.0f}/s of {rate:.0f}; publish p99"
        f" {f['publish_p99_ms']:.1f} ms); backlog drained {drain:.1f} s after the last publish"
    )
    print(
        f"   S3 PUTs per day: {puts_day:,.0f} (target <= 3,000:"
        f" {'met' if puts_day <= 3000 else 'MISSED'}) = flush {f['flush_puts_day']:,.0f}"
        f" (measured {cuts} cuts in {args.sim_minutes:g} simulated minutes, extrapolated"
        f" x{x:g}) + compaction {parts + 2} (CreateMultipartUpload + {parts} parts of"
        f" {store.PART_BYTES / MIB:.0f} MiB + Complete for a {day_bytes / 1e9:.2f} GB day:"
        f" {hist_per_msg:.1f} B/message measured x {records_day / 1e6:.2f} M messages)"
    )
    print(
        f"   compaction of the sample ({counts['records']} records, {counts['bytes'] / 1e6:.1f}"
        f" MB): {compact_s:.1f} s, {compact_cpu:.1f} CPU s, S3 calls {dict(ops)}"
    )
    print(
        f"   index rows retained per day: {f['history_rows_day']:,} (target <= 3,400:"
        f" {'met' if f['history_rows_day'] <= 3400 else 'MISSED'}; {blocks_per_conv} block(s)"
        f" per conversation: {per_conv_raw / 1e6:.1f} MB raw a day each, split past"
        f" {compact.MAX_HISTORY_BLOCK_RAW / MIB:.0f} MiB; the sample compacted to"
        f" {history_rows} rows); flush rows: {cut_rows / max(cuts, 1):.0f} per cut,"
        f" {f['flush_rows_day']:,.0f} a day (extrapolated x{x:g}), transient peak"
        f" ~{f['flush_rows_peak']:,.0f} at worst (a day plus the compaction's grace and up to"
        " an hour until its cron runs)"
    )
    print(
        f"   bytes per message: raw {raw_msg:.0f} (message JSON as stored, sampled), flush"
        f" segments {f['flush_per_msg']:.1f} ({raw_msg / max(f['flush_per_msg'], 1e-9):.1f}x),"
        f" history object {hist_per_msg:.1f} ({raw_msg / max(hist_per_msg, 1e-9):.1f}x)"
    )
    print(
        f"   Redis (MEMORY USAGE of this run's keys, measured at steady state): peak"
        f" {f['redis_peak'] / MIB:.1f} MiB = tails+counters {f['tails'] / MIB:.1f} MiB + ingest"
        f" peak {f['ingest_peak'] / MIB:.1f} MiB ({f['backlog_peak']} entries, oldest"
        f" {f['oldest_peak']:.1f} s real); used_memory grew {f['used_memory_delta'] / MIB:.1f}"
        " MiB (the server is shared: noisy)"
    )
    print(
        f"   flusher CPU per simulated day: {f['flusher_cpu_day']:,.0f} s"
        f" ({f['flusher_cpu_day'] / 864:.2f} % of one core) = {cpu:.1f} s measured x{x:g}"
        f" + idle {idle_cores * 100:.2f} % of a core x 86,400 s; RSS {rss / MIB:.0f} MiB",
        flush=True,
    )
    return outcome


async def realtime_check(api: BenchApi, args: argparse.Namespace, rng: random.Random) -> None:
    """The flusher's CPU at the design load in real time (default thresholds), to check the
    accelerated extrapolation: at a real 167 msgs/s its reads return fewer entries each."""
    design = args.users * args.per_minute / 60 * args.load
    names = [f"{api.prefix}-rt-{i:04d}" for i in range(args.conversations)]
    async with resources() as res:
        flusher = Program(api, "flusher")
        await asyncio.sleep(3)
        cpu0 = flusher.cpu()
        done, took, _ = await paced_publish(res, names, design, args.realtime_seconds, rng)
        cores = (flusher.cpu() - cpu0) / took
        await wait_drained(res, 120)
        flusher.stop()
        for start in range(0, len(names), 500):
            part = names[start : start + 500]
            await res.redis.unlink(*[res.keys.tail(c) for c in part])
            await res.redis.unlink(*[res.keys.seq(c) for c in part])
    print(
        f"-- real-time check: {done} single publishes at {done / took:.1f} msgs/s for"
        f" {took:.0f} s real, default thresholds: flusher {cores * 100:.2f} % of one core ="
        f" {cores * 86400:,.0f} CPU s a day (measured in real time, x{86400 / took:.0f})",
        flush=True,
    )


# ---- live: N x the design load through the HTTP api --------------------------------------------


async def http_load(
    api: BenchApi,
    names: list[str],
    msgs_rate: float,
    batch: int,
    seconds: float,
    connections: int,
    rng: random.Random,
) -> tuple[int, int, float, list[float], int]:
    """Paced batch publishes over raw HTTP/1.1 keep-alive: (messages acknowledged, errors,
    seconds, latencies, times the schedule found no free connection)."""
    requests = []
    for i in range(1000):
        body = json.dumps(
            {
                "messages": [
                    {"type": "text", "body": json.loads(text_body(rng))} for _ in range(batch)
                ]
            },
            separators=(",", ":"),
        ).encode()
        path = f"/v1/conversations/{names[i % len(names)]}/messages/batch"
        requests.append(
            (
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {api.admin_key}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )
    rng.shuffle(requests)
    rate = msgs_rate / batch
    slots: asyncio.Queue[float] = asyncio.Queue()
    latencies: list[float] = []
    acked = errors = behind = 0
    started = time.perf_counter()
    end = started + seconds

    async def pacer() -> None:
        nonlocal behind
        at = started
        while at < end:
            at += 1 / rate
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            if slots.qsize() > connections:
                behind += 1
            slots.put_nowait(at)

    async def connection(i: int) -> None:
        nonlocal acked, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
        turn = i
        while True:
            try:
                await asyncio.wait_for(slots.get(), max(0.01, end - time.perf_counter()))
            except TimeoutError:
                break
            turn += connections
            sent = time.perf_counter()
            writer.write(requests[turn % len(requests)])
            status = await read_response(reader)
            latencies.append(time.perf_counter() - sent)
            if status.startswith(b"HTTP/1.1 2"):
                acked += batch
            else:
                errors += 1
        writer.close()

    tasks = [asyncio.create_task(connection(i)) for i in range(connections)]
    tasks.append(asyncio.create_task(pacer()))
    await asyncio.gather(*tasks)
    return acked, errors, time.perf_counter() - started, latencies, behind


async def live(api: BenchApi, args: argparse.Namespace, rng: random.Random) -> None:
    design = args.users * args.per_minute / 60
    rate = design * args.live_load
    names = [f"{api.prefix}-live-{i:04d}" for i in range(args.conversations)]
    with __import__("httpx").Client(base_url=api.url, headers=api.headers(), timeout=10) as c:
        for name in names:
            answer = c.post("/v1/conversations", json={"conversation": name})
            if answer.status_code != 201:
                raise RuntimeError(f"create {name}: {answer.status_code}")
    programs = [Program(api, "flusher")]
    if not args.live_flusher_only:
        programs += [Program(api, "worker"), Program(api, "scheduler")]
    await asyncio.sleep(3)
    dead = [p.name for p in programs if not p.alive()]
    if dead:
        raise RuntimeError(f"{dead} exited: see {[str(p.log_path) for p in programs]}")
    cpu0 = {p.name: p.cpu() for p in programs}
    api_cpu0 = sum_cpu(api.pids())
    print(
        f"-- live: {args.live_load:g}x the design load = {rate:.0f} msgs/s for"
        f" {args.live_seconds:g} s real, HTTP batches of {args.live_batch}"
        f" ({rate / args.live_batch:.0f} req/s, {args.connections} connections, Python client)"
        f" to {len(names)} conversations;"
        f" programs: api (1 granian worker), {', '.join(p.name for p in programs)};"
        " default thresholds",
        flush=True,
    )
    samples: list[tuple[float, int, float, int]] = []
    stop = asyncio.Event()

    async def watch() -> None:
        async with resources() as res:
            while not stop.is_set():
                entries, oldest = await backlog_now(res)
                rss = sum(p.rss() for p in programs) + sum_rss(api.pids())
                samples.append((time.monotonic(), entries, oldest, rss))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 2)

    watcher = asyncio.create_task(watch())
    acked, errors, took, latencies, behind = await http_load(
        api, names, rate, args.live_batch, args.live_seconds, args.connections, rng
    )
    async with resources() as res:
        left, oldest_end = await backlog_now(res)
        drain = await wait_drained(res, 180)
    stop.set()
    await watcher
    cpu = {p.name: (p.cpu() - cpu0[p.name]) / took for p in programs}
    api_cores = (sum_cpu(api.pids()) - api_cpu0) / took
    for p in programs:
        p.stop()
    load_end = samples[0][0] + took
    steady = [s for s in samples if samples[0][0] + 70 < s[0] <= load_end] or samples
    print(
        f"   acknowledged {acked} messages in {took:.0f} s = {acked / took:.0f} msgs/s of"
        f" {rate:.0f} target; errors {errors}; schedule short of a free connection {behind}x;"
        f" request p50 {percentile(latencies, 50) * 1000:.1f} ms p99"
        f" {percentile(latencies, 99) * 1000:.1f} ms"
    )
    print(
        f"   ingest backlog from 70 s to the end of the load: max"
        f" {max(s[1] for s in steady)} entries,"
        f" median {statistics.median(s[1] for s in steady):.0f}; oldest unflushed age max"
        f" {max(s[2] for s in steady):.1f} s (max_age 60 s); at the end {left} entries,"
        f" oldest {oldest_end:.1f} s, drained {drain:.1f} s later"
    )
    start = samples[0][0]
    shown = [s for i, s in enumerate(samples) if i % 5 == 0]
    print(
        "   timeline (s: backlog entries / oldest unflushed s): "
        + ", ".join(f"{s[0] - start:.0f}: {s[1]}/{s[2]:.0f}" for s in shown)
    )
    print(
        f"   total RSS (api + {', '.join(p.name for p in programs)}): max"
        f" {max(s[3] for s in samples) / MIB:.0f} MiB; CPU (cores): api {api_cores:.2f}, "
        + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items()),
        flush=True,
    )


def sum_cpu(pids: list[int]) -> float:
    from common import cpu_seconds

    return cpu_seconds(pids)


def sum_rss(pids: list[int]) -> int:
    from common import rss_bytes

    return rss_bytes(pids)


# ---- main --------------------------------------------------------------------------------------


def parse_configs(text: str) -> list[tuple[float, int]]:
    out = []
    for item in text.split(","):
        age, _, tail = item.partition(":")
        out.append((float(age), int(tail)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--per-minute", type=float, default=10)
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--load", type=float, default=1.0, help="x the design load (simulated)")
    parser.add_argument("--speedup", type=float, default=10, help="simulated seconds per second")
    parser.add_argument("--sim-minutes", type=float, default=30)
    parser.add_argument("--idle-seconds", type=float, default=10)
    parser.add_argument("--max-bytes", type=int, default=8 * MIB)
    parser.add_argument(
        "--configs",
        default="60:200,120:200,30:200,60:500",
        help="max_age:tail_max pairs (seconds, messages) run in turn; empty: none",
    )
    parser.add_argument(
        "--realtime-seconds", type=float, default=120, help="design load in real time (0: skip)"
    )
    parser.add_argument("--live", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--live-load", type=float, default=10)
    parser.add_argument("--live-seconds", type=float, default=180)
    parser.add_argument("--live-batch", type=int, default=5)
    parser.add_argument("--live-flusher-only", action="store_true")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    rng = random.Random(2)  # reproducible bodies and choices
    tag = secrets.token_hex(3)
    print(f"machine: {machine()}; api, programs, Redis, PostgreSQL, moto and the load on one box")
    outcomes: list[Outcome] = []
    with bench_api(tag) as api:
        print(f"key prefix {api.prefix}, database appliance_bench_{tag}, bucket bench-{tag}")

        async def accelerated() -> None:
            if not args.configs:
                return
            async with resources() as res:
                idem = await idempotency_bytes(res, rng)
            for i, (age, tail) in enumerate(parse_configs(args.configs)):
                outcomes.append(await one_config(api, args, i, age, tail, rng))
            design = args.users * args.per_minute / 60 * args.load
            window = load_config().messages.idempotency_window
            print(f"-- summary per simulated day (design load x{args.load:g})")
            for o in outcomes:
                f = o.figures
                puts = f["flush_puts_day"] + f["compaction_puts_day"]
                idem_total = f["redis_peak"] + idem * design * window
                print(
                    f"{o.name}: PUTs {puts:,.0f}; history rows {f['history_rows_day']:,};"
                    f" flush rows peak ~{f['flush_rows_peak']:,.0f}; bytes/msg raw"
                    f" {f['raw_msg']:.0f} -> history {f['hist_per_msg']:.1f}"
                    f" ({f['raw_msg'] / f['hist_per_msg']:.1f}x); Redis peak"
                    f" {f['redis_peak'] / MIB:.1f} MiB (target <= 256:"
                    f" {'met' if f['redis_peak'] <= 256 * MIB else 'MISSED'}), in all with an"
                    f" Idempotency-Key on every publish {idem_total / MIB:,.0f} MiB"
                    f" ({idem:.0f} B x {design * window / 1e6:.1f} M keys in {window:g} s:"
                    " extrapolated); flusher CPU"
                    f" {f['flusher_cpu_day']:,.0f} s/day ({f['flusher_cpu_day'] / 864:.2f} %)"
                )

        asyncio.run(accelerated())
        if args.realtime_seconds:
            asyncio.run(realtime_check(api, args, rng))
        if args.live:
            asyncio.run(live(api, args, rng))
        print(f"load average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
