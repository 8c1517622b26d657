"""Retention of history: days of segments past `[schedules.expire_segments] days`
(appliance/segments/retention.py), then conversations deleted more than `grace_days` ago
(appliance/conversations/retention.py). Days that failed or were busy are left for the next
run; failures make the run fail after the rest is done."""

from __future__ import annotations

from appliance.conversations import retention as conversations
from appliance.errors import ApplianceError
from appliance.resources import Resources
from appliance.schedules.entry import Counts, Run
from appliance.segments import retention as segments


class RetentionFailed(ApplianceError):
    """Some days' objects could not be deleted (each logged as `retention_objects_left`)."""


async def run(res: Resources, run: Run) -> Counts:
    totals = segments.counts()
    await segments.expire(res, run, totals)
    totals.update(conversations.counts())
    await conversations.purge(res, run, totals)
    if totals["failed"]:
        raise RetentionFailed(
            f"{totals['failed']} days' objects left in segment_garbage for the next run"
        )
    return totals
