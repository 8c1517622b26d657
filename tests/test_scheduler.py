"""The scheduler over real PostgreSQL: several schedulers never run one tick twice, and a run
cut off with its owner (the owner's session ends without closing the row) is closed as failed
while a run whose owner lives is left alone."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY

from appliance.config.model import Schedule
from appliance.programs import scheduler
from appliance.programs.scheduler import (
    OWNER_GONE,
    claim,
    housekeeping,
    reconcile_runs,
    run_scheduler,
    run_tick,
)
from appliance.resources import Resources
from appliance.schedules import Entry, Run


def counting_entry(name: str, calls: list[str], cron: str = "* * * * *") -> Entry:
    async def run(res: Resources, run: Run) -> dict[str, int]:
        calls.append(name)
        await asyncio.sleep(0.05)  # both claimers are in flight at once
        return {"ran": 1}

    # model_construct: a six-field cron (seconds last) is refused by the config, not by croniter,
    # and keeps this test to a few seconds.
    return Entry(name, lambda c: Schedule.model_construct(enabled=True, cron=cron), run)


async def rows(res: Resources, name: str) -> list[tuple[str, dict[str, int], str | None]]:
    async with res.connection() as conn:
        cur = await conn.execute(
            "SELECT status, counts, error FROM schedule_runs WHERE name = %s ORDER BY tick",
            (name,),
        )
        return list(await cur.fetchall())


async def test_two_schedulers_on_the_same_ticks_run_each_once(resources: Resources) -> None:
    calls: list[str] = []
    name = f"test_twice_{uuid.uuid4().hex[:6]}"
    entry = counting_entry(name, calls, "* * * * * *")  # every second
    stop = asyncio.Event()
    schedulers = [asyncio.create_task(run_scheduler(resources, stop, [entry])) for _ in range(2)]
    while len(await rows(resources, name)) < 3:
        await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*schedulers)
    recorded = await rows(resources, name)
    assert len(calls) == len(recorded), "a tick ran in both schedulers"
    assert all(status == "ok" and counts == {"ran": 1} for status, counts, _ in recorded)


async def test_concurrent_claims_of_the_same_ticks_run_each_once(resources: Resources) -> None:
    calls: list[str] = []
    name = f"test_ticks_{uuid.uuid4().hex[:6]}"
    entry = counting_entry(name, calls)
    base = datetime(2026, 3, 1, tzinfo=UTC)
    ticks = [base + timedelta(minutes=m) for m in range(4)]
    await asyncio.gather(*(run_tick(resources, entry, t) for t in ticks for _ in range(3)))
    assert len(calls) == 4
    assert [status for status, _, _ in await rows(resources, name)] == ["ok"] * 4


async def test_a_run_whose_owner_is_gone_is_closed_as_failed(resources: Resources) -> None:
    name = f"test_crash_{uuid.uuid4().hex[:6]}"
    dead_tick = datetime(2026, 4, 1, 3, 0, tzinfo=UTC)
    live_tick = dead_tick + timedelta(hours=1)
    dead = await claim(resources, name, dead_tick)
    live = await claim(resources, name, live_tick)
    assert dead is not None and live is not None
    # The owner dies: its session ends without the row being closed.
    await dead.close()
    try:
        assert await reconcile_runs(resources) >= 1
        async with resources.connection() as conn:
            cur = await conn.execute(
                "SELECT tick, status, error, finished_at IS NOT NULL FROM schedule_runs"
                " WHERE name = %s ORDER BY tick",
                (name,),
            )
            found = await cur.fetchall()
        assert [(t, s, e, f) for t, s, e, f in found] == [
            (dead_tick, "failed", OWNER_GONE, True),
            (live_tick, "running", None, False),  # its owner holds the lock: still going
        ]
        # The tick stays taken: nobody runs it again.
        assert await claim(resources, name, dead_tick) is None
    finally:
        await live.close()
    await housekeeping(resources, [name])
    assert [status for status, _, _ in await rows(resources, name)] == ["failed", "failed"]


async def test_last_success_gauge_is_loaded_from_the_runs(resources: Resources) -> None:
    calls: list[str] = []
    name = f"test_gauge_{uuid.uuid4().hex[:6]}"
    await run_tick(resources, counting_entry(name, calls), datetime(2026, 5, 1, tzinfo=UTC))
    ran_at = REGISTRY.get_sample_value(
        "appliance_schedule_last_success_timestamp_seconds", {"schedule": name}
    )
    assert ran_at is not None
    async with resources.connection() as conn:
        await conn.execute(
            "UPDATE schedule_runs SET finished_at = '2026-05-01T00:00:07Z' WHERE name = %s",
            (name,),
        )
    await housekeeping(resources, [name])
    assert (
        REGISTRY.get_sample_value(
            "appliance_schedule_last_success_timestamp_seconds", {"schedule": name}
        )
        == datetime(2026, 5, 1, 0, 0, 7, tzinfo=UTC).timestamp()
    )


async def test_a_running_scheduler_closes_runs_cut_off_meanwhile(
    resources: Resources, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reconciliation happens between runs too, however close together the ticks are."""
    monkeypatch.setattr(scheduler, "RECONCILE_EVERY", 0.3)
    name = f"test_loop_{uuid.uuid4().hex[:6]}"
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_scheduler(resources, stop, [counting_entry(name, [], "* * * * * *")])
    )
    await asyncio.sleep(0.5)  # started: its first reconciliation is behind it
    dead = await claim(resources, name, datetime(2026, 6, 1, tzinfo=UTC))
    assert dead is not None
    await dead.close()
    try:
        while (await rows(resources, name))[0][0] == "running":
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await task
    assert (await rows(resources, name))[0] == ("failed", {}, OWNER_GONE)
