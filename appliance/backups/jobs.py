"""`backups.run`: one backup, taken by a worker (`{"keep": N}`; no keep: the schedule's).

The nightly `backup` schedule takes its backup itself (appliance/backups/schedule.py); this job
is for a backup asked for from elsewhere without waiting on it. A failed dump raises, so the
worker's attempts and back-off apply: each attempt starts a new dump under a new name.
"""

from __future__ import annotations

import msgspec

from appliance.backups.service import take
from appliance.resources import Resources

RUN = "backups.run"


class Job(msgspec.Struct, forbid_unknown_fields=True):
    keep: int | None = None


async def run(res: Resources, payload: bytes) -> None:
    job = msgspec.json.decode(payload or b"{}", type=Job)
    keep = job.keep if job.keep is not None else res.config.schedules.backup.keep
    await take(res.config, res.storage, max(1, keep))
