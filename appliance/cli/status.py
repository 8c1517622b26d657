"""`appliance status` (what runs, how it is doing) and `appliance doctor` (ok/FAIL with hints)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click
from pgqueuer.domain.settings import db_settings
from psycopg import sql

from appliance import heartbeat, logs
from appliance.checks import CheckResult, dependency_checks, run_check, run_checks, schema_check
from appliance.cli.common import cli_config, mark, run_async
from appliance.config import Config, load_config
from appliance.db.migrate import expected_version, schema_version
from appliance.diagnostics.roundtrip import ping_worker
from appliance.errors import ConfigError
from appliance.resources import Resources, open_resources

HINTS = {
    "postgres": "check postgres.dsn and that PostgreSQL accepts connections",
    "redis": "check redis.url and that Redis answers PING",
    "s3": "check the [s3] section; `appliance storage init` creates the bucket",
    "schema": "run `appliance migrate`",
    "heartbeats": "a program is not running: `supervisorctl status` inside the container",
    "jobs": "the worker did not answer: is it running (`appliance status`)?",
}


async def _gather(res: Resources) -> dict[str, Any]:
    checks = dependency_checks(res.config, res.connection, res.redis, res.storage)
    deps = await run_checks(checks, res.config.api.check_timeout)
    out: dict[str, Any] = {
        "dependencies": [d.as_dict() for d in deps],
        "expected_schema": expected_version(),
    }
    if not all(d.ok for d in deps):
        return out
    now = time.time()
    out["programs"] = [
        {
            "program": b.program,
            "instance": b.instance,
            "pid": b.pid,
            "heartbeat_age_s": round(b.age, 1),
            "uptime_s": round(now - b.started),
        }
        for b in await heartbeat.read_all(res.redis, res.keys)
    ]
    queue = sql.Identifier(db_settings().queue_table)
    async with res.connection() as conn:
        out["schema"] = await schema_version(conn)
        cur = await conn.execute(
            sql.SQL(
                "SELECT entrypoint, status::text, count(*) FROM {} GROUP BY 1, 2 ORDER BY 1, 2"
            ).format(queue)
        )
        out["queue"] = [
            {"entrypoint": e, "status": s, "jobs": n} for e, s, n in await cur.fetchall()
        ]
        cur = await conn.execute(
            "SELECT DISTINCT ON (name) name, tick, status, counts, started_at, finished_at"
            " FROM schedule_runs ORDER BY name, tick DESC"
        )
        out["schedules"] = [
            {
                "schedule": name,
                "tick": tick.isoformat(),
                "status": status,
                "counts": counts,
                "duration_s": round((finished - started).total_seconds(), 3) if finished else None,
            }
            for name, tick, status, counts, started, finished in await cur.fetchall()
        ]
    return out


async def _status(config: Config) -> dict[str, Any]:
    async with open_resources(config, "status") as res:
        return await _gather(res)


def _print_status(data: dict[str, Any]) -> None:
    click.echo("dependencies:")
    for d in data["dependencies"]:
        click.echo(
            f"  {d['name']:<10} {mark(d['ok']):<4} {d['latency_ms']:>8.1f} ms  {d['detail']}"
        )
    if "schema" not in data:
        click.echo("(programs, queue and schedules show once every dependency answers)")
        return
    click.echo(f"schema: version {data['schema']} (expected {data['expected_schema']})")
    _section(
        "programs",
        [
            f"{p['program']:<10} {p['instance']:<20} pid {p['pid']:<7} "
            f"heartbeat {p['heartbeat_age_s']}s ago, up {p['uptime_s']}s"
            for p in data.get("programs", [])
        ],
        "no heartbeats",
    )
    _section(
        "queue",
        [f"{q['entrypoint']:<24} {q['status']:<10} {q['jobs']}" for q in data.get("queue", [])],
        "empty",
    )
    _section(
        "schedules (last run)",
        [
            f"{s['schedule']:<16} {s['tick']} {s['status']} {s['duration_s']}s "
            f"{json.dumps(s['counts'])}"
            for s in data.get("schedules", [])
        ],
        "none yet",
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


async def _doctor(config: Config, job_timeout: float) -> list[CheckResult]:
    async with open_resources(config, "doctor") as res:
        timeout = config.api.check_timeout
        checks = dependency_checks(config, res.connection, res.redis, res.storage)
        results = await run_checks(checks, timeout)
        if not all(r.ok for r in results):
            return results
        results.append(await run_check("schema", schema_check(res.connection), timeout))

        async def jobs() -> str:
            answer = await ping_worker(res, job_timeout)
            return f"diagnostics.ping answered by pid {answer['pid']} in {answer['latency_ms']} ms"

        results.append(await run_check("jobs", jobs, job_timeout + 1))
        return results


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
    failed = False
    for r in run_async(_doctor(config, job_timeout)):
        line = f"{r.name:<10} {mark(r.ok)}  {r.latency_ms:.1f} ms  {r.detail}"
        if not r.ok:
            failed = True
            line += f"\n{'':<12}hint: {HINTS[r.name]}"
        click.echo(line)
    if failed:
        sys.exit(1)
