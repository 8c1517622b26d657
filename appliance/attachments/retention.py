"""`expire_uploads`: delete, objects and rows,

- uploads never verified (pending or rejected) once they are `[schedules.expire_uploads]
  max_age_hours` old, and
- uploads whose conversation is gone: purged after its deletion (appliance/conversations/
  retention.py), or created again since, the uploads being older than it.

Counts: `uploads` (rows of the first kind), `orphaned` (rows of the second) and `objects` (keys
deleted from S3, an upload never made counting too).

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

_UNFINISHED = "a.state <> 'verified' AND a.created_at < now() - make_interval(secs => %(age)s)"
_ORPHANED = (
    "NOT EXISTS (SELECT 1 FROM conversations c"
    " WHERE c.id = a.conversation AND c.created_at <= a.created_at)"
)
_DUE = f"({_UNFINISHED}) OR {_ORPHANED}"


def max_age(res: Resources) -> float:
    """Seconds after which an unverified upload is deleted."""
    hours = res.config.schedules.expire_uploads.max_age_hours
    return max(hours * 3600.0, res.config.attachments.upload_expires)


async def _count(conn: Conn, age: float) -> tuple[int, int]:
    """(unfinished, orphaned) uploads due."""
    cur = await conn.execute(
        f"SELECT count(*) FILTER (WHERE {_ORPHANED}), count(*) FROM attachments a WHERE {_DUE}",
        {"age": age},
    )
    row = await cur.fetchone()
    orphaned, due = (int(row[0]), int(row[1])) if row else (0, 0)
    return due - orphaned, orphaned


async def run(res: Resources, run: Run) -> dict[str, int]:
    age = max_age(res)
    async with res.connection() as conn:
        unfinished, orphaned = await _count(conn, age)
    total = unfinished + orphaned
    run.progress(0, total)
    if run.dry_run:
        return {"uploads": unfinished, "orphaned": orphaned, "objects": total}
    counts = dict.fromkeys(("uploads", "orphaned", "objects"), 0)
    done = 0
    while True:
        async with res.connection() as conn, conn.transaction():
            # SKIP LOCKED: a verification holding a row is left to finish; the next run sees it.
            cur = await conn.execute(
                f"""DELETE FROM attachments d WHERE d.id IN (
                        SELECT a.id FROM attachments a WHERE {_DUE}
                        ORDER BY a.created_at LIMIT %(batch)s FOR UPDATE SKIP LOCKED)
                    RETURNING d.key, NOT EXISTS (SELECT 1 FROM conversations c
                        WHERE c.id = d.conversation AND c.created_at <= d.created_at)""",
                {"age": age, "batch": BATCH},
            )
            deleted = await cur.fetchall()
            if deleted:
                counts["objects"] += await res.storage.delete_many([key for key, _ in deleted])
        orphans = sum(1 for _, orphan in deleted if orphan)
        counts["orphaned"] += orphans
        counts["uploads"] += len(deleted) - orphans
        done += len(deleted)
        run.progress(done, max(total, done))
        if len(deleted) < BATCH:
            break
    metrics.RETENTION_DELETED.labels("attachment_uploads").inc(done)
    return counts
