"""The scheduler over real PostgreSQL: several schedulers never run one tick twice, a schedule
never runs twice at once (a tick that comes while it runs is skipped, for the scheduler and for
`appliance retention run` alike), and a run cut off with its owner (the owner's session ends
without closing the row) is closed as failed while a run whose owner lives is left alone."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import structlog
from prometheus_client import REGISTRY

from appliance.cli import retention_cmd
from appliance.config.model import Schedule
from appliance.programs import scheduler
from appliance.programs.scheduler import (
    BUSY,
    OWNER_GONE,
    claim,
    execute,
    housekeeping,
    reconcile_runs,
    run_scheduler,
    run_tick,
)
from appliance.resources import Resources
from appliance.schedules import SCHEDULES, Entry, Run
from tests.support import eventually

WITHIN = 30.0  # seconds a run gets to start before the test fails saying so


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
    try:

        async def three() -> bool:
            return len(await rows(resources, name)) >= 3

        await eventually(three, "three ticks recorded by two schedulers ticking every second")
    finally:
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
    for t in ticks:  # (two ticks of one schedule at once: test_a_tick_while_..._is_skipped)
        await asyncio.gather(*(run_tick(resources, entry, t) for _ in range(3)))
    assert len(calls) == 4
    assert [status for status, _, _ in await rows(resources, name)] == ["ok"] * 4
    # A tick another claimer has is taken, not a skip of a busy schedule.
    labels = {"schedule": name, "status": "skipped"}
    assert REGISTRY.get_sample_value("appliance_schedule_runs_total", labels) is None


async def test_a_run_whose_owner_is_gone_is_closed_as_failed(resources: Resources) -> None:
    # Two schedules: one schedule never has two runs going at once.
    dead_name = f"test_crash_{uuid.uuid4().hex[:6]}"
    live_name = f"test_alive_{uuid.uuid4().hex[:6]}"
    tick = datetime(2026, 4, 1, 3, 0, tzinfo=UTC)
    dead = await claim(resources, dead_name, tick)
    live = await claim(resources, live_name, tick)
    assert dead is not None and live is not None
    # The owner dies: its session ends without the row being closed.
    await dead.close()
    try:
        assert await reconcile_runs(resources) >= 1
        async with resources.connection() as conn:
            cur = await conn.execute(
                "SELECT name, status, error, finished_at IS NOT NULL FROM schedule_runs"
                " WHERE name = ANY(%s) ORDER BY name = %s DESC",
                ([dead_name, live_name], dead_name),
            )
            found = await cur.fetchall()
        assert [(n, s, e, f) for n, s, e, f in found] == [
            (dead_name, "failed", OWNER_GONE, True),
            (live_name, "running", None, False),  # its owner holds the lock: still going
        ]
        # The tick stays taken: nobody runs it again.
        assert await claim(resources, dead_name, tick) is None
    finally:
        await live.close()
    await housekeeping(resources, [live_name])
    assert [status for status, _, _ in await rows(resources, live_name)] == ["failed"]


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
    cut_off = f"test_cut_{uuid.uuid4().hex[:6]}"  # not the running schedule: its lock is free
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_scheduler(resources, stop, [counting_entry(name, [], "* * * * * *")])
    )
    try:

        async def ticked() -> bool:
            return bool(await rows(resources, name))  # past its first reconciliation

        await eventually(ticked, "a first tick of a scheduler ticking every second")
        dead = await claim(resources, cut_off, datetime(2026, 6, 1, tzinfo=UTC))
        assert dead is not None
        await dead.close()

        async def closed() -> bool:
            return (await rows(resources, cut_off))[0][0] != "running"

        await eventually(closed, "the running scheduler closing a run whose owner is gone")
    finally:
        stop.set()
        await task
    assert (await rows(resources, cut_off))[0] == ("failed", {}, OWNER_GONE)


async def test_a_tick_while_the_schedule_still_runs_is_skipped(
    resources: Resources, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run outlasting its period: the next tick (another scheduler's) and an operator's
    `appliance retention run` are skipped, not run alongside; once it ends, ticks run again."""
    name = f"test_long_{uuid.uuid4().hex[:6]}"
    calls: list[datetime] = []
    started, release = asyncio.Event(), asyncio.Event()

    async def long_run(res: Resources, run: Run) -> dict[str, int]:
        calls.append(datetime.now(UTC))
        if len(calls) == 1:  # the first run is the long one
            started.set()
            await release.wait()
        return {"ran": 1}

    entry = Entry(
        name, lambda c: Schedule.model_construct(enabled=True, cron="* * * * *"), long_run
    )
    tick = datetime(2026, 7, 1, 3, 0, tzinfo=UTC)
    first = asyncio.create_task(execute(resources, entry, tick, Run()))
    try:
        await asyncio.wait_for(started.wait(), WITHIN)
        labels = {"schedule": name, "status": "skipped"}
        with structlog.testing.capture_logs() as logs:
            # Another scheduler process at the next tick.
            skipped = await execute(resources, entry, tick + timedelta(minutes=1), Run())
        assert skipped is not None and (skipped.status, skipped.error) == ("skipped", BUSY)
        assert [e["event"] for e in logs if e.get("schedule") == name] == ["schedule_busy"]
        assert REGISTRY.get_sample_value("appliance_schedule_runs_total", labels) == 1
        # The operator's command: skipped too, and it exits non-zero.
        assert await retention_cmd._run(resources.config, [entry], False, tty=False) is False
        assert f"{name}: already running (skipped)" in capsys.readouterr().out
        # The running tick itself, claimed again by another scheduler: taken, not skipped.
        assert await execute(resources, entry, tick, Run()) is None
        assert REGISTRY.get_sample_value("appliance_schedule_runs_total", labels) == 2
        assert len(calls) == 1, "a second run started while the first was going"
    finally:
        release.set()
        outcome = await first
    assert outcome is not None and outcome.status == "ok"
    # Skipped ticks leave no row: only the run that happened is recorded.
    assert await rows(resources, name) == [("ok", {"ran": 1}, None)]
    after = await execute(resources, entry, tick + timedelta(minutes=2), Run())
    assert after is not None and after.status == "ok" and len(calls) == 2


