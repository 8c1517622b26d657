"""The segment index in PostgreSQL: shard leases, flushed high-water marks, block rows.

Rules the queries keep:
- A shard has one owner at a time. A flusher takes a shard only when its lease has run out, and
  the transaction that indexes a cut locks the shard rows and checks it still owns them, so a
  flusher that lost a shard (paused, partitioned) can never index into it.
- A conversation's rows never overlap in seq: a cut whose block starts at or below the
  conversation's flushed high-water mark is refused whole (`index_cut` returns the
  conversations at fault), and the caller filters and cuts again.
- Flush rows go to the partition of the UTC day of the indexing transaction (PostgreSQL's
  clock, not the flusher's), so a day's partition stops growing when the day ends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import Any, Literal

import msgspec
import psycopg
from psycopg.rows import class_row

from appliance.errors import ConfigError, Problem
from appliance.segments.format import BlockEntry

Conn = psycopg.AsyncConnection[Any]
Tier = Literal["flush", "history"]

COLUMNS = (
    "tier, period, conversation, first_seq, last_seq, object_key, byte_offset, byte_length,"
    " records, min_ts, max_ts"
)


class BlockRow(msgspec.Struct, frozen=True):
    tier: str
    period: date
    conversation: str
    first_seq: int
    last_seq: int
    object_key: str
    byte_offset: int
    byte_length: int
    records: int
    min_ts: datetime
    max_ts: datetime

    @property
    def entry(self) -> BlockEntry:
        """The block as its object's directory describes it (decode_block checks against it)."""
        return BlockEntry(
            self.conversation,
            self.byte_offset,
            self.byte_length,
            self.records,
            self.first_seq,
            self.last_seq,
            to_ms(self.min_ts),
            to_ms(self.max_ts),
        )


def to_ms(at: datetime) -> int:
    return (at - _EPOCH) // _MS


def from_ms(ms: int) -> datetime:
    return _EPOCH + ms * _MS


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = datetime(1970, 1, 1, 0, 0, 0, 1000, tzinfo=UTC) - _EPOCH


# -- shards and leases ------------------------------------------------------------------------


async def ensure_shards(conn: Conn, shards: int) -> None:
    """Make the shard rows on first start; refuse a `[segments] shards` that differs from the
    count the data was written with (conversations would map to other shards)."""
    async with conn.transaction():
        cur = await conn.execute("SELECT count(*), coalesce(max(shard) + 1, 0) FROM segment_shards")
        row = await cur.fetchone()
        assert row is not None
        count, top = int(row[0]), int(row[1])
        if count == 0:
            await conn.execute(
                "INSERT INTO segment_shards (shard) SELECT generate_series(0, %s - 1)"
                " ON CONFLICT (shard) DO NOTHING",
                (shards,),
            )
        elif count != shards or top != shards:
            raise ConfigError(
                [
                    Problem(
                        "segments.shards",
                        f"is {shards}, but the history was written with {count} shards; "
                        "the shard count is fixed at first start",
                    )
                ]
            )


async def claim_shards(
    conn: Conn, owner: str, ttl: float, shards: int, peers: int = 0
) -> list[int]:
    """Renew `owner`'s leases and take expired shards up to a fair share (the shards divided
    by the live owners), releasing any above it; the shards `owner` holds afterwards.

    `peers` is how many other flushers are alive by another account (the flusher keeps one in
    Redis): a flusher that holds no shard yet is invisible here, so without it an owner of
    every shard would never hand any over to a newcomer."""
    async with conn.transaction():
        await conn.execute(
            "UPDATE segment_shards SET lease_until = now() + make_interval(secs => %s)"
            " WHERE owner = %s",
            (ttl, owner),
        )
        cur = await conn.execute(
            "SELECT count(DISTINCT owner) FROM segment_shards"
            " WHERE owner IS NOT NULL AND owner <> %s AND lease_until > now()",
            (owner,),
        )
        row = await cur.fetchone()
        others = max(int(row[0]) if row else 0, peers)
        share = math.ceil(shards / (others + 1))
        cur = await conn.execute(
            "SELECT shard FROM segment_shards WHERE owner = %s ORDER BY shard", (owner,)
        )
        mine = [int(r[0]) for r in await cur.fetchall()]
        if len(mine) > share:
            extra = mine[share:]
            await conn.execute(
                "UPDATE segment_shards SET owner = NULL, lease_until = '-infinity'"
                " WHERE owner = %s AND shard = ANY(%s)",
                (owner, extra),
            )
            mine = mine[:share]
        elif len(mine) < share:
            cur = await conn.execute(
                """UPDATE segment_shards SET owner = %s,
                          lease_until = now() + make_interval(secs => %s)
                    WHERE shard IN (SELECT shard FROM segment_shards
                                     WHERE owner IS NULL OR lease_until <= now()
                                     ORDER BY shard LIMIT %s FOR UPDATE SKIP LOCKED)
                RETURNING shard""",
                (owner, ttl, share - len(mine)),
            )
            mine = sorted(mine + [int(r[0]) for r in await cur.fetchall()])
        return mine


