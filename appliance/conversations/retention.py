"""Purge conversations deleted more than `[schedules.expire_segments] grace_days` ago.

Deleting a conversation only tombstones it (`deleted_at`): reads fail at once, and the id
cannot be created again while anything of it is left. The purge removes, for each, what each
feature holds of it, each feature deleting its own data:

1. Redis first: messages' tail and seq counter, realtime's presence and receipts. Were the row
   gone first and Redis then failed, the id could be created again over the old tail and
   counter.
2. Then one transaction: the index rows and high-water mark (segments), the members and the
   conversation row. Only after it may the id be created again.

A conversation waits (`deferred`) while the flusher may still index something of it: purged
now, that would be indexed later under an id that may have been created again. That is while its
tail holds messages the flusher has not indexed, and while the flusher group holds entries of
its shard's ingest stream read but not acknowledged that were added before the conversation was
deleted (plus PENDING_MARGIN): a flusher killed after indexing but before XACK replays those,
and with the high-water mark purged it would index them again. Newer pending entries (a busy
shard always has some) cannot be of a conversation deleted before them, so they hold nothing up.

The blocks themselves stay inside the shared history objects until their day expires (nothing
names them any more). A conversation is purged whole or not at all: a failure leaves its row,
and the next run purges it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import structlog

from appliance import metrics
from appliance.messages import retention as messages_retention
from appliance.realtime.presence import Presence
from appliance.resources import Resources
from appliance.segments import index
from appliance.segments import retention as segments_retention

if TYPE_CHECKING:
    # Only a type here: importing appliance.schedules would import this module back.
    from appliance.schedules.entry import Run

Counts = dict[str, int]
log = structlog.get_logger()

BATCH = 100  # conversations looked up at a time
# Pending entries this much newer than the deletion still hold a purge up: Redis's clock (entry
# ids) and PostgreSQL's (deleted_at) may differ, and a publish may add its entry just after the
# deletion commits. grace_days (at least 1) is far longer.
PENDING_MARGIN = timedelta(hours=1)


def counts() -> Counts:
    return dict.fromkeys(("conversations", "conversation_rows", "redis_keys", "deferred"), 0)


async def due(res: Resources, after: str, limit: int) -> list[tuple[str, datetime]]:
    """Up to `limit` conversations past the grace, ids above `after`, in id order: (id, when
    it was deleted)."""
    grace = res.config.schedules.expire_segments.grace_days
    async with res.connection() as conn:
        cur = await conn.execute(
            "SELECT id, deleted_at FROM conversations"
            " WHERE deleted_at < now() - make_interval(days => %s) AND id > %s"
            " ORDER BY id LIMIT %s",
            (grace, after, limit),
        )
        return [(str(c), d) for c, d in await cur.fetchall()]


async def _unflushed(res: Resources, conversation: str) -> bool:
    """Whether its tail holds messages above its indexed high-water mark. Redis is read first:
    the mark only rises, so a flush in between never makes this true wrongly."""
    newest = await messages_retention.last_seq(res.redis, res.keys, conversation)
    if newest == 0:
        return False
    async with res.connection() as conn:
        return newest > await index.durable_head(conn, conversation)


async def _replay_pending(res: Resources, conversation: str, deleted_at: datetime) -> bool:
    """Whether the flusher holds entries of the shard read (not acknowledged) before the
    conversation was deleted: some may be its own, replayed by the next owner of the shard."""
    oldest = await segments_retention.oldest_pending(res, conversation)
    return oldest is not None and oldest < deleted_at + PENDING_MARGIN


async def purge(res: Resources, run: Run, totals: Counts | None = None) -> Counts:
    """Purge every conversation past the grace (a dry run counts them and their index rows);
    counts: conversations, conversation_rows (index rows), redis_keys, deferred (messages not
    yet flushed, or flusher entries older than the deletion not yet acknowledged: purged by a
    later run)."""
    totals = totals if totals is not None else counts()
    config = res.config.realtime
    presence = Presence(res.redis, res.keys, config.presence_ttl, config.receipt_ttl)
    after = ""
    while batch := await due(res, after, BATCH):
        after = batch[-1][0]
        for conversation, deleted_at in batch:
            run.progress(totals["conversations"], None)
            if run.dry_run:
                async with res.connection() as conn:
                    cur = await conn.execute(
                        "SELECT count(*) FROM segment_blocks WHERE conversation = %s",
                        (conversation,),
                    )
                    row = await cur.fetchone()
                totals["conversations"] += 1
                totals["conversation_rows"] += int(row[0]) if row else 0
                continue
            if await _unflushed(res, conversation):
                # Purged now, the flusher would index these later under an id that may be
                # created again: the next run purges it once they are flushed.
                totals["deferred"] += 1
                log.warning("purge_deferred", conversation=conversation, reason="unflushed")
                continue
            if await _replay_pending(res, conversation, deleted_at):
                # A killed flusher's entries, maybe of this conversation, wait for a replay.
                totals["deferred"] += 1
                log.warning("purge_deferred", conversation=conversation, reason="pending")
                continue
            totals["redis_keys"] += await messages_retention.forget_conversation(
                res.redis, res.keys, conversation
            )
            totals["redis_keys"] += await presence.forget_conversation(conversation)
            async with res.connection() as conn, conn.transaction():
                rows = await segments_retention.forget_conversation(conn, conversation)
                await conn.execute(
                    "DELETE FROM conversation_members WHERE conversation = %s", (conversation,)
                )
                cur = await conn.execute(
                    "DELETE FROM conversations WHERE id = %s AND deleted_at IS NOT NULL",
                    (conversation,),
                )
            totals["conversations"] += cur.rowcount
            totals["conversation_rows"] += rows
            metrics.RETENTION_DELETED.labels("conversations").inc(cur.rowcount)
            metrics.RETENTION_DELETED.labels("segment_index_rows").inc(rows)
    return totals
