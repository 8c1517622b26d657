"""Conversation exports end to end: the HTTP routes, the `exports.run` job over history spread
across every tier (compacted history, a flush segment, the Redis tail), the object in S3 read
back through the presigned link, progress, crash and retry, failures, `expire_exports`.

Each test has a fresh database and its own Redis key prefix (shard leases are global per
database), as in test_history_tiers. The job runs here by calling its handler with the payload
the request queued, read from pgqueuer's table.
"""

from __future__ import annotations

import asyncio
import base64
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import zstandard
from litestar.testing import AsyncTestClient
from pgqueuer.domain.settings import db_settings

from appliance import multipart
from appliance.api.app import create_app
from appliance.config import Config
from appliance.conversations import retention as conversations_retention
from appliance.exports import jobs as export_jobs
from appliance.exports import retention
from appliance.exports.service import RUN, object_key
from appliance.jobs import entrypoint
from appliance.messages.history import History
from appliance.messages.publish import MessageIn
from appliance.multipart import Upload
from appliance.resources import Resources
from appliance.schedules import SCHEDULES, Run
from appliance.storage import StorageError
from tests.messaging import bearer, issue_key, unique
from tests.support import write_toml
from tests.test_cli import cli
from tests.test_history_tiers import (
    PUBLISHER,
    Message,
    isolate,
    layered,
    migrated_database,
    opened,
    publish,
)

Client = AsyncTestClient[Any]


class Setup:
    def __init__(self, res: Resources, api: Client, admin: str) -> None:
        self.res, self.api, self.admin = res, api, admin

    async def conversation(
        self, members: dict[str, str] | None = None, conversation: str | None = None
    ) -> str:
        conversation = conversation or unique("x")
        spec: dict[str, Any] = {"conversation": conversation}
        if members:
            spec["members"] = [{"principal": p, "role": r} for p, r in members.items()]
        made = await self.api.post("/v1/conversations", json=spec, headers=bearer(self.admin))
        assert made.status_code == 201, made.text
        return conversation

    async def request(self, conversation: str, key: str) -> dict[str, Any]:
        response = await self.api.post(
            f"/v1/conversations/{conversation}/exports", headers=bearer(key)
        )
        assert response.status_code == 202, response.text
        body: dict[str, Any] = response.json()
        return body

    async def show(self, export_id: str, key: str) -> dict[str, Any]:
        response = await self.api.get(f"/v1/exports/{export_id}", headers=bearer(key))
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def queued(self, export_id: str) -> bytes:
        """The payload of the export's queued job (the request enqueued it with the row)."""
        table = db_settings().queue_table
        async with self.res.connection() as conn:
            cur = await conn.execute(
                f"SELECT payload FROM {table} WHERE entrypoint = %s",
                (RUN,),
            )
            payloads = [bytes(row[0]) for row in await cur.fetchall()]
        mine = [p for p in payloads if msgspec.json.decode(p)["export"] == export_id]
        assert len(mine) == 1, payloads
        return mine[0]

    async def run(self, export_id: str) -> None:
        await export_jobs.run(self.res, await self.queued(export_id))

    async def row(self, export_id: str) -> tuple[Any, ...]:
        async with self.res.connection() as conn:
            cur = await conn.execute(
                "SELECT state, attempts, upload_id, error FROM exports WHERE id = %s",
                (export_id,),
            )
            row = await cur.fetchone()
        assert row is not None
        return tuple(row)

    async def objects(self, export_id: str) -> list[str]:
        """Every object of the export's runs in the bucket."""
        return sorted(k for k, _ in await self.res.storage.list_keys(prefix(export_id)))

    async def age(self, export_id: str, days: int = 8) -> None:
        """Made `days` earlier, with its conversation (which stays the older)."""
        async with self.res.connection() as conn:
            await conn.execute(
                "UPDATE conversations SET created_at = created_at - make_interval(days => %s)"
                " WHERE id = (SELECT conversation FROM exports WHERE id = %s)",
                (days, export_id),
            )
            await conn.execute(
                "UPDATE exports SET created_at = created_at - make_interval(days => %s)"
                " WHERE id = %s",
                (days, export_id),
            )


