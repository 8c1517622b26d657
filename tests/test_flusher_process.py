"""`appliance run flusher` as real processes while the test publishes: a flusher that kills
itself (SIGKILL) at each step of a cut and is restarted, and two flushers sharing the shards
of which one is killed. Every acknowledged message ends up indexed exactly once, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.resources import Resources
from appliance.segments import index
from appliance.segments.flush import CRASH_ENV, CRASH_STEPS
from tests.api_process import APPLIANCE, process_env
from tests.messaging import unique
from tests.segment_check import indexed_records
from tests.support import eventually, write_toml
from tests.test_flusher import (
    backlog,
    flush_settings,
    head,
    migrated_db,
    opened,
    publish,
)

pytestmark = pytest.mark.process

CONVERSATIONS = 6


class FlusherProcess:
    """`appliance run flusher` with its own config file, instance and log."""

    def __init__(self, directory: Path, settings: dict[str, Any], name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.instance = f"{name}-{uuid.uuid4().hex[:6]}"
        settings = {**settings, "appliance": {**settings["appliance"]}}
        settings["appliance"].update(
            roles=["flusher"], instance=self.instance, run_dir=str(directory / "run")
        )
        self.config = write_toml(directory / "config.toml", settings)
        self.log = directory / "flusher.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, crash_at: str | None = None) -> None:
        env = process_env(self.config)
        if crash_at:
            env[CRASH_ENV] = crash_at
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(APPLIANCE), "run", "flusher"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def exited(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return await asyncio.to_thread(self.proc.wait, timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.exited()


class Traffic:
    """Publishes round-robin to a few conversations until stopped; remembers each ack."""

    def __init__(self, res: Resources) -> None:
        self.res = res
        self.acked: dict[str, list[int]] = {unique("c"): [] for _ in range(CONVERSATIONS)}
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            for conversation, seqs in self.acked.items():
                seqs += await publish(self.res, conversation, 1, size=100)
            await asyncio.sleep(0.01)

    def __enter__(self) -> Traffic:
        self._task = asyncio.create_task(self._run())
        return self

    async def halt(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()

    async def published(self, n: int) -> bool:
        return all(len(s) >= n for s in self.acked.values())


async def drained_and_exact(res: Resources, traffic: Traffic) -> None:
    """Wait for every acknowledged message to be indexed, then check each once, in order."""

    async def done() -> bool:
        heads = [await head(res, c) for c in traffic.acked]
        return heads == [s[-1] for s in traffic.acked.values()] and await backlog(res) == 0

    await eventually(done, "the backlog drained", 40)
    for conversation, seqs in traffic.acked.items():
        assert seqs == list(range(1, len(seqs) + 1))
        assert [r.seq for r in await indexed_records(res, conversation)] == seqs


@contextlib.asynccontextmanager
async def stack(
    settings: dict[str, Any], fresh_database: Callable[[], str]
) -> AsyncIterator[Resources]:
    dsn = fresh_database()
    await migrated_db(dsn)
    flush_settings(settings, dsn)
    settings["appliance"]["stop_timeout"] = 5.0
    async with opened(settings) as res:
        yield res


async def test_a_flusher_killed_at_each_step_loses_and_repeats_nothing(
    settings: dict[str, Any], fresh_database: Callable[[], str], tmp_path: Path
) -> None:
    async with stack(settings, fresh_database) as res:
        flusher = FlusherProcess(tmp_path / "flusher", settings, "crash")
        with Traffic(res) as traffic:
            for step in CRASH_STEPS:
                flusher.start(crash_at=step)
                # The first cut reaches the step and the process kills itself there.
                assert await flusher.exited() == -signal.SIGKILL, flusher.log.read_text()
                assert f'"step": "{step}"' in flusher.log.read_text()
            flusher.start()
            await eventually(lambda: traffic.published(20), "traffic")
            await traffic.halt()
            try:
                await drained_and_exact(res, traffic)
            finally:
                assert await flusher.stop() == 0, flusher.log.read_text()


async def test_two_flushers_share_the_shards_and_one_takes_over(
    settings: dict[str, Any], fresh_database: Callable[[], str], tmp_path: Path
) -> None:
    async with stack(settings, fresh_database) as res:
        first = FlusherProcess(tmp_path / "a", settings, "a")
        second = FlusherProcess(tmp_path / "b", settings, "b")

        async def owners() -> dict[str, int]:
            async with res.connection() as conn:
                states = await index.shard_states(conn)
            found: dict[str, int] = {}
            for state in states:
                if state.owner is not None:
                    instance = state.owner.rsplit(":", 1)[0]
                    found[instance] = found.get(instance, 0) + 1
            return found

        with Traffic(res) as traffic:
            first.start()
            second.start()
            try:
                shared = await eventually(
                    lambda: _when(owners(), lambda o: len(o) == 2 and sum(o.values()) == 4),
                    "both flushers owning shards",
                )
                assert shared == {first.instance: 2, second.instance: 2}
                first.kill()
                await eventually(
                    lambda: _when(owners(), lambda o: o == {second.instance: 4}),
                    "the survivor owning every shard",
                )
                await eventually(lambda: traffic.published(10), "traffic")
                await traffic.halt()
                await drained_and_exact(res, traffic)
            finally:
                first.kill()
                assert await second.stop() == 0, second.log.read_text()


async def _when(value: Any, test: Callable[[Any], bool]) -> Any:
    got = await value
    return got if test(got) else None


async def test_a_changed_shard_count_stops_the_program(
    settings: dict[str, Any], fresh_database: Callable[[], str], tmp_path: Path
) -> None:
    async with stack(settings, fresh_database) as res:
        async with res.connection() as conn:
            await index.ensure_shards(conn, 4)
        changed = {**settings, "segments": {**settings["segments"], "shards": 8}}
        flusher = FlusherProcess(tmp_path / "f", changed, "shards")
        flusher.start()
        assert await flusher.exited() == 1
        assert "segments.shards: is 8, but the history was written with 4 shards" in (
            flusher.log.read_text()
        )