async def test_prune_job_log_prunes_old_schedule_runs_but_each_schedules_last(
    resources: Resources,
) -> None:
    """Past 30 days a run's row goes, except each schedule's newest row and newest success
    (what `appliance status` and the last-success gauge read) and a row still running."""
    busy, idle = f"test_prune_{uuid.uuid4().hex[:6]}", f"test_idle_{uuid.uuid4().hex[:6]}"
    base = datetime(2025, 1, 1, tzinfo=UTC)
    # (schedule, tick in days after base, status, days ago started)
    made = [
        (busy, 0, "running", 55),  # reconciliation's business, never pruned
        (busy, 1, "ok", 50),  # goes
        (busy, 2, "ok", 45),  # the newest success: kept
        (busy, 3, "failed", 40),  # goes
        (busy, 4, "failed", 1),  # recent
        (idle, 0, "ok", 60),  # a schedule disabled long ago: its last row stays
    ]
    async with resources.connection() as conn:
        await conn.execute(
            "INSERT INTO schedule_runs (name, tick, instance, started_at, finished_at, status)"
            " SELECT n, %s + make_interval(days => t), 'test', now() - make_interval(days => a),"
            " CASE WHEN s = 'running' THEN NULL ELSE now() - make_interval(days => a) END, s"
            " FROM unnest(%s::text[], %s::int[], %s::text[], %s::int[]) AS r(n, t, s, a)",
            (base, *map(list, zip(*made, strict=True))),
        )
    entry = next(e for e in SCHEDULES if e.name == "prune_job_log")
    would = await entry.run(resources, Run(dry_run=True))
    assert would["schedule_runs_deleted"] >= 2
    assert len(await rows(resources, busy)) == 5, "a dry run deletes nothing"
    done = await entry.run(resources, Run())
    assert done["schedule_runs_deleted"] == would["schedule_runs_deleted"]
    assert "deleted" in done  # the job log's count, apart
    async with resources.connection() as conn:
        cur = await conn.execute(
            "SELECT name, tick FROM schedule_runs WHERE name = ANY(%s) ORDER BY name, tick",
            ([busy, idle],),
        )
        kept = [(n, (t - base).days) for n, t in await cur.fetchall()]
    assert kept == sorted([(busy, 0), (busy, 2), (busy, 4), (idle, 0)])
