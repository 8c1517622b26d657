"""The schedules the scheduler runs (see entry.py for what a schedule is). Schedules marked
`retention` are also the ones `appliance retention run` runs."""

from __future__ import annotations

from appliance.attachments import retention as uploads
from appliance.backups import schedule as backup
from appliance.exports import retention as exports
from appliance.messages import reconcile
from appliance.schedules import (
    compact_segments,
    expire_segments,
    maintain_partitions,
    prune_job_log,
)
from appliance.schedules.entry import Counts, Entry, Progress, Run
from appliance.webhooks import retention as webhooks

__all__ = ["SCHEDULES", "Counts", "Entry", "Progress", "Run"]

SCHEDULES: tuple[Entry, ...] = (
    Entry("prune_job_log", lambda c: c.schedules.prune_job_log, prune_job_log.run, retention=True),
    Entry("compact_segments", lambda c: c.schedules.compact_segments, compact_segments.run),
    Entry(
        "expire_segments",
        lambda c: c.schedules.expire_segments,
        expire_segments.run,
        retention=True,
    ),
    Entry(
        "maintain_partitions",
        lambda c: c.schedules.maintain_partitions,
        maintain_partitions.run,
        retention=True,
    ),
    Entry("reconcile", lambda c: c.schedules.reconcile, reconcile.run),
    Entry("expire_exports", lambda c: c.schedules.expire_exports, exports.run, retention=True),
    Entry("backup", lambda c: c.schedules.backup, backup.run),
    Entry("expire_uploads", lambda c: c.schedules.expire_uploads, uploads.run, retention=True),
    Entry(
        "prune_webhook_deliveries",
        lambda c: c.schedules.prune_webhook_deliveries,
        webhooks.run,
        retention=True,
    ),
)
