"""Reconciliation: find conversations whose Redis tail, index and seq counter disagree, repair
what is safe, report the rest.

What holds for a conversation (head: its `segment_heads` mark; counter: its Redis seq; tail: its
Redis stream of the newest messages):

- The counter is at or above the head and the tail's last seq: seqs are handed out above both.
  A counter behind (Redis restored from an older snapshot) is raised, atomically and only if it
  is still behind: that only skips seqs, never repeats one (the flusher does the same when it
  meets one). Counted `counters_raised`.
- The tail holds at most `[messages] tail_max` entries at or below the head: the flusher trims
  each conversation it flushes to its newest tail_max (and all above the head). A tail with
  more indexed entries (a flusher died between indexing and trimming, or tail_max was lowered)
  is trimmed to tail_max indexed entries, which only drops what is indexed. Counted
  `tails_trimmed`.
- The index has no gap or overlap (each row starts right after the previous one ends; retention
  removes rows from the bottom only) and its top row ends at the head. Reported, never repaired:
  messages would be missing or doubled, and an operator has to look. `index_gaps`,
  `head_mismatches`.
- The tail starts at or below head + 1: messages between would be in neither tier. Reported:
  `tail_gaps`.

Redis is read before PostgreSQL: the head only rises and the flusher trims a tail only below the
head it has indexed, so a flush in between never makes a false report.

Incremental: counters are found with SCAN (COUNT SCAN_COUNT), at most MAX_PER_RUN conversations
a run; the cursor is kept in Redis, so successive runs walk the whole keyspace (`cycles` counts
the runs that finished a walk). A dry run reports and changes nothing (not even the cursor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import structlog

from appliance.resources import Resources

if TYPE_CHECKING:
    # Only a type here: importing appliance.schedules would import this module back.
    from appliance.schedules.entry import Run

Counts = dict[str, int]

log = structlog.get_logger()

SCAN_COUNT = 500
MAX_PER_RUN = 5000

# KEYS: 1 counter. ARGV: 1 the seq it must reach. Raises a counter that is still behind (a
# missing one stays missing: the publish script seeds it). Returns 1 when raised.
_RAISE = """
local current = redis.call("GET", KEYS[1])
if current and tonumber(current) < tonumber(ARGV[1]) then
  redis.call("SET", KEYS[1], ARGV[1])
  return 1
