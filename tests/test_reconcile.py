"""Reconciliation against real Redis and PostgreSQL: history built by the real publish script
and flusher, then put out of joint the way a restore or a crash would. A counter behind is
raised and an over-long tail trimmed (safe); an index gap is reported and left alone; a dry run
reports the same and changes nothing."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from appliance.messages import reconcile
from appliance.resources import Resources
from appliance.schedules import SCHEDULES, Run
from tests import tiers
from tests.support import migrated_db
from tests.test_history_tiers import isolate, opened
from tests.test_retention import publish


@pytest.fixture
async def res(
    settings: dict[str, Any], fresh_database: Callable[[], str]
) -> AsyncIterator[Resources]:
    dsn = fresh_database()
    await migrated_db(dsn)
    isolate(settings, dsn)
    settings["s3"]["bucket"] = f"reconcile-{uuid.uuid4().hex[:12]}"
    settings["messages"] = {"tail_max": 4}
    async with opened(settings) as resources:
        yield resources


async def index_rows(res: Resources, conversation: str) -> list[tuple[int, int]]:
    async with res.connection() as conn:
        cur = await conn.execute(
            "SELECT first_seq, last_seq FROM segment_blocks WHERE conversation = %s"
            " ORDER BY first_seq",
            (conversation,),
        )
        return [(int(f), int(last)) for f, last in await cur.fetchall()]


async def test_reconcile_repairs_what_is_safe_and_reports_the_rest(res: Resources) -> None:
    entry = next(e for e in SCHEDULES if e.name == "reconcile")
    assert not entry.retention
    # "behind": flushed up to 5, then Redis came back from an older snapshot (counter 2).
    await publish(res, "behind", 5)
    # "gappy": three flushes, then the middle block's row lost.
    await publish(res, "gappy", 3)
    await tiers.flush(res)
    await publish(res, "gappy", 3)
    await tiers.flush(res)
    await publish(res, "gappy", 3)
    await tiers.flush(res)
    await res.redis.set(res.keys.seq("behind"), 2)
    async with res.connection() as conn:
        await conn.execute(
            "DELETE FROM segment_blocks WHERE conversation = 'gappy' AND first_seq = 4"
        )
    # "long": 12 flushed messages whose tail was never trimmed to tail_max (4): the flusher
    # died between indexing and trimming. Its tail is put back as it was before the trim.
    await publish(res, "long", 12)
    untrimmed = await res.redis.xrange(res.keys.tail("long"))
    await tiers.flush(res)
    await res.redis.delete(res.keys.tail("long"))
    for entry_id, fields in untrimmed:
        await res.redis.xadd(res.keys.tail("long"), fields, id=entry_id)
    gappy_rows = await index_rows(res, "gappy")
    assert gappy_rows == [(1, 3), (7, 9)]

    with capture_logs() as logs:
        would = await entry.run(res, Run(dry_run=True))
    assert would["conversations"] == 3
    assert (would["counters_raised"], would["tails_trimmed"], would["index_gaps"]) == (1, 1, 1)
    assert would["head_mismatches"] == 0 and would["tail_gaps"] == 0
    assert await res.redis.get(res.keys.seq("behind")) == b"2", "a dry run repairs nothing"
    assert await res.redis.xlen(res.keys.tail("long")) == 12
    assert [e["conversation"] for e in logs if e["event"] == "reconcile_inconsistency"] == ["gappy"]

    done = await entry.run(res, Run())
    assert (done["counters_raised"], done["tails_trimmed"], done["index_gaps"]) == (1, 1, 1)
    assert done["cycles"] == 1
    assert await res.redis.get(res.keys.seq("behind")) == b"5"
    assert await res.redis.xlen(res.keys.tail("long")) == 4  # tail_max
    assert await index_rows(res, "gappy") == gappy_rows, "a gap is reported, never repaired"
    # Repaired: the next publish goes on after what was flushed, and nothing more is found.
    await publish(res, "behind", 1)
    assert await res.redis.get(res.keys.seq("behind")) == b"6"
    again = await entry.run(res, Run())
    assert (again["counters_raised"], again["tails_trimmed"], again["index_gaps"]) == (0, 0, 1)


async def test_reconcile_scans_in_bounded_runs_and_resumes(
    res: Resources, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(30):
        await res.redis.set(res.keys.seq(f"c{n}"), 1)
    monkeypatch.setattr(reconcile, "SCAN_COUNT", 5)
    monkeypatch.setattr(reconcile, "MAX_PER_RUN", 10)
    checked, runs = 0, 0
    while True:
        done = await reconcile.run(res, Run())
        runs += 1
        checked += done["conversations"]
        assert done["conversations"] < 10 + 15  # bounded: one SCAN batch past the limit at most
        if done["cycles"]:
            break
        assert runs < 10
    assert runs >= 2 and checked >= 30
