"""Building the history tiers in tests with the real programs' code: `flush` is the flusher
(`flush_pending`), `compact` the compaction (`compact_day`, on a day of its own each call), and
`trim` trims a tail as the flusher may, never below what is indexed.
"""

from __future__ import annotations

import itertools
import json
from datetime import date, timedelta
from typing import cast

import msgspec

from appliance.messages.publish import MessageIn
from appliance.resources import Resources
from appliance.segments import index, store
from appliance.segments.compact import compact_day
from appliance.segments.flush import flush_pending

Entries = list[tuple[bytes, dict[bytes, bytes]]]
_DAYS = itertools.count()  # each compact() call gets a day never used before in this process


async def flush(res: Resources) -> str | None:
    """What Redis holds now, flushed by the real flusher (one cut per shard set); the key of the
    last object written, or None when nothing was new."""
    stats = await flush_pending(res)
    return stats.keys[-1] if stats.keys else None


async def compact(res: Resources) -> str | None:
    """Every flush row compacted by the real compaction: the rows are moved to a day of their
    own (compaction works on whole UTC days, and each call here must be a new one), then that
    day is compacted; the history object's key, or None when there was nothing to compact."""
    day = date(2000, 1, 1) + timedelta(days=next(_DAYS))
    async with res.connection() as conn:
        await conn.execute("SELECT appliance_ensure_flush_partition(%s)", (day,))
        moved = await conn.execute(
            "UPDATE segment_blocks SET period = %s WHERE tier = 'flush'", (day,)
        )
    if moved.rowcount == 0:
        return None
    counts = await compact_day(res, day)
    assert counts["days"] == 1, counts
    return store.history_key(day)


async def trim(res: Resources, conversation: str, keep: int) -> None:
    """Keep the newest `keep` tail entries at least, and every one not yet indexed."""
    async with res.connection() as conn:
        head = await index.durable_head(conn, conversation)
    tail = res.keys.tail(conversation)
    newest = cast(Entries, await res.redis.xrevrange(tail, count=keep + 1))
    if len(newest) <= keep:
        return
    floor = int(newest[keep - 1][0].split(b"-")[0]) if keep else None
    cut = head + 1 if floor is None else min(head + 1, floor)
    await res.redis.xtrim(tail, minid=f"{cut}-0", approximate=False)


def text(n: int) -> MessageIn:
    """A message whose body carries `n`."""
    return MessageIn(type="text", body=msgspec.Raw(json.dumps({"n": n}).encode()))