end
return 0
"""

_INDEX = """SELECT c.conversation, h.flushed_seq, r.rows, r.gaps, r.top
  FROM unnest(%s::text[]) AS c(conversation)
  LEFT JOIN segment_heads h ON h.conversation = c.conversation
  LEFT JOIN LATERAL (
      SELECT count(*) AS rows, max(last_seq) AS top,
             count(*) FILTER (WHERE prev IS NOT NULL AND first_seq <> prev + 1) AS gaps
        FROM (SELECT first_seq, last_seq,
                     lag(last_seq) OVER (ORDER BY first_seq) AS prev
                FROM segment_blocks WHERE conversation = c.conversation) b) r ON true"""


@dataclass
class Seen:
    """One conversation as Redis holds it, then as the index does."""

    conversation: str
    counter: int | None
    tail_first: int | None
    tail_last: int | None
    head: int = 0
    rows: int = 0
    gaps: int = 0
    top: int | None = None


def counts() -> Counts:
    return dict.fromkeys(
        (
            "conversations",
            "counters_raised",
            "tails_trimmed",
            "index_gaps",
            "head_mismatches",
            "tail_gaps",
            "cycles",
        ),
        0,
    )


def _seq(entries: Any) -> int | None:
    rows = cast(list[tuple[bytes, Any]], entries)
    return int(rows[0][0].split(b"-")[0]) if rows else None


async def _redis_side(res: Resources, conversations: list[str]) -> list[Seen]:
    async with res.redis.pipeline(transaction=False) as pipe:
        for c in conversations:
            pipe.get(res.keys.seq(c))
            pipe.xrange(res.keys.tail(c), count=1)
            pipe.xrevrange(res.keys.tail(c), count=1)
        replies = await pipe.execute()
    seen = []
    for i, c in enumerate(conversations):
        counter, first, last = replies[3 * i : 3 * i + 3]
        seen.append(Seen(c, None if counter is None else int(counter), _seq(first), _seq(last)))
    return seen


async def _index_side(res: Resources, seen: list[Seen]) -> None:
    by_name = {s.conversation: s for s in seen}
    async with res.connection() as conn:
        cur = await conn.execute(_INDEX, (list(by_name),))
        for conversation, head, rows, gaps, top in await cur.fetchall():
            s = by_name[conversation]
            s.head, s.rows, s.gaps = int(head or 0), int(rows or 0), int(gaps or 0)
            s.top = None if top is None else int(top)


async def check(res: Resources, conversations: list[str], run: Run, totals: Counts) -> None:
    """Check (and with `run.dry_run` false, repair) `conversations`; adds to `totals`."""
    seen = await _redis_side(res, conversations)
    await _index_side(res, seen)
    tail_max = res.config.messages.tail_max
    for s in seen:
        totals["conversations"] += 1
        c = s.conversation
        target = max(s.head, s.tail_last or 0)
        if s.counter is not None and s.counter < target:
            seq = res.keys.seq(c)
            if run.dry_run:
                now = await res.redis.get(seq)  # behind still, or was it a publish meanwhile?
                raised = now is not None and int(now) < target
            else:
                raised = bool(await res.redis.eval(_RAISE, 1, seq, target))
            if raised:
                totals["counters_raised"] += 1
                log.warning(
                    "reconcile_counter_raised", conversation=c, counter=s.counter, to=target
                )
        if s.counter is not None and s.tail_first is not None:
            # tail_max indexed entries and all above the head: never more than the flusher
            # trims (it keeps the newest tail_max in all), so messages published since the last
            # flush never make a tail look long.
            keep = s.head - tail_max + 1
            if s.tail_first < keep:
                if not run.dry_run:
                    await res.redis.xtrim(res.keys.tail(c), minid=f"{keep}-0", approximate=False)
                totals["tails_trimmed"] += 1
                log.info("reconcile_tail_trimmed", conversation=c, below=keep)
        if s.gaps:
            totals["index_gaps"] += 1
            _report(c, "index_gap", s, gaps=s.gaps)
        if s.top is not None and s.top != s.head:
            totals["head_mismatches"] += 1
            _report(c, "head_mismatch", s)
        if s.tail_first is not None and s.tail_first > s.head + 1:
            totals["tail_gaps"] += 1
            _report(c, "tail_gap", s)


def _report(conversation: str, kind: str, s: Seen, **extra: int) -> None:
    log.error(
        "reconcile_inconsistency",
        kind=kind,
        conversation=conversation,
        head=s.head,
        index_top=s.top,
        index_rows=s.rows,
        counter=s.counter,
        tail_first=s.tail_first,
        tail_last=s.tail_last,
        **extra,
    )


async def run(res: Resources, run: Run) -> Counts:
    totals = counts()
    saved = await res.redis.get(res.keys.reconcile_cursor())
    cursor = int(saved) if saved else 0
    pattern = res.keys.seq_pattern()
    while True:
        cursor, found = await res.redis.scan(cursor, match=pattern, count=SCAN_COUNT)
        keys = cast(list[bytes], found)  # the client never decodes responses
        names = sorted({k.decode().split("}:seq:", 1)[1] for k in keys})
        if names:
            await check(res, names, run, totals)
        run.progress(totals["conversations"], None)
        if cursor == 0:
            totals["cycles"] = 1
            break
        if totals["conversations"] >= MAX_PER_RUN:
            break
    if not run.dry_run:
        await res.redis.set(res.keys.reconcile_cursor(), cursor)
    return totals
