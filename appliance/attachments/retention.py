"""`expire_uploads`: delete uploads never verified (pending or rejected) once they are
`[schedules.expire_uploads] max_age_hours` old: their objects and their rows. Counts: `uploads`
(rows) and `objects` (keys deleted from S3, an upload never made counting too).

Never an upload whose presigned form is still valid (the age is at least `[attachments]
upload_expires`), so no object can arrive after its row is gone. Each batch deletes its rows and
their objects inside one transaction: the rows' locks hold off a verification of the same
upload until the objects are gone, and an S3 failure rolls the rows back for the next run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from appliance import metrics
from appliance.resources import Conn, Resources

if TYPE_CHECKING:  # appliance.schedules imports this module to register it
    from appliance.schedules.entry import Run

BATCH = 1000  # one S3 batch delete

_EXPIRED = "state <> 'verified' AND created_at < now() - make_interval(secs => %s)"


def max_age(res: Resources) -> float:
    """Seconds after which an unverified upload is deleted."""
    hours = res.config.schedules.expire_uploads.max_age_hours
    return max(hours * 3600.0, res.config.attachments.upload_expires)


async def _count(conn: Conn, age: float) -> int:
    cur = await conn.execute(f"SELECT count(*) FROM attachments WHERE {_EXPIRED}", (age,))
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def run(res: Resources, run: Run) -> dict[str, int]:
    age = max_age(res)
    async with res.connection() as conn:
        total = await _count(conn, age)
    run.progress(0, total)
    if run.dry_run:
        return {"uploads": total, "objects": total}
    uploads = objects = 0
    while True:
        async with res.connection() as conn, conn.transaction():
            # SKIP LOCKED: a verification holding a row is left to finish; the next run sees it.
            cur = await conn.execute(
                f"""DELETE FROM attachments WHERE id IN (
                        SELECT id FROM attachments WHERE {_EXPIRED}
                        ORDER BY created_at LIMIT %s FOR UPDATE SKIP LOCKED)
                    RETURNING key""",
                (age, BATCH),
            )
            keys = [key for (key,) in await cur.fetchall()]
            if keys:
                objects += await res.storage.delete_many(keys)
        uploads += len(keys)
        run.progress(uploads, max(total, uploads))
        if len(keys) < BATCH:
            break
    metrics.RETENTION_DELETED.labels("attachment_uploads").inc(uploads)
    return {"uploads": uploads, "objects": objects}
