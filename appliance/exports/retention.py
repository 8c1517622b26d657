"""`expire_exports`: exports requested more than `[schedules.expire_exports] keep_days` ago lose
their objects (batch deletes) and turn `expired`; the rows stay, so `GET /v1/exports/{id}` says
what became of them. Exports of a conversation since purged (no conversation holds their id, or
one created after them does) lose their objects and their rows: nobody may read them any more.

Every object any run of a selected export may have written is deleted (`object_keys`: one per
attempt; deleting a missing key is harmless), whatever the row's state: a run still going may
complete its object between this pass's select and its update. Such a run then finds the row
expired (or gone) and deletes its object itself (appliance/exports/jobs.py). A run's multipart
upload in progress is aborted.

Objects are deleted before their rows change: a run stopped between the two leaves rows that the
next run picks up again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from appliance import metrics
from appliance.exports.service import object_keys
from appliance.multipart import abort
from appliance.resources import Resources

if TYPE_CHECKING:  # appliance.schedules imports this module to register it
    from appliance.schedules.entry import Run

BATCH = 1000  # rows a round: batch deletes of their objects

# Whose conversation is gone: the anti-join reads every export row (expired ones too, so that
# their rows go), once a run; exports are few next to messages.
_PURGED = """NOT EXISTS (SELECT 1 FROM conversations c
                     WHERE c.id = e.conversation AND c.created_at <= e.created_at)"""
_OLD = "e.state <> 'expired' AND e.created_at < now() - make_interval(days => %(days)s)"
_PAST = f"""
SELECT e.id, e.state, e.attempts, e.object_key, e.upload_id, {_PURGED} FROM exports e
 WHERE ({_OLD}) OR {_PURGED}
 ORDER BY e.created_at, e.id LIMIT %(limit)s
"""
_COUNT = f"""
SELECT count(*) FILTER (WHERE NOT {_PURGED}),
       count(*) FILTER (WHERE {_PURGED}),
       count(*) FILTER (WHERE e.state = 'ready')
  FROM exports e
 WHERE ({_OLD}) OR {_PURGED}
"""
_EXPIRE = """
UPDATE exports SET state = 'expired', expired_at = now(), upload_id = NULL
 WHERE id = ANY(%s) AND state <> 'expired'
"""
_DELETE = "DELETE FROM exports WHERE id = ANY(%s)"


async def run(res: Resources, run: Run) -> dict[str, int]:
    """Counts: exports (expired), purged (rows deleted with their conversation), objects (of
    ready exports: the objects known to exist; the keys of other runs are deleted too)."""
    days = res.config.schedules.expire_exports.keep_days
    async with res.connection() as conn:
        cur = await conn.execute(_COUNT, {"days": days})
        row = await cur.fetchone()
    old, gone, ready = (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)
    if run.dry_run:
        return {"exports": old, "purged": gone, "objects": ready}
    expired = purged = deleted = 0
    total = old + gone
    run.progress(0, total)
    while True:
        async with res.connection() as conn:
            cur = await conn.execute(_PAST, {"days": days, "limit": BATCH})
            rows = await cur.fetchall()
        if not rows:
            break
        keys: list[str] = []
        for export_id, _, attempts, key, upload_id, _ in rows:
            if upload_id is not None:
                await abort(res.storage, key, upload_id)
            keys += {key, *object_keys(export_id, attempts)}
        await res.storage.delete_many(keys)
        deleted += sum(1 for r in rows if r[1] == "ready")
        async with res.connection() as conn, conn.transaction():
            cur = await conn.execute(_DELETE, ([r[0] for r in rows if r[5]],))
            purged += cur.rowcount
            cur = await conn.execute(_EXPIRE, ([r[0] for r in rows if not r[5]],))
            expired += cur.rowcount
        run.progress(expired + purged, max(total, expired + purged))
        if len(rows) < BATCH:
            break
    metrics.RETENTION_DELETED.labels("exports").inc(deleted)
    return {"exports": expired, "purged": purged, "objects": deleted}
