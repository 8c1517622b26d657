"""`appliance status` (what runs, how it is doing) and `appliance doctor` (ok/FAIL with hints).

Both check the dependencies first with one-off connections, so a failure shows its cause (refused,
DNS failure, timeout, authentication) instead of a pool's wait; what needs a dependency that failed
is reported as skipped, naming it, and everything else still runs.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

import click
from pgqueuer.domain.settings import db_settings
from psycopg import sql

from appliance import heartbeat, job_attempts, logs
from appliance.checks import CheckResult, dependency_checks, run_check, run_checks, schema_check
from appliance.cli.common import cli_config, mark, run_async
from appliance.config import Config, load_config
from appliance.db.migrate import expected_version, schema_version
from appliance.diagnostics.roundtrip import ping_worker
from appliance.errors import ConfigError
from appliance.redis_keys import client
from appliance.resources import ConnFactory, direct_connection, keys_for, open_resources
from appliance.segments import backlog, index
from appliance.storage import Storage
from appliance.webhooks import endpoints as webhook_endpoints

# The config keys to look at, by dependency: (where it is, who we are); the cause (the start of
# the detail) says what to look for there.
KEYS = {
    "postgres": ("postgres.dsn", "postgres.dsn"),
    "redis": ("redis.url", "redis.url"),
    "s3": ("s3.endpoint_url", "s3.access_key_id and s3.secret_access_key"),
}
CAUSE_HINTS = {
    "connection refused": "nothing listens at the host and port of {where}: is it running there?",
    "DNS failure": "the host name in {where} does not resolve",
    "timeout": "no answer from the host in {where}: a firewall, or the wrong host",
    "authentication failed": "the credentials ({who}) are refused",
    "database does not exist": "create the database named in {where}, or fix its name",
    "TLS failure": "check the TLS settings of {where} and the server's certificate",
}
HINTS = {
    "postgres": "check postgres.dsn and that PostgreSQL accepts connections",
    "redis": "check redis.url and that Redis answers PING",
    "s3": "check the [s3] section; `appliance storage init` creates the bucket",
    "schema": "run `appliance migrate`",
    "heartbeats": "a program is not running: `supervisorctl status` inside the container",
    "jobs": "the worker did not answer: is it running (`appliance status`)?",
}
# What each later part needs, for "skipped" lines.
NEEDS = {
    "programs": ("redis",),
    "schema": ("postgres",),
    "queue": ("postgres",),
    "schedules": ("postgres",),
    "shards": ("postgres", "redis"),
    "jobs": ("postgres", "redis"),
}


def hint(result: CheckResult) -> str:
    """The fix for a failed check: by cause and config key for a dependency, else by check."""
    keys = KEYS.get(result.name)
    if keys is not None:
        for cause, text in CAUSE_HINTS.items():
            if result.detail.startswith(cause):
                return text.format(where=keys[0], who=keys[1])
    return HINTS[result.name]


def skipped(parts: list[str], deps: list[CheckResult]) -> dict[str, str]:
    """Part → why it did not run, for each part whose dependencies did not all answer."""
    failed = {d.name for d in deps if not d.ok}
    out = {}
    for part in parts:
        missing = [n for n in NEEDS[part] if n in failed]
        if missing:
            out[part] = f"needs {' and '.join(missing)}, which failed"
    return out


async def _dependencies(config: Config, name: str) -> tuple[list[CheckResult], ConnFactory]:
    """The dependency checks over one-off connections: no pool retries hide the cause."""
    connection = direct_connection(config, name)
    redis = client(config.redis, name)
    try:
        checks = dependency_checks(config, connection, redis, Storage.create(config.s3))
        return await run_checks(checks, config.api.check_timeout), connection
    finally:
        await redis.aclose()


async def _status(config: Config) -> dict[str, Any]:
    deps, connection = await _dependencies(config, "status")
    out: dict[str, Any] = {
        "dependencies": [d.as_dict() for d in deps],
        "expected_schema": expected_version(),
        "skipped": skipped(["programs", "schema", "queue", "schedules", "shards"], deps),
    }
    now = time.time()
    waiting: list[backlog.ShardBacklog] = []
    if "programs" not in out["skipped"]:
        redis = client(config.redis, "status")
        try:
            beats = await heartbeat.read_all(redis, keys_for(config))
            waiting = await backlog.backlog(redis, keys_for(config))
        finally:
            await redis.aclose()
        out["programs"] = [
            {
                "program": b.program,
                "instance": b.instance,
                "pid": b.pid,
                "heartbeat_age_s": round(b.age, 1),
                "uptime_s": round(now - b.started),
            }
            for b in beats
        ]
    if "schema" in out["skipped"]:
        return out
    queue = sql.Identifier(db_settings().queue_table)
    async with connection() as conn:
        out["schema"] = await schema_version(conn)
        cur = await conn.execute(
            sql.SQL(
                "SELECT entrypoint, status::text, count(*) FROM {} GROUP BY 1, 2 ORDER BY 1, 2"
            ).format(queue)
        )
        out["queue"] = [
            {"entrypoint": e, "status": s, "jobs": n} for e, s, n in await cur.fetchall()
        ]
        out["jobs_failed"] = await job_attempts.parked_count(conn)  # `appliance jobs failed`
        out["webhooks"] = await webhook_endpoints.summary(conn)  # `appliance webhooks list`
        # Each schedule's last run (the scheduler's or `appliance retention run`'s), its age,
        # and how long ago the schedule last succeeded.
        cur = await conn.execute(
            """SELECT DISTINCT ON (r.name) r.name, r.tick, r.status, r.counts, r.started_at,
                      r.finished_at, r.source, r.error,
                      extract(epoch FROM now() - r.started_at)::float8,
                      (SELECT extract(epoch FROM now() - max(o.finished_at))::float8
                         FROM schedule_runs o WHERE o.name = r.name AND o.status = 'ok')
                 FROM schedule_runs r ORDER BY r.name, r.tick DESC"""
        )
        out["schedules"] = [
            {
                "schedule": name,
                "tick": tick.isoformat(),
                "status": status,
                "source": source,
                "counts": counts,
                "error": error,
                "age_s": round(age, 1),
                "last_ok_age_s": None if ok_age is None else round(ok_age, 1),
                "duration_s": round((finished - started).total_seconds(), 3) if finished else None,
            }
            for name, tick, status, counts, started, finished, source, error, age, ok_age in (
                await cur.fetchall()
            )
        ]
        if "shards" not in out["skipped"]:
            out["shards"] = _shards(await index.shard_states(conn), waiting)
            cur = await conn.execute(
                "SELECT tier, count(*) FROM segment_blocks GROUP BY tier ORDER BY tier"
            )
            out["index_rows"] = {tier: n for tier, n in await cur.fetchall()}
    return out


def _shards(
    states: list[index.ShardState], waiting: list[backlog.ShardBacklog]
) -> list[dict[str, Any]]:
    """Each shard's owner and lease, with its backlog (entries, age of the oldest: the lag)."""
    by_shard = {w.shard: w for w in waiting}
    now = datetime.now(UTC)
    rows = []
    for s in states:
        w = by_shard.get(s.shard, backlog.ShardBacklog(s.shard, 0, 0.0))
        rows.append(
            {
                "shard": s.shard,
                "owner": s.owner,
                "lease_left_s": round((s.lease_until - now).total_seconds(), 1)
                if s.lease_until
                else None,
                "backlog": w.entries,
                "lag_s": w.oldest_s,
                "last_flush_s_ago": round((now - s.flushed_at).total_seconds(), 1)
                if s.flushed_at
                else None,
                "cuts": s.cuts,
            }
        )
    return rows