async def release_shards(conn: Conn, owner: str) -> None:
    """Give up every lease of `owner` (a clean stop): others take the shards at once."""
    await conn.execute(
        "UPDATE segment_shards SET owner = NULL, lease_until = '-infinity' WHERE owner = %s",
        (owner,),
    )


class ShardState(msgspec.Struct, frozen=True):
    shard: int
    owner: str | None
    lease_until: datetime | None
    flushed_at: datetime | None
    cuts: int


async def shard_states(conn: Conn) -> list[ShardState]:
    """Every shard with its owner (None when its lease has run out)."""
    async with conn.cursor(row_factory=class_row(ShardState)) as cur:
        await cur.execute(
            """SELECT shard, CASE WHEN lease_until > now() THEN owner END AS owner,
                      CASE WHEN lease_until > now() THEN lease_until END AS lease_until,
                      flushed_at, cuts
                 FROM segment_shards ORDER BY shard"""
        )
        return await cur.fetchall()


# -- flushing ---------------------------------------------------------------------------------


async def ensure_flush_partitions(conn: Conn, today: date) -> None:
    """Today's and tomorrow's flush partitions (rows would go to the default one otherwise)."""
    await conn.execute(
        "SELECT appliance_ensure_flush_partition(%s), appliance_ensure_flush_partition(%s + 1)",
        (today, today),
    )


async def flushed_heads(conn: Conn, conversations: Sequence[str]) -> dict[str, int]:
    """The indexed high-water mark of each conversation that has one."""
    cur = await conn.execute(
        "SELECT conversation, flushed_seq FROM segment_heads WHERE conversation = ANY(%s)",
        (list(conversations),),
    )
    return {str(c): int(s) for c, s in await cur.fetchall()}


async def durable_head(conn: Conn, conversation: str) -> int:
    """The highest seq of `conversation` that is indexed (0: none)."""
    return (await flushed_heads(conn, [conversation])).get(conversation, 0)


class Refused(msgspec.Struct, frozen=True):
    """Why `index_cut` indexed nothing: shards no longer owned, or conversations whose high-water
    mark reached a block of the cut (flushed meanwhile by a previous owner)."""

    lost_shards: list[int]
    stale: dict[str, int]  # conversation -> its flushed high-water mark


async def index_cut(
    conn: Conn,
    owner: str,
    shards: Sequence[int],
    object_key: str,
    entries: Sequence[BlockEntry],
    ttl: float,
) -> Refused | None:
    """Index one cut (the blocks of object `object_key`, from `shards`) in one transaction:
    fenced by the leases, no overlap with what is indexed, high-water marks raised, leases
    renewed. None when indexed; else what refused it (nothing written)."""
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT shard FROM segment_shards WHERE shard = ANY(%s) AND owner = %s FOR UPDATE",
            (list(shards), owner),
        )
        held = {int(r[0]) for r in await cur.fetchall()}
        lost = sorted(set(shards) - held)
        firsts: dict[str, int] = {}
        lasts: dict[str, int] = {}
        for e in entries:
            firsts[e.conversation] = min(e.first_seq, firsts.get(e.conversation, e.first_seq))
            lasts[e.conversation] = max(e.last_seq, lasts.get(e.conversation, e.last_seq))
        heads = await flushed_heads(conn, list(firsts))
        stale = {c: h for c, h in heads.items() if h >= firsts[c]}
        if lost or stale:
            return Refused(lost, stale)
        if entries:
            await insert_blocks(conn, "flush", None, object_key, entries)
            await conn.execute(
                """INSERT INTO segment_heads (conversation, flushed_seq)
                   SELECT * FROM unnest(%s::text[], %s::bigint[])
                   ON CONFLICT (conversation) DO UPDATE SET flushed_seq
                       = greatest(segment_heads.flushed_seq, excluded.flushed_seq)""",
                (list(lasts), list(lasts.values())),
            )
        await conn.execute(
            """UPDATE segment_shards SET flushed_at = now(), cuts = cuts + 1,
                      lease_until = now() + make_interval(secs => %s)
                WHERE shard = ANY(%s)""",
            (ttl, list(shards)),
        )
    return None


