"""Prune pgqueuer's log table (pgqueuer never does) past `[schedules.prune_job_log] keep_days`."""

from __future__ import annotations

from pgqueuer.domain.settings import db_settings
from psycopg import sql

from appliance import metrics
from appliance.resources import Resources
from appliance.schedules.entry import Run

BATCH = 5000


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


async def run(res: Resources, run: Run) -> dict[str, int]:
    keep_days = res.config.schedules.prune_job_log.keep_days
    if run.dry_run:
        async with res.connection() as conn:
            cur = await conn.execute(_count(), (keep_days,))
            row = await cur.fetchone()
        return {"deleted": int(row[0]) if row else 0}
    deleted = 0
    query = _delete_batch()
    while True:
        async with res.connection() as conn:
            cur = await conn.execute(query, (keep_days, BATCH))
        deleted += cur.rowcount
        if cur.rowcount < BATCH:
            break
    metrics.RETENTION_DELETED.labels("job_log").inc(deleted)
    return {"deleted": deleted}