def _print_status(data: dict[str, Any]) -> None:
    click.echo("dependencies:")
    for d in data["dependencies"]:
        click.echo(
            f"  {d['name']:<10} {mark(d['ok']):<4} {d['latency_ms']:>8.1f} ms  {d['detail']}"
        )
    skip = data["skipped"]
    if "schema" in skip:
        click.echo(f"schema: (skipped: {skip['schema']})")
    else:
        click.echo(f"schema: version {data['schema']} (expected {data['expected_schema']})")
    _section(
        "programs",
        [
            f"{p['program']:<10} {p['instance']:<20} pid {p['pid']:<7} "
            f"heartbeat {p['heartbeat_age_s']}s ago, up {p['uptime_s']}s"
            for p in data.get("programs", [])
        ],
        "skipped: " + skip["programs"] if "programs" in skip else "no heartbeats",
    )
    _section(
        "queue",
        [f"{q['entrypoint']:<24} {q['status']:<10} {q['jobs']}" for q in data.get("queue", [])],
        "skipped: " + skip["queue"] if "queue" in skip else "empty",
    )
    if "jobs_failed" in data:
        click.echo(f"failed jobs (parked): {data['jobs_failed']}  (`appliance jobs failed`)")
    if "webhooks" in data:
        w = data["webhooks"]
        click.echo(
            f"webhooks: {w['enabled']} enabled ({w['failing']} failing), disabled: "
            f"{w['disabled_failures']} after failures, {w['disabled_admin']} by an admin"
            "  (`appliance webhooks list`)"
        )
    _section(
        "schedules (last run)",
        [_schedule_line(s) for s in data.get("schedules", [])],
        "skipped: " + skip["schedules"] if "schedules" in skip else "none yet",
    )
    _section(
        "shards (owner, backlog, lag = age of the oldest unflushed message)",
        [
            f"s{r['shard']:<4} {r['owner'] or '(no owner)':<28} backlog {r['backlog']:<7} "
            f"lag {r['lag_s']}s  last flush "
            + (f"{r['last_flush_s_ago']}s ago" if r["last_flush_s_ago"] is not None else "never")
            for r in data.get("shards", [])
        ],
        "skipped: " + skip["shards"] if "shards" in skip else "none (no flusher has started)",
    )
    if "index_rows" in data:
        rows = data["index_rows"]
        flush, history = rows.get("flush", 0), rows.get("history", 0)
        click.echo(f"segment index: {flush} flush rows, {history} history rows")


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _schedule_line(s: dict[str, Any]) -> str:
    """One schedule's last run: status, when (and who ran it), duration, counts or error,
    and when it last succeeded."""
    took = f"{s['duration_s']}s" if s["duration_s"] is not None else "still running"
    who = " (cli)" if s["source"] == "cli" else ""
    what = f"error: {s['error']}" if s["error"] else json.dumps(s["counts"])
    return (
        f"{s['schedule']:<24} {s['status']:<7} {_ago(s['age_s'])}{who}, {took}  {what}"
        f"  (last ok {_ago(s['last_ok_age_s'])})"
    )