async def insert_blocks(
    conn: Conn, tier: Tier, period: date | None, object_key: str, entries: Sequence[BlockEntry]
) -> None:
    """One row per block of object `object_key` (one statement). `period` None: today by
    PostgreSQL's clock, which is what places a flush row in its day's partition."""
    await conn.execute(
        f"""INSERT INTO segment_blocks ({COLUMNS})
            SELECT %s, coalesce(%s::date, (now() AT TIME ZONE 'UTC')::date), c, f, l, %s, o, n, r,
                   'epoch'::timestamptz + lo * interval '1 millisecond',
                   'epoch'::timestamptz + hi * interval '1 millisecond'
              FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::bigint[],
                          %s::int[], %s::int[], %s::bigint[], %s::bigint[])
                   AS t(c, f, l, o, n, r, lo, hi)""",
        (
            tier,
            period,
            object_key,
            [e.conversation for e in entries],
            [e.first_seq for e in entries],
            [e.last_seq for e in entries],
            [e.offset for e in entries],
            [e.length for e in entries],
            [e.count for e in entries],
            [e.min_ts for e in entries],
            [e.max_ts for e in entries],
        ),
    )


# -- reading ----------------------------------------------------------------------------------


async def blocks_before(conn: Conn, conversation: str, seq: int, limit: int) -> list[BlockRow]:
    """Up to `limit` blocks holding seqs below `seq`, newest first."""
    async with conn.cursor(row_factory=class_row(BlockRow)) as cur:
        await cur.execute(
            f"""SELECT {COLUMNS} FROM segment_blocks
                 WHERE conversation = %s AND first_seq < %s
                 ORDER BY first_seq DESC LIMIT %s""",
            (conversation, seq, limit),
        )
        return await cur.fetchall()


async def blocks_after(conn: Conn, conversation: str, seq: int, limit: int) -> list[BlockRow]:
    """Up to `limit` blocks holding seqs above `seq`, oldest first: the block holding seq + 1
    (its first_seq is at most seq), then those starting above seq. Both halves are index
    range scans; rows never overlap, so no other row can hold seqs above `seq`."""
    async with conn.cursor(row_factory=class_row(BlockRow)) as cur:
        await cur.execute(
            f"""(SELECT {COLUMNS} FROM segment_blocks
                  WHERE conversation = %(c)s AND first_seq <= %(s)s
                  ORDER BY first_seq DESC LIMIT 1)
                UNION ALL
                (SELECT {COLUMNS} FROM segment_blocks
                  WHERE conversation = %(c)s AND first_seq > %(s)s
                  ORDER BY first_seq LIMIT %(n)s)""",
            {"c": conversation, "s": seq, "n": limit},
        )
        rows = await cur.fetchall()
    return [r for r in rows if r.last_seq > seq][:limit]


async def block_at(conn: Conn, conversation: str, seq: int) -> BlockRow | None:
    """The block holding `seq`, if one is indexed."""
    rows = await blocks_before(conn, conversation, seq + 1, 1)
    return rows[0] if rows and rows[0].last_seq >= seq else None


async def oldest_seq(conn: Conn, conversation: str) -> int | None:
    """The lowest indexed seq of `conversation` (None: nothing indexed)."""
    cur = await conn.execute(
        "SELECT min(first_seq) FROM segment_blocks WHERE conversation = %s", (conversation,)
    )
    row = await cur.fetchone()
    return None if row is None or row[0] is None else int(row[0])
