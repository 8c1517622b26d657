"""The drill, end to end with real processes: an api (granian) takes continuous publishing over
HTTP while the flusher kills itself (SIGKILL) after the PUT, after the index insert, before the
XACK and after the trim, and is restarted each time; then compaction is killed in the middle
(after its upload) and run again. Afterwards every acknowledged message is readable exactly once,
in order, over HTTP pages in both directions and over a WebSocket resumed from the start, across
all three tiers (compacted history, flush segments, the Redis tail).
"""

from __future__ import annotations

import asyncio
import copy
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from appliance.segments import compact, store
from appliance.segments.flush import CRASH_STEPS, flush_pending
from tests.api_process import ApiProcess, admin_key, api_settings
from tests.messaging import unique
from tests.support import eventually, write_toml
from tests.test_compaction import CRASH_SCRIPT
from tests.test_flusher import backlog, flush_settings, head, migrated_db, opened
from tests.test_flusher_process import FlusherProcess
from tests.test_stream import auth, messages_until, subscribe

pytestmark = pytest.mark.process

CONVERSATIONS = 3
TAIL_MAX = 4  # the flusher trims tails hard: most of the history has to come from S3


class HttpTraffic:
    """Publishes over HTTP round-robin (singles, and a batch every fifth round) until halted;
    remembers every acknowledged seq."""

    def __init__(self, http: httpx.AsyncClient, key: str, conversations: list[str]) -> None:
        self.http, self.key = http, key
        self.acked: dict[str, list[int]] = {c: [] for c in conversations}
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def once(self, batch: bool) -> None:
        for conversation, seqs in self.acked.items():
            path = f"/v1/conversations/{conversation}/messages"
            one = {"type": "text", "body": {"text": f"m{len(seqs)}"}}
            if batch:
                response = await self.http.post(
                    f"{path}/batch", json={"messages": [one] * 3}, headers=auth(self.key)
                )
                assert response.status_code == 201, response.text
                seqs += [ack["seq"] for ack in response.json()["messages"]]
            else:
                response = await self.http.post(path, json=one, headers=auth(self.key))
                assert response.status_code == 201, response.text
                seqs.append(response.json()["seq"])

    async def _run(self) -> None:
        rounds = 0
        while not self._stop.is_set():
            rounds += 1
            await self.once(batch=rounds % 5 == 0)
            await asyncio.sleep(0.01)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def halt(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    def published(self, n: int) -> bool:
        return all(len(s) >= n for s in self.acked.values())


async def pages(http: httpx.AsyncClient, key: str, conversation: str, **query: Any) -> list[int]:
    """Every seq of `conversation` by following next_cursor from `query`, each page ordered."""
    seqs: list[int] = []
    params: dict[str, Any] = dict(query)
    for _ in range(10_000):
        response = await http.get(
            f"/v1/conversations/{conversation}/messages", params=params, headers=auth(key)
        )
        assert response.status_code == 200, response.text
        page = response.json()
        got = [m["seq"] for m in page["messages"]]
        backwards = "after" not in query
        assert got == sorted(got, reverse=backwards), got
        seqs += got
        if page["next_cursor"] is None:
            return seqs
        params = {"cursor": page["next_cursor"], "limit": query["limit"]}
    raise AssertionError("the cursor never ended")


async def test_crashes_at_every_step_lose_and_repeat_nothing_over_http_and_websocket(
    settings: dict[str, Any], fresh_database: Callable[[], str], tmp_path: Path
) -> None:
    dsn = fresh_database()
    await migrated_db(dsn)
    flush_settings(settings, dsn)
    settings["messages"] = {"tail_max": TAIL_MAX}
    async with opened(settings) as res:
        admin = await asyncio.to_thread(admin_key, settings)
        api_config = api_settings(copy.deepcopy(settings), tmp_path / "api")
        api_config["messages"]["tail_max"] = TAIL_MAX
        with ApiProcess(tmp_path / "api", api_config).running() as api:
            async with httpx.AsyncClient(base_url=api.url, timeout=30.0) as http:
                conversations = [unique("d") for _ in range(CONVERSATIONS)]
                for conversation in conversations:
                    created = await http.post(
                        "/v1/conversations",
                        json={"conversation": conversation},
                        headers=auth(admin),
                    )
                    assert created.status_code == 201, created.text
                traffic = HttpTraffic(http, admin, conversations)
                traffic.start()

                # The flusher dies at each step of a cut in turn, then runs to the end.
                flusher = FlusherProcess(tmp_path / "flusher", settings, "drill")
                for step in CRASH_STEPS:
                    flusher.start(crash_at=step)
                    assert await flusher.exited() == -9, flusher.log.read_text()
                flusher.start()

                async def enough() -> bool:
                    return traffic.published(40)

                await eventually(enough, "traffic")
                await traffic.halt()

                async def drained() -> bool:
                    heads = [await head(res, c) for c in conversations]
                    last = [traffic.acked[c][-1] for c in conversations]
                    return heads == last and await backlog(res) == 0

                await eventually(drained, "the backlog drained", 40)
                assert await flusher.stop() == 0, flusher.log.read_text()

                # Compaction dies after its upload, then runs again: one history object.
                day = date(2001, 2, 3)
                async with res.connection() as conn:
                    await conn.execute("SELECT appliance_ensure_flush_partition(%s)", (day,))
                    await conn.execute(
                        "UPDATE segment_blocks SET period = %s WHERE tier = 'flush'", (day,)
                    )
                config_path = write_toml(tmp_path / "compact.toml", settings)
                done = await asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, "-c", CRASH_SCRIPT, str(config_path), day.isoformat()],
                    env={**os.environ, compact.CRASH_ENV: "after_upload"},
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                assert done.returncode == -9, done.stderr
                assert (await compact.compact_day(res, day))["days"] == 1
                assert await res.storage.size(store.history_key(day)) is not None

                # Then more: some flushed into flush segments, the newest only in the tail.
                for _ in range(6):
                    await traffic.once(batch=False)
                await flush_pending(res)
                for _ in range(3):
                    await traffic.once(batch=False)

                async with res.connection() as conn:
                    cur = await conn.execute(
                        "SELECT tier, count(*) FROM segment_blocks GROUP BY tier ORDER BY tier"
                    )
                    tiers = dict(await cur.fetchall())
                assert tiers.get("flush", 0) > 0 and tiers.get("history", 0) > 0, tiers

                for conversation, acked in traffic.acked.items():
                    assert acked == list(range(1, len(acked) + 1))
                    # Only the newest few are in Redis: the rest is read from both S3 tiers.
                    assert await res.redis.xlen(res.keys.tail(conversation)) == TAIL_MAX + 3
                    assert await pages(http, admin, conversation, limit=7) == acked[::-1]
                    assert await pages(http, admin, conversation, after=0, limit=11) == acked
                    one = await http.get(
                        f"/v1/conversations/{conversation}/messages/2", headers=auth(admin)
                    )
                    assert one.status_code == 200 and one.json()["seq"] == 2, one.text

                async with api_socket(api, admin) as ws:
                    for conversation, acked in traffic.acked.items():
                        assert (await subscribe(ws, conversation, since=0))["seq"] == acked[-1]
                        assert await messages_until(ws, conversation, acked[-1]) == acked


def api_socket(api: ApiProcess, key: str) -> Any:
    return connect(api.ws_url, additional_headers=auth(key), open_timeout=10)