@pytest.fixture
async def setup(
    settings: dict[str, Any], fresh_database: Callable[[], str]
) -> AsyncIterator[Setup]:
    """The app (in its client's own event loop) and this test's own resources beside it."""
    isolate(settings, await migrated_database(fresh_database))
    async with (
        opened(settings) as res,
        AsyncTestClient(app=create_app(Config.model_validate(settings))) as api,
    ):
        yield Setup(res, api, await issue_key(res, ["admin"]))


def lines(blob: bytes) -> list[bytes]:
    text = zstandard.ZstdDecompressor().stream_reader(blob).read()
    assert text.endswith(b"\n") or not text
    return text.splitlines()


def prefix(export_id: str) -> str:
    return f"exports/{export_id}."


class Pause:
    """Holds the first call of an async function at its start (or, with `after`, once it has
    returned) until released; later calls pass through."""

    def __init__(self, fn: Callable[..., Any], *, after: bool = False) -> None:
        self.fn, self.after = fn, after
        self.reached, self.release = asyncio.Event(), asyncio.Event()
        self.calls = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        first = self.calls == 1
        if first and not self.after:
            await self._hold()
        result = await self.fn(*args, **kwargs)
        if first and self.after:
            await self._hold()
        return result

    async def _hold(self) -> None:
        self.reached.set()
        await self.release.wait()


async def uploads_in_progress(res: Resources, key: str) -> list[str]:
    answer = await asyncio.to_thread(
        res.storage.s3.list_multipart_uploads, Bucket=res.storage.bucket, Prefix=key
    )
    return [u["UploadId"] for u in answer.get("Uploads", [])]


# -- the whole history, every tier ---------------------------------------------------------------


