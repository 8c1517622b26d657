"""Schedule `prune_webhook_deliveries`: delete delivery log rows older than
`[schedules.prune_webhook_deliveries] keep_days`, in bounded batches.

Whole monthly partitions are dropped by partition maintenance; this deletes the rows of the
months that are only partly past retention (and any in the DEFAULT partition).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from appliance import metrics
from appliance.resources import Resources

if TYPE_CHECKING:  # appliance.schedules imports this module to register it
    from appliance.schedules.entry import Run

BATCH = 5000
_OLD = "at < now() - make_interval(days => %s)"
# (tableoid, ctid) names a row of a partitioned table; batches keep each lock short.
_DELETE = (
    "DELETE FROM webhook_deliveries WHERE (tableoid, ctid) IN ("
    f" SELECT tableoid, ctid FROM webhook_deliveries WHERE {_OLD} LIMIT %s)"
)


async def run(res: Resources, run: Run) -> dict[str, int]:
    keep_days = res.config.schedules.prune_webhook_deliveries.keep_days
    async with res.connection() as conn:
        cur = await conn.execute(
            f"SELECT count(*) FROM webhook_deliveries WHERE {_OLD}", (keep_days,)
        )
        row = await cur.fetchone()
    total = int(row[0]) if row else 0
    if run.dry_run:
        return {"deleted": total}
    deleted = 0
    run.progress(0, total)
    while True:
        async with res.connection() as conn:
            cur = await conn.execute(_DELETE, (keep_days, BATCH))
        deleted += cur.rowcount
        run.progress(deleted, max(total, deleted))
        if cur.rowcount < BATCH:
            break
    metrics.RETENTION_DELETED.labels("webhook_deliveries").inc(deleted)
    return {"deleted": deleted}
