"""`expire_exports`: exports requested more than `[schedules.expire_exports] keep_days` ago lose
their object (batch deletes) and turn `expired`; the rows stay, so `GET /v1/exports/{id}` says
what became of them.

Objects are deleted before their rows change: a run stopped between the two leaves rows that the
next run picks up again (deleting an object already gone counts as done). A run still in
progress that old has its multipart upload aborted; if it finishes later, its last update finds
the row expired and changes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from appliance import metrics
from appliance.exports.service import object_key
from appliance.multipart import abort
from appliance.resources import Resources

if TYPE_CHECKING:  # appliance.schedules imports this module to register it
    from appliance.schedules.entry import Run

BATCH = 1000  # rows a round: one batch delete of their objects

_PAST = """
SELECT id, state, upload_id FROM exports
 WHERE state <> 'expired' AND created_at < now() - make_interval(days => %s)
 ORDER BY created_at, id LIMIT %s
"""
_COUNT = """
SELECT count(*), count(*) FILTER (WHERE state = 'ready') FROM exports
 WHERE state <> 'expired' AND created_at < now() - make_interval(days => %s)
"""
_EXPIRE = """
UPDATE exports SET state = 'expired', expired_at = now(), upload_id = NULL
 WHERE id = ANY(%s) AND state <> 'expired'
"""


async def run(res: Resources, run: Run) -> dict[str, int]:
    keep_days = res.config.schedules.expire_exports.keep_days
    async with res.connection() as conn:
        cur = await conn.execute(_COUNT, (keep_days,))
        row = await cur.fetchone()
    total, objects = (int(row[0]), int(row[1])) if row else (0, 0)
    if run.dry_run:
        return {"exports": total, "objects": objects}
    expired = deleted = 0
    run.progress(0, total)
    while True:
        async with res.connection() as conn:
            cur = await conn.execute(_PAST, (keep_days, BATCH))
            rows = await cur.fetchall()
        if not rows:
            break
        for export_id, _, upload_id in rows:
            if upload_id is not None:
                await abort(res.storage, object_key(export_id), upload_id)
        ready = [object_key(export_id) for export_id, state, _ in rows if state == "ready"]
        deleted += await res.storage.delete_many(ready)
        async with res.connection() as conn:
            cur = await conn.execute(_EXPIRE, ([r[0] for r in rows],))
        expired += cur.rowcount
        run.progress(expired, max(total, expired))
        if len(rows) < BATCH:
            break
    metrics.RETENTION_DELETED.labels("exports").inc(deleted)
    return {"exports": expired, "objects": deleted}