async def test_export_holds_every_tier_in_order_and_the_link_downloads_it(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    res = setup.res
    conversation = await setup.conversation()
    messages: list[Message] = await layered(res, conversation)  # history, flush, tail
    reader = await issue_key(res, ["read"])
    monkeypatch.setattr(export_jobs, "PAGE", 10)  # several pages, several progress updates

    requested = await setup.request(conversation, reader)
    assert requested["state"] == "queued"
    assert requested["conversation"] == conversation
    assert (requested["messages"], requested["url"]) == (0, None)
    export_id = requested["id"]

    # Progress as a client polling the export sees it, once per page read.
    seen: list[tuple[str, int, int]] = []
    replay = History.replay

    async def observed(self: History, conversation: str, after: int, limit: int) -> list[Message]:
        shown = await setup.show(export_id, reader)
        seen.append((shown["state"], shown["messages"], shown["last_seq"]))
        return await replay(self, conversation, after, limit)

    monkeypatch.setattr(History, "replay", observed)
    await setup.run(export_id)
    assert seen == [("running", n, n) for n in range(0, 60, 10)]

    shown = await setup.show(export_id, reader)
    assert shown["state"] == "ready"
    assert (shown["messages"], shown["last_seq"], shown["head_seq"]) == (55, 55, 55)
    assert shown["url"] and shown["url_expires_at"] and shown["finished_at"]
    downloaded = httpx.get(shown["url"])
    assert downloaded.status_code == 200
    assert len(downloaded.content) == shown["size"]
    assert await setup.objects(export_id) == [object_key(export_id, 1)]
    assert downloaded.content == await res.storage.get(object_key(export_id, 1))
    # Every message in seq order, no gap, no duplicate, exactly as the API shows it.
    assert lines(downloaded.content) == [payload for _, payload in messages]
    assert [msgspec.json.decode(line)["seq"] for line in lines(downloaded.content)] == list(
        range(1, 56)
    )
    assert await uploads_in_progress(res, prefix(export_id)) == []


async def test_a_large_export_goes_up_in_several_parts(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Incompressible bodies past S3's 5 MiB part minimum: two parts and a short last one."""
    res = setup.res
    monkeypatch.setattr(multipart, "PART_BYTES", 5 * 1_048_576)
    parts: list[int] = []
    upload_part = res.storage.upload_part

    async def counted(key: str, upload_id: str, number: int, body: bytes) -> str:
        parts.append(len(body))
        return await upload_part(key, upload_id, number, body)

    monkeypatch.setattr(res.storage, "upload_part", counted)
    conversation = await setup.conversation()
    publisher_bodies = [
        MessageIn(
            type="text",
            body=msgspec.Raw(
                msgspec.json.encode({"b": base64.b64encode(os.urandom(45_000)).decode()})
            ),
        )
        for _ in range(150)
    ]
    from appliance.messages.publish import Publisher

    publisher = Publisher(res.redis, res.keys, res.config.messages, res.connection)
    for start in range(0, 150, 50):
        await publisher.publish(
            conversation, PUBLISHER, publisher_bodies[start : start + 50], None, b"", True
        )
    export_id = (await setup.request(conversation, setup.admin))["id"]
    await setup.run(export_id)
    shown = await setup.show(export_id, setup.admin)
    assert (shown["state"], shown["messages"]) == ("ready", 150)
    assert parts[:-1] == [5 * 1_048_576] * (len(parts) - 1) and len(parts) >= 2
    assert sum(parts) == shown["size"]
    got = lines(await res.storage.get(object_key(export_id, 1)))
    assert [msgspec.json.decode(line)["seq"] for line in got] == list(range(1, 151))


async def test_an_empty_conversation_exports_an_empty_file(setup: Setup) -> None:
    conversation = await setup.conversation()
    export_id = (await setup.request(conversation, setup.admin))["id"]
    await setup.run(export_id)
    shown = await setup.show(export_id, setup.admin)
    assert (shown["state"], shown["messages"], shown["last_seq"]) == ("ready", 0, 0)
    assert lines(httpx.get(shown["url"]).content) == []


# -- a crash, a retry, failures ------------------------------------------------------------------


async def test_a_run_that_crashed_is_run_again_from_the_start(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed mid-export: pgqueuer hands the job out again; the new run aborts the
    first run's multipart upload and writes the whole history."""
    res = setup.res
    conversation = await setup.conversation()
    messages = await layered(res, conversation)
    export_id = (await setup.request(conversation, setup.admin))["id"]
    monkeypatch.setattr(export_jobs, "PAGE", 10)
    replay = History.replay
    stall = asyncio.Event()

    async def stalls(self: History, conversation: str, after: int, limit: int) -> list[Message]:
        if after >= 20:
            stall.set()
            await asyncio.sleep(3600)  # cancelled below, as a killed worker never returns
        return await replay(self, conversation, after, limit)

    monkeypatch.setattr(History, "replay", stalls)
    first = asyncio.create_task(setup.run(export_id))
    await stall.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    state, attempts, upload_id, _ = await setup.row(export_id)
    assert (state, attempts) == ("running", 1) and upload_id is not None
    assert await uploads_in_progress(res, prefix(export_id)) == [upload_id]
    shown = await setup.show(export_id, setup.admin)
    assert (shown["messages"], shown["last_seq"]) == (20, 20)

    monkeypatch.setattr(History, "replay", replay)
    await setup.run(export_id)
    assert (await setup.row(export_id))[:3] == ("ready", 2, None)
    assert await uploads_in_progress(res, prefix(export_id)) == []
    assert await setup.objects(export_id) == [object_key(export_id, 2)]  # the second run's
    got = lines(await res.storage.get(object_key(export_id, 2)))
    assert got == [payload for _, payload in messages]


async def test_a_job_that_keeps_crashing_gives_up(setup: Setup) -> None:
    conversation = await setup.conversation()
    export_id = (await setup.request(conversation, setup.admin))["id"]
    async with setup.res.connection() as conn:
        await conn.execute(
            "UPDATE exports SET state = 'running', attempts = %s WHERE id = %s",
            (export_jobs.MAX_ATTEMPTS, export_id),
        )
    await setup.run(export_id)
    state, attempts, _, error = await setup.row(export_id)
    assert (state, attempts) == ("failed", export_jobs.MAX_ATTEMPTS + 1)
    assert error == "gave up after 3 runs that did not finish; the last: its worker stopped"
    assert (await setup.show(export_id, setup.admin))["error"] == error
    # The worker allows the run that gives up: the row never stays running.
    assert entrypoint(RUN).attempts_allowed(setup.res.config) == export_jobs.MAX_ATTEMPTS + 1


async def test_s3_failing_mid_export_fails_it_and_leaves_no_object(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    res = setup.res
    conversation = await setup.conversation()
    await layered(res, conversation)
    export_id = (await setup.request(conversation, setup.admin))["id"]

    async def refused(key: str, upload_id: str, etags: list[str]) -> None:
        raise StorageError("complete_multipart_upload", "InternalError", "InternalError")

    monkeypatch.setattr(res.storage, "complete_upload", refused)
    with pytest.raises(StorageError):
        await setup.run(export_id)
    state, _, upload_id, error = await setup.row(export_id)
    assert (state, upload_id) == ("failed", None)
    assert error == "S3 complete_multipart_upload failed: InternalError"
    assert await setup.objects(export_id) == []
    assert await uploads_in_progress(res, prefix(export_id)) == []
    shown = await setup.show(export_id, setup.admin)
    assert (shown["state"], shown["url"]) == ("failed", None)

    # The worker's retry runs it again; a run that has to give up keeps the last reason.
    monkeypatch.setattr(export_jobs, "MAX_ATTEMPTS", 1)
    await setup.run(export_id)
    error = (await setup.row(export_id))[3]
    assert error == f"gave up after 1 runs that did not finish; the last: {shown['error']}"


async def test_an_upload_that_cannot_be_aborted_is_aborted_by_the_retry(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    res = setup.res
    conversation = await setup.conversation()
    messages = await layered(res, conversation)
    export_id = (await setup.request(conversation, setup.admin))["id"]

    async def refused(*args: Any) -> None:
        raise StorageError("s3", "ServiceUnavailable", "ServiceUnavailable")

    monkeypatch.setattr(res.storage, "complete_upload", refused)
    monkeypatch.setattr(res.storage, "abort_upload", refused)
    with pytest.raises(StorageError):
        await setup.run(export_id)
    state, _, upload_id, _ = await setup.row(export_id)
    assert state == "failed" and upload_id is not None
    assert await uploads_in_progress(res, prefix(export_id)) == [upload_id]
    # A retry while S3 still refuses fails aborting it: the row keeps it.
    with pytest.raises(StorageError):
        await setup.run(export_id)
    assert (await setup.row(export_id))[:3] == ("failed", 2, upload_id)

    monkeypatch.undo()
    await setup.run(export_id)  # the worker's next retry
    assert (await setup.row(export_id))[:3] == ("ready", 3, None)
    assert await uploads_in_progress(res, prefix(export_id)) == []
    assert await setup.objects(export_id) == [object_key(export_id, 3)]
    assert lines(await res.storage.get(object_key(export_id, 3))) == [p for _, p in messages]


async def test_a_deleted_conversation_fails_its_export(setup: Setup) -> None:
    conversation = await setup.conversation()
    export_id = (await setup.request(conversation, setup.admin))["id"]
    deleted = await setup.api.delete(
        f"/v1/conversations/{conversation}", headers=bearer(setup.admin)
    )
    assert deleted.status_code == 204, deleted.text
    await setup.run(export_id)
    assert (await setup.row(export_id))[0::3] == ("failed", "the conversation was deleted")
    assert await setup.objects(export_id) == []


async def test_a_job_for_an_export_done_or_unknown_changes_nothing(setup: Setup) -> None:
    conversation = await setup.conversation()
    export_id = (await setup.request(conversation, setup.admin))["id"]
    await setup.run(export_id)
    before = await setup.row(export_id)
    await setup.run(export_id)  # the same job again (at least once delivery)
    assert await setup.row(export_id) == before == ("ready", 1, None, None)
    unknown = msgspec.json.encode({"export": "0" * 26})
    await export_jobs.run(setup.res, unknown)


# -- superseded runs: each run writes only its own object ---------------------------------------


async def test_a_run_superseded_before_it_records_its_upload_leaves_the_newer_object_alone(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run A is held between starting its upload and recording it in the row; run B (the job
    handed out again) takes the row over and finishes. A, released, writes nothing, though a
    message arrived meanwhile (A would have exported one more): B's object stays B's."""
    res = setup.res
    conversation = await setup.conversation()
    messages = await publish(res, conversation, 5)
    export_id = (await setup.request(conversation, setup.admin))["id"]
    started = Pause(Upload.start, after=True)
    monkeypatch.setattr(Upload, "start", started)
    first = asyncio.create_task(setup.run(export_id))
    await started.reached.wait()
    await setup.run(export_id)  # run B
    assert (await setup.row(export_id))[:3] == ("ready", 2, None)
    await publish(res, conversation, 1)
    started.release.set()
    await first
    assert (await setup.row(export_id))[:3] == ("ready", 2, None)
    assert await setup.objects(export_id) == [object_key(export_id, 2)]
    assert await uploads_in_progress(res, prefix(export_id)) == []
    blob = await res.storage.get(object_key(export_id, 2))
    assert len(blob) == (await setup.show(export_id, setup.admin))["size"]
    assert lines(blob) == [payload for _, payload in messages]


async def test_a_run_superseded_after_completing_its_object_leaves_it_to_retention(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run A completes its object, then run B takes the row over and finishes. A deletes its
    own object; S3 refusing that, A logs it and returns (the row is B's now): retention deletes
    every run's object with the row."""
    res = setup.res
    conversation = await setup.conversation()
    messages = await publish(res, conversation, 5)
    export_id = (await setup.request(conversation, setup.admin))["id"]
    at_ready = Pause(export_jobs._ready)
    monkeypatch.setattr(export_jobs, "_ready", at_ready)
    first = asyncio.create_task(setup.run(export_id))
    await at_ready.reached.wait()
    assert await setup.objects(export_id) == [object_key(export_id, 1)]  # A's, complete
    await setup.run(export_id)  # run B
    assert await setup.objects(export_id) == [object_key(export_id, 1), object_key(export_id, 2)]

    async def refused(key: str) -> None:
        raise StorageError("delete_object", "ServiceUnavailable", "ServiceUnavailable")

    monkeypatch.setattr(res.storage, "delete", refused)
    at_ready.release.set()
    await first  # no error: the job is B's now, and a retry would take the row from B
    assert (await setup.row(export_id))[:2] == ("ready", 2)
    assert lines(await res.storage.get(object_key(export_id, 2))) == [p for _, p in messages]

    await setup.age(export_id)
    expected = {"exports": 1, "purged": 0, "objects": 1}
    assert await retention.run(res, Run()) == expected
    assert await setup.objects(export_id) == []


# -- who may export ------------------------------------------------------------------------------


async def test_only_who_may_read_the_conversation_exports_or_sees_exports(setup: Setup) -> None:
    res = setup.res
    member_name = unique("member")
    member = await issue_key(res, ["subscribe"], name=member_name)  # no read scope
    conversation = await setup.conversation({f"key:{member_name}": "reader"})
    outsider = await issue_key(res, ["publish"])
    other_prefix = await issue_key(res, ["read"], prefix="elsewhere-")

    export_id = (await setup.request(conversation, member))["id"]  # a member needs no scope
    assert (await setup.show(export_id, member))["id"] == export_id
    for key in (outsider, other_prefix):
        refused = await setup.api.post(
            f"/v1/conversations/{conversation}/exports", headers=bearer(key)
        )
        assert refused.status_code == 403, refused.text
        hidden = await setup.api.get(f"/v1/exports/{export_id}", headers=bearer(key))
        assert hidden.status_code == 404, hidden.text
        assert hidden.json()["error"]["code"] == "not_found"
    for missing in (str(uuid.uuid4()), "0" * 26, "01J" + "Z" * 23):
        absent = await setup.api.get(f"/v1/exports/{missing}", headers=bearer(setup.admin))
        assert absent.status_code == 404, absent.text
    nowhere = await setup.api.post(
        f"/v1/conversations/{unique('none')}/exports", headers=bearer(setup.admin)
    )
    assert nowhere.status_code == 404
    anonymous = await setup.api.get(f"/v1/exports/{export_id}")
    assert anonymous.status_code == 401


# -- export.ready ----------------------------------------------------------------------------------


async def test_ready_emits_export_ready_in_the_same_transaction(setup: Setup) -> None:
    res = setup.res
    async with res.connection() as conn:
        await conn.execute(
            "INSERT INTO webhook_endpoints (id, url, events, secret)"
            " VALUES (%s, 'https://example.com/hook', '{export.ready}', 's')",
            (unique("wh"),),
        )
    conversation = await setup.conversation()
    await layered(res, conversation)
    export_id = (await setup.request(conversation, setup.admin))["id"]
    await setup.run(export_id)
    table = db_settings().queue_table
    async with res.connection() as conn:
        cur = await conn.execute(
            f"SELECT payload FROM {table} WHERE entrypoint = 'webhooks.deliver'"
        )
        deliveries = [msgspec.json.decode(bytes(r[0])) for r in await cur.fetchall()]
    events = [e for d in deliveries for e in d["events"] if e["type"] == "export.ready"]
    assert len(events) == 1
    assert events[0]["conversation"] == conversation
    assert events[0]["data"] == {
        "export": export_id,
        "messages": 55,
        "last_seq": 55,
        "size": (await setup.show(export_id, setup.admin))["size"],
    }


# -- expire_exports ------------------------------------------------------------------------------


async def test_expire_exports_deletes_exactly_the_old_ones_and_dry_run_nothing(
    setup: Setup,
) -> None:
    res = setup.res
    conversation = await setup.conversation()
    await layered(res, conversation)
    ids = [(await setup.request(conversation, setup.admin))["id"] for _ in range(5)]
    for export_id in ids[:4]:
        await setup.run(export_id)
    # ids[4] stays queued. Old: two ready ones and the queued one.
    old, young = [ids[0], ids[1], ids[4]], [ids[2], ids[3]]
    for export_id in old:
        await setup.age(export_id)

    async def snapshot() -> tuple[list[str], dict[str, str]]:
        # The bucket is the run's: other tests' exports are there too.
        objects = sorted([k for i in ids for k in await setup.objects(i)])
        async with res.connection() as conn:
            cur = await conn.execute("SELECT id, state FROM exports")
            return objects, dict(await cur.fetchall())  # type: ignore[arg-type]

    before = await snapshot()
    assert before[0] == sorted(object_key(i, 1) for i in ids[:4])
    entry = next(e for e in SCHEDULES if e.name == "expire_exports")
    assert entry.retention

    counts = await retention.run(res, Run(dry_run=True))
    assert counts == {"exports": 3, "purged": 0, "objects": 2}
    assert await snapshot() == before

    progress: list[tuple[int, int | None]] = []
    counts = await entry.run(res, Run(progress=lambda done, total: progress.append((done, total))))
    assert counts == {"exports": 3, "purged": 0, "objects": 2}
    assert progress[0] == (0, 3) and progress[-1] == (3, 3)
    objects, states = await snapshot()
    assert objects == sorted(object_key(i, 1) for i in young)
    assert {i: states[i] for i in old} == dict.fromkeys(old, "expired")
    assert {i: states[i] for i in young} == dict.fromkeys(young, "ready")
    shown = await setup.show(ids[0], setup.admin)
    assert (shown["state"], shown["url"]) == ("expired", None)
    # The queued one's job, run late, finds its export expired and writes nothing.
    await setup.run(ids[4])
    assert (await snapshot())[0] == objects

    assert await retention.run(res, Run()) == {"exports": 0, "purged": 0, "objects": 0}


async def test_expire_exports_deletes_the_object_of_a_run_still_going(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An old export whose run has completed its object but not marked the row ready: retention
    deletes the object with the rest; the run then finds its row expired."""
    res = setup.res
    conversation = await setup.conversation()
    await publish(res, conversation, 5)
    export_id = (await setup.request(conversation, setup.admin))["id"]
    await setup.age(export_id)
    at_ready = Pause(export_jobs._ready)
    monkeypatch.setattr(export_jobs, "_ready", at_ready)
    running = asyncio.create_task(setup.run(export_id))
    await at_ready.reached.wait()
    assert await setup.objects(export_id) == [object_key(export_id, 1)]
    assert await retention.run(res, Run()) == {"exports": 1, "purged": 0, "objects": 0}
    assert await setup.objects(export_id) == []
    at_ready.release.set()
    await running
    assert (await setup.row(export_id))[0] == "expired"
    assert await setup.objects(export_id) == []


@pytest.mark.parametrize("s3_refuses", [False, True], ids=["deleted", "s3-refuses"])
async def test_a_run_that_completes_after_retention_passed_deletes_its_object(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, s3_refuses: bool
) -> None:
    """Retention selects a running export before its run has recorded its upload (nothing to
    abort) and deletes its objects (none yet); before it marks the row expired, the run
    completes its object. The run, finding the row expired, deletes it; if S3 refuses, the run
    raises and the job's retry deletes what is left."""
    res = setup.res
    conversation = await setup.conversation()
    await publish(res, conversation, 5)
    export_id = (await setup.request(conversation, setup.admin))["id"]
    await setup.age(export_id)
    started = Pause(Upload.start, after=True)
    monkeypatch.setattr(Upload, "start", started)
    at_ready = Pause(export_jobs._ready)
    monkeypatch.setattr(export_jobs, "_ready", at_ready)
    swept = Pause(res.storage.delete_many, after=True)
    monkeypatch.setattr(res.storage, "delete_many", swept)

    running = asyncio.create_task(setup.run(export_id))
    await started.reached.wait()  # the run: upload started, not recorded
    sweep = asyncio.create_task(retention.run(res, Run()))
    await swept.reached.wait()  # retention: selected, deleted, not yet marked expired
    started.release.set()
    await at_ready.reached.wait()  # the run: object complete
    assert await setup.objects(export_id) == [object_key(export_id, 1)]
    swept.release.set()
    assert await sweep == {"exports": 1, "purged": 0, "objects": 0}

    async def refused(key: str) -> None:
        raise StorageError("delete_object", "ServiceUnavailable", "ServiceUnavailable")

    if s3_refuses:
        monkeypatch.setattr(res.storage, "delete", refused)
    at_ready.release.set()
    if s3_refuses:
        with pytest.raises(StorageError):
            await running
        assert await setup.objects(export_id) == [object_key(export_id, 1)]
        await setup.run(export_id)  # the worker's retry: the export is expired
    else:
        await running
    assert await setup.objects(export_id) == []
    assert (await setup.row(export_id))[0] == "expired"


# -- a purged conversation -----------------------------------------------------------------------


async def test_a_purged_conversation_s_exports_are_hidden_from_its_successor_then_deleted(
    setup: Setup,
) -> None:
    res = setup.res
    conversation = await setup.conversation()  # no messages: nothing for the flusher to wait on
    old = (await setup.request(conversation, setup.admin))["id"]
    await setup.run(old)
    deleted = await setup.api.delete(
        f"/v1/conversations/{conversation}", headers=bearer(setup.admin)
    )
    assert deleted.status_code == 204, deleted.text
    async with res.connection() as conn:
        await conn.execute(
            "UPDATE conversations SET deleted_at = now() - interval '2 days' WHERE id = %s",
            (conversation,),
        )
    assert (await conversations_retention.purge(res, Run()))["conversations"] == 1

    # The id created again, with a reader of its own: the old export is nobody's.
    reader_name = unique("reader")
    reader = await issue_key(res, ["subscribe"], name=reader_name)
    await setup.conversation({f"key:{reader_name}": "reader"}, conversation)
    for key in (reader, setup.admin):
        hidden = await setup.api.get(f"/v1/exports/{old}", headers=bearer(key))
        assert hidden.status_code == 404, hidden.text
    new = (await setup.request(conversation, reader))["id"]
    assert (await setup.show(new, reader))["state"] == "queued"

    expected = {"exports": 0, "purged": 1, "objects": 1}
    assert await retention.run(res, Run(dry_run=True)) == expected
    assert await setup.objects(old) == [object_key(old, 1)]
    assert await retention.run(res, Run()) == expected
    assert await setup.objects(old) == []
    async with res.connection() as conn:
        cur = await conn.execute("SELECT id FROM exports")
        assert [r[0] for r in await cur.fetchall()] == [new]
    assert (await setup.show(new, reader))["state"] == "queued"

    # An object a run completed and then died with: the job's next delivery deletes it.
    await res.storage.put(object_key(old, 2), b"left behind")
    await setup.run(old)
    assert await setup.objects(old) == []


# -- appliance export ----------------------------------------------------------------------------


async def test_the_export_command_writes_the_file(
    setup: Setup, settings: dict[str, Any], tmp_path: Path
) -> None:
    conversation = await setup.conversation()
    messages = await layered(setup.res, conversation)
    config = write_toml(tmp_path / "c.toml", settings)
    out = tmp_path / "out.jsonl.zst"
    done = await asyncio.to_thread(cli, config, "export", conversation, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"{out}: 55 messages up to seq 55" in done.stdout
    assert lines(out.read_bytes()) == [payload for _, payload in messages]
    export_id = done.stdout.rsplit("export ", 1)[1].rstrip(")\n")
    shown = await setup.show(export_id, setup.admin)  # recorded like any other export
    assert (shown["state"], shown["size"]) == ("ready", out.stat().st_size)

    missing = await asyncio.to_thread(cli, config, "export", unique("none"), "--out", str(out))
    assert missing.returncode == 1
    assert "no conversation" in missing.stderr
