"""Prune pgqueuer's log table (pgqueuer never does) past `[schedules.prune_job_log] keep_days`,
and the scheduler's own `schedule_runs` past SCHEDULE_RUNS_KEEP_DAYS (one row per tick would
grow for ever too). Of `schedule_runs` each schedule keeps its newest row and its newest
successful one whatever their age (`appliance status` and the last-success gauge read them),
and a row still `running` is reconciliation's, never pruned."""

from __future__ import annotations

from pgqueuer.domain.settings import db_settings
from psycopg import sql

from appliance import metrics
from appliance.resources import Resources
from appliance.schedules.entry import Run

BATCH = 5000
SCHEDULE_RUNS_KEEP_DAYS = 30

# The schedule_runs rows past SCHEDULE_RUNS_KEEP_DAYS that may go (see the module docstring).
_OLD_RUNS = """FROM schedule_runs r
 WHERE r.status <> 'running' AND r.started_at < now() - make_interval(days => %(days)s)
   AND r.tick < (SELECT max(n.tick) FROM schedule_runs n WHERE n.name = r.name)
   AND NOT (r.status = 'ok' AND r.finished_at = (
         SELECT max(o.finished_at) FROM schedule_runs o
          WHERE o.name = r.name AND o.status = 'ok'))"""


def _delete_batch() -> sql.Composed:
    # Delete in bounded batches (by primary key) so a large backlog never holds one long lock.
    table = sql.Identifier(db_settings().queue_table_log)
    return sql.SQL(
        "DELETE FROM {table} WHERE id IN ("
        " SELECT id FROM {table} WHERE created < now() - make_interval(days => %s)"
        " ORDER BY id LIMIT %s)"
    ).format(table=table)


def _count() -> sql.Composed:
    table = sql.Identifier(db_settings().queue_table_log)
    return sql.SQL(
        "SELECT count(*) FROM {table} WHERE created < now() - make_interval(days => %s)"
    ).format(table=table)


async def _schedule_runs(res: Resources, dry_run: bool) -> int:
    """The old `schedule_runs` rows deleted (counted on a dry run); a few hundred a day at most,
    so one statement."""
    params = {"days": SCHEDULE_RUNS_KEEP_DAYS}
    async with res.connection() as conn:
        if dry_run:
            cur = await conn.execute(f"SELECT count(*) {_OLD_RUNS}", params)
            row = await cur.fetchone()
            return int(row[0]) if row else 0
        cur = await conn.execute(f"DELETE {_OLD_RUNS}", params)
    metrics.RETENTION_DELETED.labels("schedule_runs").inc(cur.rowcount)
    return cur.rowcount


async def run(res: Resources, run: Run) -> dict[str, int]:
    keep_days = res.config.schedules.prune_job_log.keep_days
    if run.dry_run:
        async with res.connection() as conn:
            cur = await conn.execute(_count(), (keep_days,))
            row = await cur.fetchone()
        return {
            "deleted": int(row[0]) if row else 0,
            "schedule_runs_deleted": await _schedule_runs(res, True),
        }
    deleted = 0
    query = _delete_batch()
    while True:
        async with res.connection() as conn:
            cur = await conn.execute(query, (keep_days, BATCH))
        deleted += cur.rowcount
        if cur.rowcount < BATCH:
            break
    metrics.RETENTION_DELETED.labels("job_log").inc(deleted)
    return {"deleted": deleted, "schedule_runs_deleted": await _schedule_runs(res, False)}
