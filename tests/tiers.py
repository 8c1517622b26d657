"""Building the history tiers in tests, through the contract the read path relies on.

Small stand-ins, swappable for the real programs: `flush` writes what the tail holds above a
conversation's indexed head as one flush segment and indexes it as the flusher does (leases,
`index_cut`); `compact` rewrites flush rows into one history object and swaps the rows in one
transaction, as compaction does; `trim` trims the tail, never below what is indexed.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import cast

import msgspec

from appliance.messages.publish import MessageIn
from appliance.resources import Resources
from appliance.segments import index, store
from appliance.segments.format import BlockEntry, Record, SegmentWriter
from appliance.segments.index import BlockRow

OWNER = "tests-tiers"
LEASE = 60.0
Entries = list[tuple[bytes, dict[bytes, bytes]]]


def _encode(blocks: list[tuple[str, list[Record]]]) -> tuple[bytes, str, list[BlockEntry]]:
    writer = SegmentWriter()
    parts = [writer.add_block(conversation, records) for conversation, records in blocks]
    parts.append(writer.finish())
    assert writer.digest is not None
    return b"".join(parts), writer.digest, writer.entries


def _ms(message: bytes) -> int:
    ts = str(json.loads(message)["ts"]).replace("Z", "+00:00")
    return int(datetime.fromisoformat(ts).timestamp() * 1000)


async def flush(res: Resources, conversations: Sequence[str]) -> str | None:
    """Put the tail entries above each conversation's indexed head into one flush segment and
    index it (fenced by this helper's leases); the object key, or None when nothing was new."""
    async with res.connection() as conn:
        heads = await index.flushed_heads(conn, conversations)
    blocks: list[tuple[str, list[Record]]] = []
    for conversation in sorted(set(conversations)):
        head = heads.get(conversation, 0)
        entries = cast(Entries, await res.redis.xrange(res.keys.tail(conversation), f"({head}-0"))
        records = [
            Record(int(entry_id.split(b"-")[0]), _ms(fields[b"m"]), fields[b"m"])
            for entry_id, fields in entries
        ]
        if records:
            blocks.append((conversation, records))
    if not blocks:
        return None
    data, digest, entries_out = _encode(blocks)
    key = store.flush_key(datetime.now(UTC).date(), digest)
    await res.storage.put(key, data)
    shards = res.config.segments.shards
    async with res.connection() as conn:
        await index.ensure_shards(conn, shards)
        owned = await index.claim_shards(conn, OWNER, LEASE, shards)
        refused = await index.index_cut(conn, OWNER, owned, key, entries_out, LEASE)
    assert refused is None, refused
    return key


async def _rows(res: Resources, tier: str) -> list[BlockRow]:
    async with res.connection() as conn:
        cur = await conn.execute(
            """SELECT tier, period, conversation, first_seq, last_seq, object_key, byte_offset,
                      byte_length, records, min_ts, max_ts
                 FROM segment_blocks WHERE tier = %s ORDER BY conversation, first_seq""",
            (tier,),
        )
        return [BlockRow(*row) for row in await cur.fetchall()]


async def compact(res: Resources) -> str | None:
    """Rewrite every flush row into one history object (one block per conversation), swap the
    rows in one transaction, then delete the flush objects; the history object's key."""
    rows = await _rows(res, "flush")
    if not rows:
        return None
    merged: dict[str, list[Record]] = {}
    for row in rows:
        block = await store.read_block(res.storage, row.object_key, row.entry)
        merged.setdefault(row.conversation, []).extend(block.records)
    data, _, entries = _encode(sorted(merged.items()))
    key = f"{store.HISTORY_PREFIX}test-{uuid.uuid4().hex}.seg"
    await res.storage.put(key, data)
    async with res.connection() as conn, conn.transaction():
        for row in rows:
            await conn.execute(
                "DELETE FROM segment_blocks WHERE tier = 'flush' AND conversation = %s"
                " AND first_seq = %s",
                (row.conversation, row.first_seq),
            )
        for e in entries:
            await conn.execute(
                """INSERT INTO segment_blocks (tier, period, conversation, first_seq, last_seq,
                          object_key, byte_offset, byte_length, records, min_ts, max_ts)
                   VALUES ('history', (now() AT TIME ZONE 'UTC')::date, %s, %s, %s, %s, %s, %s,
                           %s, %s, %s)""",
                (
                    e.conversation,
                    e.first_seq,
                    e.last_seq,
                    key,
                    e.offset,
                    e.length,
                    e.count,
                    index.from_ms(e.min_ts),
                    index.from_ms(e.max_ts),
                ),
            )
    await res.storage.delete_many(sorted({row.object_key for row in rows}))
    return key


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
