"""The `backup` schedule (`[schedules.backup]`): a backup at `cron`, the newest `keep` kept.

It dumps in the scheduler itself rather than queueing `backups.run`: the schedule's run row then
says whether last night's backup exists (status, error, bytes, deleted) and feeds the
last-success gauge and `appliance status`, which a queued job would not; the scheduler already
makes sure one container takes each tick. A dry run takes no backup and counts the backups a
new one would push out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from appliance.backups.service import backups, surplus, take
from appliance.resources import Resources

if TYPE_CHECKING:  # appliance.schedules imports this module to register it
    from appliance.schedules.entry import Run


async def run(res: Resources, run: Run) -> dict[str, int]:
    keep = res.config.schedules.backup.keep
    if run.dry_run:
        found = await backups(res.storage)
        # A new backup would leave room for keep - 1 of these.
        return {"backups": 0, "bytes": 0, "deleted": len(surplus(found, keep - 1))}
    run.progress(0, 1)
    backup = await take(res.config, res.storage, keep)
    run.progress(1, 1)
    return {"backups": 1, "bytes": backup.size, "deleted": len(backup.deleted)}
