"""Decoded history blocks kept in memory, so paging through one block costs one ranged GET.

An LRU keyed by (object key, byte offset), bounded by decoded bytes: the payloads plus a small
overhead per record. A block bigger than the whole budget is handed out but not kept. Misses
are single-flight: concurrent readers of one block share one GET and one decode. A kept block
is handed out only for the index row it was read for (same conversation, offset, length and
seqs): an object written again under its key (a compaction run twice for one day) is read
again, never served from the old copy. A block whose object was deleted is only never asked
for again, and ages out.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from appliance import metrics
from appliance.segments.format import Block, BlockEntry
from appliance.segments.store import read_block
from appliance.storage import Storage

RECORD_OVERHEAD = 64  # bytes charged per record beside its payload (the Record and its ints)
BlockId = tuple[str, int]


def block_size(block: Block) -> int:
    """What `block` is charged against the budget."""
    return sum(len(r.payload) + RECORD_OVERHEAD for r in block.records)


class BlockCache:
    def __init__(self, storage: Storage, budget: int) -> None:
        self.storage = storage
        self.budget = budget
        self.size = 0  # bytes charged by the blocks kept
        self._kept: OrderedDict[BlockId, tuple[Block, int]] = OrderedDict()
        self._loading: dict[BlockId, asyncio.Task[Block]] = {}

    def __len__(self) -> int:
        return len(self._kept)

    async def get(self, key: str, entry: BlockEntry) -> Block:
        """The block `entry` of object `key`, decoded and checked against `entry`. Raises what
        the read raises (StorageError, SegmentCorrupt) to every reader waiting on it."""
        block_id = (key, entry.offset)
        kept = self._kept.get(block_id)
        if kept is not None and kept[0].entry != entry:
            self._drop(block_id)
            kept = None
        if kept is not None:
            self._kept.move_to_end(block_id)
            metrics.BLOCK_CACHE.labels("hit").inc()
            return kept[0]
        task = self._loading.get(block_id)
        if task is None:
            metrics.BLOCK_CACHE.labels("miss").inc()
            task = asyncio.create_task(self._load(block_id, key, entry))
            # A read every waiter gave up on must not log "exception never retrieved".
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._loading[block_id] = task
        else:
            metrics.BLOCK_CACHE.labels("hit").inc()  # shares the read in flight
        # Shielded: one reader cancelled (its request ended) does not cancel the others' read.
        return await asyncio.shield(task)

    async def _load(self, block_id: BlockId, key: str, entry: BlockEntry) -> Block:
        try:
            block = await read_block(self.storage, key, entry)
        finally:
            del self._loading[block_id]
        self._keep(block_id, block)
        return block

    def _keep(self, block_id: BlockId, block: Block) -> None:
        size = block_size(block)
        if size > self.budget:
            return
        self._drop(block_id)
        self._kept[block_id] = (block, size)
        self.size += size
        while self.size > self.budget:
            _, (_, dropped) = self._kept.popitem(last=False)
            self.size -= dropped

    def _drop(self, block_id: BlockId) -> None:
        kept = self._kept.pop(block_id, None)
        if kept is not None:
            self.size -= kept[1]
