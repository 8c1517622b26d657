"""Verification helpers for the history tier: what is indexed and in S3, and what is in the tail.

`durable_and_tail` proves "every acknowledged message exactly once, in order": it reads every
indexed block of a conversation (index rows, then one ranged GET each), checks that the rows do
not overlap and that each block holds what its row says, and appends the tail's seqs above the
indexed ones.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from appliance.resources import Resources
from appliance.segments import index, store
from appliance.segments.format import Record
from appliance.segments.index import BlockRow


async def block_rows(res: Resources, conversation: str) -> list[BlockRow]:
    """Every index row of `conversation`, ascending, checked not to overlap."""
    async with res.connection() as conn:
        rows = await index.blocks_after(conn, conversation, 0, 1_000_000)
    for before, after in itertools.pairwise(rows):
        assert before.last_seq < after.first_seq, f"overlapping index rows {before} {after}"
    return rows


async def indexed_records(res: Resources, conversation: str) -> list[Record]:
    """Every indexed record of `conversation`, read from S3 block by block."""
    records: list[Record] = []
    for row in await block_rows(res, conversation):
        block = await store.read_block(res.storage, row.object_key, row.entry)
        assert block.records[0].seq == row.first_seq
        for record in block.records:
            assert json.loads(record.payload)["seq"] == record.seq
        records += block.records
    return records


async def tail_seqs(res: Resources, conversation: str) -> list[int]:
    entries: Any = await res.redis.xrange(res.keys.tail(conversation))
    return [int(entry_id.split(b"-")[0]) for entry_id, _ in entries]


async def durable_and_tail(res: Resources, conversation: str) -> list[int]:
    """The seqs of `conversation` readable from the index and the tail, in order, each once."""
    durable = [r.seq for r in await indexed_records(res, conversation)]
    assert durable == sorted(set(durable)), "indexed seqs repeat or go back"
    top = durable[-1] if durable else 0
    return durable + [s for s in await tail_seqs(res, conversation) if s > top]