def _section(title: str, rows: list[str], empty: str) -> None:
    click.echo(f"{title}:")
    for row in rows or [f"({empty})"]:
        click.echo(f"  {row}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(as_json: bool) -> None:
    """Programs and heartbeats, schema version, dependency latency, queue, last schedule runs."""
    config = cli_config()
    data = run_async(_status(config))
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        _print_status(data)
    if not all(d["ok"] for d in data["dependencies"]):
        sys.exit(1)


async def _doctor(config: Config, job_timeout: float) -> tuple[list[CheckResult], dict[str, str]]:
    results, connection = await _dependencies(config, "doctor")
    skip = skipped(["schema", "jobs"], results)
    timeout = config.api.check_timeout
    if "schema" not in skip:
        results.append(await run_check("schema", schema_check(connection), timeout))
    if "jobs" in skip or not results[-1].ok:
        skip.setdefault("jobs", "needs the schema, which failed")
        return results, skip
    async with open_resources(config, "doctor") as res:

        async def jobs() -> str:
            answer = await ping_worker(res, job_timeout)
            return f"diagnostics.ping answered by pid {answer['pid']} in {answer['latency_ms']} ms"

        results.append(await run_check("jobs", jobs, job_timeout + 1))
    return results, skip


@click.command()
@click.option(
    "--job-timeout",
    type=float,
    default=15.0,
    show_default=True,
    help="Seconds to wait for the worker to answer the ping job.",
)
def doctor(job_timeout: float) -> None:
    """Config, dependencies, schema and a worker round trip; each line ok or FAIL with a hint."""
    try:
        config = load_config()
    except ConfigError as exc:
        click.echo(
            f"{'config':<10} {mark(False)}  {len(exc.problems)} problem(s): "
            "run `appliance config check`"
        )
        sys.exit(2)
    click.echo(f"{'config':<10} {mark(True)}")
    logs.configure("cli", config.appliance.log_level, config.appliance.log_format, to_stderr=True)
    results, skip = run_async(_doctor(config, job_timeout))
    for r in results:
        line = f"{r.name:<10} {mark(r.ok)}  {r.latency_ms:.1f} ms  {r.detail}"
        if not r.ok:
            line += f"\n{'':<12}hint: {hint(r)}"
        click.echo(line)
    for name, why in skip.items():
        click.echo(f"{name:<10} {'SKIP':<4}  {why}")
    if skip or not all(r.ok for r in results):
        sys.exit(1)
