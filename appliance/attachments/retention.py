"""`expire_uploads`: delete, objects and rows,

- uploads never verified (pending or rejected) once they are `[schedules.expire_uploads]
  max_age_hours` old,
- uploads whose conversation is gone: purged after its deletion (appliance/conversations/
  retention.py), or created again since, the uploads being older than it, and
- objects under the upload prefix that no verification will read: of a verified upload (its form
  may write the upload key again until it expires, or a POST begun before may land later) or of
  no upload at all.

Counts: `uploads` (rows of the first kind), `orphaned` (rows of the second), `objects` (keys
deleted for those rows, two a row, upload and file key, a key that held nothing counting too)
and `staging` (objects of the third kind).

Never an upload whose presigned form is still valid (the age is at least `[attachments]
upload_expires`), so no object can arrive after its row is gone. Each batch deletes its rows and
their objects inside one transaction: the rows' locks hold off a verification of the same
upload until the objects are gone, and an S3 failure rolls the rows back for the next run. A
row that a verification holds is skipped until the next run. The third kind is found by
listing the upload prefix, which holds only uploads not yet checked, so the listing stays short.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from appliance import metrics
from appliance.attachments.service import UPLOADS
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


async def _stale(res: Resources) -> list[str]:
    """Objects under the upload prefix of a verified upload not due, or of no upload. An
    unverified or orphaned upload's object is left to the row's own expiry (and counted
    there); a pending one may still be checked."""
    listed = [key for key, _ in await res.storage.list_keys(UPLOADS)]
    kept: set[str] = set()
    async with res.connection() as conn:
        for start in range(0, len(listed), BATCH):
            cur = await conn.execute(
                f"""SELECT a.upload_key FROM attachments a
                    WHERE a.upload_key = ANY(%s) AND (a.state <> 'verified' OR {_ORPHANED})""",
                (listed[start : start + BATCH],),
            )
            kept.update(key for (key,) in await cur.fetchall())
    return [key for key in listed if key not in kept]


async def run(res: Resources, run: Run) -> dict[str, int]:
    age = max_age(res)
    async with res.connection() as conn:
        unfinished, orphaned = await _count(conn, age)
    total = unfinished + orphaned
    run.progress(0, total)
    if run.dry_run:
        leftover = len(await _stale(res))
        run.progress(0, total + leftover)
        return {"uploads": unfinished, "orphaned": orphaned, "objects": 2 * total,
                "staging": leftover}  # fmt: skip
    counts = dict.fromkeys(("uploads", "orphaned", "objects", "staging"), 0)
    done = 0
    while True:
        async with res.connection() as conn, conn.transaction():
            # SKIP LOCKED: a verification holding a row is left to finish; the next run sees it.
            cur = await conn.execute(
                f"""DELETE FROM attachments d WHERE d.id IN (
                        SELECT a.id FROM attachments a WHERE {_DUE}
                        ORDER BY a.created_at LIMIT %(batch)s FOR UPDATE SKIP LOCKED)
                    RETURNING d.upload_key, d.key, NOT EXISTS (SELECT 1 FROM conversations c
                        WHERE c.id = d.conversation AND c.created_at <= d.created_at)""",
                {"age": age, "batch": BATCH},
            )
            deleted = await cur.fetchall()
            if deleted:
                keys = [
                    key for upload_key, file_key, _ in deleted for key in (upload_key, file_key)
                ]
                counts["objects"] += await res.storage.delete_many(keys)
        orphans = sum(1 for *_, orphan in deleted if orphan)
        counts["orphaned"] += orphans
        counts["uploads"] += len(deleted) - orphans
        done += len(deleted)
        run.progress(done, max(total, done))
        if len(deleted) < BATCH:
            break
    # After the rows: the objects of rows just deleted are gone and not listed again.
    stale = await _stale(res)
    total = max(total, done) + len(stale)
    for start in range(0, len(stale), BATCH):
        chunk = stale[start : start + BATCH]
        counts["staging"] += await res.storage.delete_many(chunk)
        run.progress(done + counts["staging"], total)
    metrics.RETENTION_DELETED.labels("attachment_uploads").inc(done)
    metrics.RETENTION_DELETED.labels("attachment_staging").inc(counts["staging"])
    return counts
