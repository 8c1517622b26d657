"""Partition maintenance (appliance/db/partitions.py) as of PostgreSQL's UTC date: monthly
partitions ahead and past retention dropped, daily flush partitions ahead."""

from __future__ import annotations

from appliance.db import partitions
from appliance.resources import Resources
from appliance.schedules.entry import Counts, Run


async def run(res: Resources, run: Run) -> Counts:
    async with res.connection() as conn:
        cur = await conn.execute("SELECT (now() AT TIME ZONE 'UTC')::date")
        row = await cur.fetchone()
        assert row is not None
        return await partitions.maintain(conn, res.config, row[0], run.dry_run)
