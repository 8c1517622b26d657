"""Attachments end to end over the real app, PostgreSQL and the moto S3 server: a presigned upload
made with a plain multipart form POST (as a browser makes it), verification, publishing a message
that references it, the download link, and expire_uploads.

moto's server does not check POST policies (nor their signatures or expiry): an upload of other
bytes or another type than the policy allows is stored all the same. So the policy document is
read and checked here as S3 would be told it, and what our code enforces whatever S3 does (the
verification job) is tested with the uploads moto lets through. Against a real S3 such an upload
is refused with 403 before it is stored; the tests accept either answer and check what follows.
moto also ignores CopyObject's x-amz-copy-source-if-match (5.2.6 checks only if-none-match), so
an upload written again between the check's HEAD and its copy is copied all the same: the check
of the copy is what keeps it out, and that is what is tested here.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec
import pytest
from litestar.testing import AsyncTestClient
from pgqueuer.domain.settings import db_settings
from prometheus_client import REGISTRY
from ulid import ULID

from appliance.api.app import create_app
from appliance.attachments import jobs as attachment_jobs
from appliance.attachments import retention
from appliance.config import Config
from appliance.programs.worker import run_worker
from appliance.resources import Resources
from appliance.schedules import SCHEDULES, Run
from appliance.storage import Head, Storage, StorageError
from tests.messaging import bearer, issue_key, unique
from tests.support import free_port, migrated_db
from tests.test_history_tiers import isolate, migrated_database, opened
from tests.test_outages import once_back

Client = AsyncTestClient[Any]
TEXT = b"hello, attachments"


@dataclass
class Room:
    """A conversation with a member, a reader and an outsider (pure-member keys), made by an
    admin key."""

    api: Client
    res: Resources
    conversation: str
    admin: dict[str, str]
    member: dict[str, str]
    member_spec: dict[str, str]  # the member as a conversation's `members` entry
    reader: dict[str, str]
    outsider: dict[str, str]

    async def create(self, **spec: Any) -> httpx.Response:
        spec = {"filename": "notes.txt", "content_type": "text/plain", "size": len(TEXT), **spec}
        return await self.api.post(
            f"/v1/conversations/{self.conversation}/attachments", json=spec, headers=self.member
        )

    async def created(self, **spec: Any) -> dict[str, Any]:
        response = await self.create(**spec)
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    async def complete(self, attachment: str, who: dict[str, str] | None = None) -> httpx.Response:
        return await self.api.post(
            f"/v1/attachments/{attachment}/complete", headers=who or self.member
        )

    async def verify(self, attachment: str) -> None:
        """Run the job that `complete` queued (its payload as queued) through its handler."""
        await attachment_jobs.verify(self.res, await queued(self.res, attachment))

    async def keys(self, attachment: str) -> tuple[str, str]:
        """(upload key, file key)."""
        async with self.res.connection() as conn:
            cur = await conn.execute(
                "SELECT upload_key, key FROM attachments WHERE id = %s", (attachment,)
            )
            row = await cur.fetchone()
        assert row is not None
        return row[0], row[1]

    async def state(self, attachment: str) -> tuple[str, str | None]:
        async with self.res.connection() as conn:
            cur = await conn.execute(
                "SELECT state, reason FROM attachments WHERE id = %s", (attachment,)
            )
            row = await cur.fetchone()
        assert row is not None
        return row[0], row[1]

    async def publish(self, attachments: list[Any], **extra: Any) -> httpx.Response:
        body = {"type": "file", "body": {}, "attachments": attachments, **extra}
        return await self.api.post(
            f"/v1/conversations/{self.conversation}/messages", json=body, headers=self.member
        )


async def queued(res: Resources, attachment: str) -> bytes:
    async with res.connection() as conn:
        cur = await conn.execute(
            f"SELECT payload FROM {db_settings().queue_table} WHERE entrypoint = %s",
            (attachment_jobs.VERIFY,),
        )
        payloads = [bytes(row[0]) for row in await cur.fetchall()]
    mine = [p for p in payloads if msgspec.json.decode(p)["attachment"] == attachment]
    assert len(mine) == 1, payloads
    return mine[0]


async def upload(created: dict[str, Any], data: bytes, **override: str) -> httpx.Response:
    """The browser's part: a multipart/form-data POST of the fields, then the file, to S3."""
    form = created["upload"]
    assert form["method"] == "POST"
    fields = {**form["fields"], **override}
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.post(
            form["url"], data=fields, files={"file": ("ignored.bin", data, "text/plain")}
        )


async def make_room(api: Client, res: Resources) -> Room:
    admin = await issue_key(res, ["admin"])
    names = {role: unique(role) for role in ("member", "reader", "outsider")}
    keys = {role: await issue_key(res, [], name=name) for role, name in names.items()}
    conversation = unique("att")
    members = [
        {"principal": f"key:{names['member']}", "role": "member"},
        {"principal": f"key:{names['reader']}", "role": "reader"},
    ]
    made = await api.post(
        "/v1/conversations",
        json={"conversation": conversation, "members": members},
        headers=bearer(admin),
    )
    assert made.status_code == 201, made.text
    return Room(api, res, conversation, bearer(admin), bearer(keys["member"]), members[0],
                bearer(keys["reader"]), bearer(keys["outsider"]))  # fmt: skip


@pytest.fixture
async def room(api: Client, resources: Resources) -> Room:
    return await make_room(api, resources)


def expect(response: httpx.Response, status: int, code: str, field: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["field"]) == (code, field), error


def checks(outcome: str) -> float:
    """appliance_attachment_checks_total{outcome} of this process."""
    value = REGISTRY.get_sample_value("appliance_attachment_checks_total", {"outcome": outcome})
    return value or 0.0


def policy_of(created: dict[str, Any]) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(base64.b64decode(created["upload"]["fields"]["policy"]))
    return document


async def test_upload_verify_publish_download(room: Room) -> None:
    created = await room.created()
    attachment, form = created["id"], created["upload"]
    key = form["fields"]["key"]
    assert key.startswith("attachments/uploads/") and key.endswith(f"/{attachment}")
    assert room.conversation not in key  # a hash of it
    assert form["url"].startswith(room.res.config.s3.endpoint_url)
    assert form["fields"]["x-amz-algorithm"] == "AWS4-HMAC-SHA256"  # SigV4, not SigV2
    assert datetime.fromisoformat(form["expires_at"]) > datetime.now(UTC)
    # What S3 is told to enforce: this key, this bucket, this type, exactly this many bytes.
    conditions = policy_of(created)["conditions"]
    assert {"key": key} in conditions and {"bucket": room.res.config.s3.bucket} in conditions
    assert {"Content-Type": "text/plain"} in conditions
    assert ["content-length-range", len(TEXT), len(TEXT)] in conditions

    posted = await upload(created, TEXT)
    assert posted.status_code == 204, posted.text
    # Uploaded but not verified: neither readable nor publishable.
    expect(await room.api.get(f"/v1/attachments/{attachment}", headers=room.member), 409,
           "attachment_pending", "attachment")  # fmt: skip
    expect(await room.publish([{"id": attachment}]), 409, "attachment_pending", "attachments[0]")

    completed = await room.complete(attachment)
    assert completed.status_code == 202 and completed.json() == {
        "id": attachment,
        "state": "pending",
    }
    verified = checks("verified")
    await room.verify(attachment)
    assert checks("verified") == verified + 1
    assert await room.state(attachment) == ("verified", None)
    upload_key, file_key = await room.keys(attachment)
    assert upload_key == key and file_key.startswith("attachments/files/")
    assert await room.res.storage.head(key) is None  # copied to the file key, then deleted
    # The form is valid until it expires: other bytes of the same size and type land on the
    # upload key again, and downloads never read it.
    other = b"X" * len(TEXT)
    assert (await upload(created, other)).status_code == 204
    assert await room.res.storage.get(key) == other
    again = await room.complete(attachment)
    assert again.status_code == 200 and again.json()["state"] == "verified"

    published = await room.publish([{"id": attachment}])
    assert published.status_code == 201, published.text
    seq = published.json()["seq"]
    message = await room.api.get(
        f"/v1/conversations/{room.conversation}/messages/{seq}", headers=room.reader
    )
    assert message.json()["attachments"] == [
        {"id": attachment, "name": "notes.txt", "size": len(TEXT), "content_type": "text/plain"}
    ]

    shown = await room.api.get(f"/v1/attachments/{attachment}", headers=room.reader)
    assert shown.status_code == 200, shown.text
    info = shown.json()
    assert {k: info[k] for k in ("id", "conversation", "filename", "content_type", "size")} == {
        "id": attachment,
        "conversation": room.conversation,
        "filename": "notes.txt",
        "content_type": "text/plain",
        "size": len(TEXT),
    }
    assert info["state"] == "verified" and info["uploader"].startswith("key:member-")
    async with httpx.AsyncClient(timeout=10) as http:
        downloaded = await http.get(info["download"]["url"])
    assert downloaded.status_code == 200 and downloaded.content == TEXT  # what was verified
    assert downloaded.headers["content-disposition"] == (
        "attachment; filename=\"notes.txt\"; filename*=UTF-8''notes.txt"
    )
    # Others never learn it exists; a deleted conversation's attachments are gone at once.
    path = f"/v1/attachments/{attachment}"
    expect(await room.api.get(path, headers=room.outsider), 404, "not_found", "attachment")
    deleted = await room.api.delete(f"/v1/conversations/{room.conversation}", headers=room.admin)
    assert deleted.status_code == 204, deleted.text
    expect(await room.api.get(path, headers=room.member), 404, "not_found", "attachment")


async def test_a_download_keeps_a_name_in_any_script(room: Room) -> None:
    name = 'rapport d\'été "final".txt'
    created = await room.created(filename=name)
    assert (await upload(created, TEXT)).status_code == 204
    await room.complete(created["id"])
    await room.verify(created["id"])
    shown = await room.api.get(f"/v1/attachments/{created['id']}", headers=room.member)
    assert shown.json()["filename"] == name
    async with httpx.AsyncClient(timeout=10) as http:
        downloaded = await http.get(shown.json()["download"]["url"])
    assert downloaded.content == TEXT
    # ASCII for old clients (quotes and other scripts replaced), UTF-8 for the rest.
    assert downloaded.headers["content-disposition"] == (
        'attachment; filename="rapport d\'_t_ _final_.txt"; '
        "filename*=UTF-8''rapport%20d%27%C3%A9t%C3%A9%20%22final%22.txt"
    )


async def test_who_may_reach_an_attachment(room: Room) -> None:
    attachment = (await room.created())["id"]
    path = f"/v1/attachments/{attachment}"
    # Not a member: as if it did not exist, on every route.
    expect(await room.api.get(path, headers=room.outsider), 404, "not_found", "attachment")
    expect(await room.complete(attachment, room.outsider), 404, "not_found", "attachment")
    # A reader may read (409: not verified) but not complete (publish right needed).
    expect(await room.api.get(path, headers=room.reader), 409, "attachment_pending", "attachment")
    expect(await room.complete(attachment, room.reader), 404, "not_found", "attachment")
    unknown = str(ULID())
    expect(await room.api.get(f"/v1/attachments/{unknown}", headers=room.member), 404,
           "not_found", "attachment")  # fmt: skip
    expect(await room.complete(unknown), 404, "not_found", "attachment")
    expect(await room.api.get("/v1/attachments/nope", headers=room.member), 400, "invalid",
           "attachment")  # fmt: skip
    # Creating one needs the right to publish in the conversation.
    path = f"/v1/conversations/{room.conversation}/attachments"
    spec = {"filename": "a.txt", "content_type": "text/plain", "size": 1}
    expect(await room.api.post(path, json=spec, headers=room.outsider), 403, "not_member", None)
    expect(await room.api.post(path, json=spec, headers=room.reader), 403, "role", None)
    missing = "/v1/conversations/no-such-conversation/attachments"
    expect(await room.api.post(missing, json=spec, headers=room.member), 404, "not_found",
           "conversation")  # fmt: skip


async def test_creation_checks_type_and_size(room: Room) -> None:
    limit = room.res.config.attachments.max_bytes
    expect(await room.create(content_type="application/x-msdownload"), 400, "invalid",
           "content_type")  # fmt: skip
    expect(await room.create(content_type="text/plain; charset=utf-8"), 400, "invalid",
           "content_type")  # fmt: skip
    expect(await room.create(size=limit + 1), 400, "invalid", "size")
    expect(await room.create(size=0), 400, "invalid", "size")
    expect(await room.create(filename="../etc/passwd"), 400, "invalid", "filename")
    expect(await room.create(filename=""), 400, "invalid", "filename")
    expect(await room.create(colour="red"), 400, "invalid", "colour")
    # "image/*" allows the family; types are case-insensitive and kept in lower case.
    created = await room.created(content_type="IMAGE/PNG", size=limit, filename="a.png")
    assert {"Content-Type": "image/png"} in policy_of(created)["conditions"]
    assert ["content-length-range", limit, limit] in policy_of(created)["conditions"]


async def test_verification_rejects_what_was_not_declared(room: Room) -> None:
    # More bytes than declared: the policy's content-length-range refuses them on S3.
    oversize = await room.created(size=5)
    too_long = await upload(oversize, TEXT)
    assert too_long.status_code in (204, 403), too_long.text  # moto stores it; S3 answers 403
    # Another type than declared: the policy's Content-Type condition refuses it on S3.
    retyped = await room.created()
    other_type = await upload(retyped, TEXT, **{"Content-Type": "image/png"})
    assert other_type.status_code in (204, 403), other_type.text
    # Never uploaded at all.
    absent = await room.created()
    reasons = {}
    rejected = checks("rejected")
    for created in (oversize, retyped, absent):
        attachment = created["id"]
        assert (await room.complete(attachment)).status_code == 202
        await room.verify(attachment)
        state, reasons[attachment] = await room.state(attachment)
        assert state == "rejected"
        assert await room.res.storage.head(created["upload"]["fields"]["key"]) is None
        path = f"/v1/attachments/{attachment}"
        expect(await room.api.get(path, headers=room.member), 409, "attachment_rejected",
               "attachment")  # fmt: skip
        expect(await room.complete(attachment), 409, "attachment_rejected", "attachment")
        expect(await room.publish([{"id": attachment}]), 409, "attachment_rejected",
               "attachments[0]")  # fmt: skip
    refused = "nothing was uploaded"  # what S3 refused was never stored
    stored = {
        oversize["id"]: f"the upload is {len(TEXT)} bytes, 5 were declared",
        retyped["id"]: "the upload is image/png, text/plain was declared",
    }
    answers = {oversize["id"]: too_long, retyped["id"]: other_type}
    for attachment, answer in answers.items():
        assert reasons[attachment] == (stored[attachment] if answer.status_code == 204 else refused)
    assert reasons[absent["id"]] == refused
    assert checks("rejected") == rejected + 3


async def test_publish_refuses_references_it_may_not_make(
    api: Client, resources: Resources
) -> None:
    room, other = await make_room(api, resources), await make_room(api, resources)
    mine, theirs = await room.created(), await other.created()
    for where, created in ((room, mine), (other, theirs)):
        assert (await upload(created, TEXT)).status_code == 204
        assert (await where.complete(created["id"])).status_code == 202
        await where.verify(created["id"])
    pending = (await room.created())["id"]
    ok = {"id": mine["id"]}
    # Another conversation's verified upload, and an id that is no upload: the same answer.
    for reference in (theirs["id"], str(ULID())):
        expect(await room.publish([ok, {"id": reference}]), 400, "invalid", "attachments[1]")
    expect(await room.publish([ok, ok]), 400, "invalid", "attachments[1]")
    expect(await room.publish([{**ok, "size": 1}]), 400, "invalid", "attachments[0].size")
    expect(await room.publish([{**ok, "name": "x.txt"}]), 400, "invalid", "attachments[0].name")
    # The batch path names the message too, and publishes none of the batch.
    batch = {
        "messages": [
            {"type": "file", "body": {}, "attachments": [ok]},
            {"type": "file", "body": {}, "attachments": [{"id": pending}]},
        ]
    }
    path = f"/v1/conversations/{room.conversation}/messages"
    refused = await api.post(f"{path}/batch", json=batch, headers=room.member)
    expect(refused, 409, "attachment_pending", "messages[1].attachments[0]")
    page = await api.get(path, headers=room.member)
    assert page.json()["messages"] == []
    batch["messages"][1]["attachments"] = []
    accepted = await api.post(f"{path}/batch", json=batch, headers=room.member)
    assert accepted.status_code == 201, accepted.text
    # The old shape, restating the upload's own metadata, is still accepted.
    restated = {**ok, "name": "notes.txt", "size": len(TEXT), "content_type": "Text/Plain"}
    published = await room.publish([restated])
    assert published.status_code == 201, published.text
    seq = published.json()["seq"]
    message = (await api.get(f"{path}/{seq}", headers=room.member)).json()
    assert message["attachments"] == [{**restated, "content_type": "text/plain"}]


@pytest.fixture
async def own_database(
    settings: dict[str, Any], fresh_database: Callable[[], str]
) -> AsyncIterator[tuple[Client, Resources]]:
    """The app and resources on a database and a bucket of this test's own (exact counts, a
    worker, and no other test's uploads in the listing of the upload prefix)."""
    isolate(settings, await migrated_database(fresh_database))
    settings["s3"]["bucket"] += f"-{uuid.uuid4().hex[:8]}"
    async with (
        opened(settings) as res,
        AsyncTestClient(app=create_app(Config.model_validate(settings))) as api,
    ):
        yield api, res


async def test_verification_through_the_worker(own_database: tuple[Client, Resources]) -> None:
    api, res = own_database
    room = await make_room(api, res)
    created = await room.created()
    assert (await upload(created, TEXT)).status_code == 204
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(res, stop))
    try:
        assert (await room.complete(created["id"])).status_code == 202
        async with asyncio.timeout(30):
            while (await room.state(created["id"]))[0] == "pending":
                await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(worker, 30)
    assert await room.state(created["id"]) == ("verified", None)
    shown = await api.get(f"/v1/attachments/{created['id']}", headers=room.member)
    assert shown.status_code == 200, shown.text


async def _count(res: Resources, ids: list[str]) -> tuple[int, int]:
    """(rows, objects under their upload and file keys) of these uploads."""
    async with res.connection() as conn:
        cur = await conn.execute(
            "SELECT upload_key, key FROM attachments WHERE id = ANY(%s)", (ids,)
        )
        rows = await cur.fetchall()
    objects = [key for row in rows for key in row if await res.storage.head(key) is not None]
    return len(rows), len(objects)


async def test_expire_uploads_deletes_old_unverified_and_orphaned_only(
    own_database: tuple[Client, Resources],
) -> None:
    api, res = own_database
    room, gone = await make_room(api, res), await make_room(api, res)
    names = ("old_pending", "old_rejected", "old_verified", "new_pending", "old_never")
    made = {name: await room.created() for name in names}
    made["orphan"] = await gone.created()
    ids = {name: created["id"] for name, created in made.items()}
    for name in ("old_pending", "old_verified", "new_pending", "orphan"):
        assert (await upload(made[name], TEXT)).status_code == 204
    assert (await upload(made["old_rejected"], b"x" * 3)).status_code in (204, 403)
    for name in ("old_rejected", "old_verified", "orphan"):
        await (gone if name == "orphan" else room).complete(ids[name])
        await room.verify(ids[name])
    assert (await room.state(ids["old_rejected"]))[0] == "rejected"
    assert (await room.state(ids["orphan"]))[0] == "verified"
    # A settled upload's form is still valid until it expires: its object may come back.
    assert (await upload(made["old_rejected"], TEXT)).status_code == 204
    assert (await upload(made["old_verified"], b"Y" * len(TEXT))).status_code == 204
    old = [ids[n] for n in ("old_pending", "old_rejected", "old_verified", "old_never")]
    async with res.connection() as conn:
        await conn.execute(
            "UPDATE attachments SET created_at = now() - interval '25 hours' WHERE id = ANY(%s)",
            (old,),
        )
        await conn.execute(
            "UPDATE conversations SET created_at = now() - interval '2 days' WHERE id = %s",
            (room.conversation,),
        )
        # `gone` is deleted and purged, as conversations/retention.py purges, then created
        # again by the same id: the earlier one's upload is not the new one's.
        for table, column in (("conversation_members", "conversation"), ("conversations", "id")):
            await conn.execute(f"DELETE FROM {table} WHERE {column} = %s", (gone.conversation,))
    # The same key is a member of the new one.
    again = await api.post(
        "/v1/conversations",
        json={"conversation": gone.conversation, "members": [gone.member_spec]},
        headers=gone.admin,
    )
    assert again.status_code == 201, again.text
    orphan = f"/v1/attachments/{ids['orphan']}"
    expect(await api.get(orphan, headers=gone.member), 404, "not_found", "attachment")
    expect(await gone.publish([{"id": ids["orphan"]}]), 400, "invalid", "attachments[0]")

    expired = [ids[n] for n in ("old_pending", "old_rejected", "old_never", "orphan")]
    kept = [ids[n] for n in ("old_verified", "new_pending")]
    assert await _count(res, expired) == (4, 3)
    assert await _count(res, kept) == (2, 3)  # old_verified's file and its upload written again

    entry = next(e for e in SCHEDULES if e.name == "expire_uploads")
    assert entry.retention and entry.run is retention.run
    progress: list[tuple[int, int | None]] = []
    dry = await entry.run(res, Run(dry_run=True, progress=lambda d, t: progress.append((d, t))))
    # Two keys a row, upload and file, asked to be deleted whether they hold anything or not.
    assert dry == {"uploads": 3, "orphaned": 1, "objects": 8, "staging": 1}
    assert await _count(res, expired) == (4, 3) and await _count(res, kept) == (2, 3)

    counts = await entry.run(res, Run(progress=lambda d, t: progress.append((d, t))))
    assert counts == {"uploads": 3, "orphaned": 1, "objects": 8, "staging": 1}
    assert await _count(res, expired) == (0, 0)
    assert await _count(res, kept) == (2, 2)  # new_pending's upload, old_verified's file
    assert progress[-1] == (5, 5)
    assert await entry.run(res, Run()) == {"uploads": 0, "orphaned": 0, "objects": 0, "staging": 0}
    # The kept ones still work: the verified one downloads what was verified.
    shown = await api.get(f"/v1/attachments/{ids['old_verified']}", headers=room.member)
    assert shown.status_code == 200, shown.text
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(shown.json()["download"]["url"])).content == TEXT


async def test_only_publishes_with_attachments_need_postgresql(
    settings: dict[str, Any], private_postgres: tuple[str, Callable[[], None], Callable[[], None]]
) -> None:
    dsn, start, kill = private_postgres
    await migrated_db(dsn)
    isolate(settings, dsn)
    settings["postgres"]["connect_timeout"] = 1.0
    async with (
        opened(settings) as res,
        AsyncTestClient(app=create_app(Config.model_validate(settings))) as api,
    ):
        room = await make_room(api, res)
        created = await room.created()
        assert (await upload(created, TEXT)).status_code == 204
        await room.complete(created["id"])
        await room.verify(created["id"])
        first = await room.publish([{"id": created["id"]}])  # caches the key and its membership
        assert first.status_code == 201, first.text
        kill()
        try:
            expect(await room.publish([{"id": created["id"]}]), 503, "unavailable", None)
            plain = await room.publish([])
            assert plain.status_code == 201, plain.text
            assert plain.json()["seq"] == first.json()["seq"] + 1
        finally:
            start()
        again = await once_back(lambda: room.publish([{"id": created["id"]}]), 201, "postgresql")
        assert again.json()["seq"] == plain.json()["seq"] + 1


async def _jobs(res: Resources, attachment: str) -> int:
    async with res.connection() as conn:
        cur = await conn.execute(
            f"SELECT count(*) FROM {db_settings().queue_table}"
            " WHERE entrypoint = %s AND payload = %s",
            (attachment_jobs.VERIFY, attachment_jobs.payload(attachment)),
        )
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def test_complete_queues_one_check_at_a_time(room: Room) -> None:
    created = await room.created()
    attachment = created["id"]
    assert (await upload(created, TEXT)).status_code == 204
    path = f"/v1/attachments/{attachment}/complete"
    expect(await room.api.post(path, json={"x": 1}, headers=room.member), 400, "invalid", "x")
    assert await _jobs(room.res, attachment) == 0
    accepted = await room.api.post(path, json={}, headers=room.member)
    assert accepted.status_code == 202, accepted.text
    assert await _jobs(room.res, attachment) == 1

    async def requested(ago: str) -> None:
        async with room.res.connection() as conn:
            await conn.execute(
                "UPDATE attachments SET completed_at = now() - %s::interval WHERE id = %s",
                (ago, attachment),
            )

    await requested("-1 hour")  # asked "an hour from now": surely within RECHECK_AFTER
    assert (await room.complete(attachment)).status_code == 202
    assert await _jobs(room.res, attachment) == 1
    await requested("1 minute")  # asked long ago: that check may have failed, ask again
    assert (await room.complete(attachment)).status_code == 202
    assert await _jobs(room.res, attachment) == 2
    # Two jobs for one upload at once: the row's lock makes the second wait, then it finds the
    # upload settled and does nothing (no second copy over the verified file).
    payload = attachment_jobs.payload(attachment)
    verified = checks("verified")
    await asyncio.gather(*(attachment_jobs.verify(room.res, payload) for _ in range(2)))
    assert await room.state(attachment) == ("verified", None)
    assert checks("verified") == verified + 1
    upload_key, file_key = await room.keys(attachment)
    assert await room.res.storage.head(upload_key) is None
    assert await room.res.storage.get(file_key) == TEXT
    # A job for an upload that no longer exists does nothing either.
    await attachment_jobs.verify(room.res, attachment_jobs.payload(str(ULID())))


async def test_a_check_that_meets_s3_down_leaves_the_upload_pending(room: Room) -> None:
    """The job fails (the worker retries it); nothing is decided without S3's answer."""
    created = await room.created()
    attachment = created["id"]
    assert (await upload(created, TEXT)).status_code == 204
    assert (await room.complete(attachment)).status_code == 202
    closed = f"http://127.0.0.1:{free_port()}"
    section = room.res.config.s3.model_copy(update={"endpoint_url": closed, "timeout": 1.0})
    unreachable = dataclasses.replace(room.res, storage=Storage.create(section))
    with pytest.raises(StorageError):
        await attachment_jobs.verify(unreachable, await queued(room.res, attachment))
    assert await room.state(attachment) == ("pending", None)
    assert await room.res.storage.head(created["upload"]["fields"]["key"]) is not None
    await room.verify(attachment)  # the retry, S3 back
    assert await room.state(attachment) == ("verified", None)


@dataclass
class Meddling(Storage):
    """The run's S3, but the first HEAD of `key` is followed at once by `meddle`: what the
    uploader writing again, or the object going, between the check's HEAD and its copy does."""

    key: str = ""
    meddle: Callable[[], Awaitable[object]] | None = None

    async def head(self, key: str) -> Head | None:
        found = await super().head(key)
        if key == self.key and self.meddle is not None:
            meddle, self.meddle = self.meddle, None
            await meddle()
        return found


async def test_an_upload_changed_during_its_check_is_never_what_downloads_serve(
    room: Room,
) -> None:
    """Whatever lands on the upload key between the HEAD and the copy, the row is settled from
    the copy (or not at all) and downloads serve exactly what was checked."""
    storage = room.res.storage

    async def check(
        created: dict[str, Any], meddle: Callable[[], Awaitable[object]]
    ) -> StorageError | None:
        """Run the check with `meddle` between its HEAD and its copy; S3's refusal, if any."""
        key = created["upload"]["fields"]["key"]
        meddling = Meddling(storage.section, storage.s3, key=key, meddle=meddle)
        assert (await room.complete(created["id"])).status_code == 202
        payload = await queued(room.res, created["id"])
        try:
            await attachment_jobs.verify(dataclasses.replace(room.res, storage=meddling), payload)
        except StorageError as exc:
            return exc
        return None

    async def refused_then_retried(created: dict[str, Any], refusal: StorageError) -> None:
        """S3 refused the copy: nothing is settled or copied, and the worker's retry (run here)
        checks what the upload key holds now."""
        assert refusal.operation == "copy_object", refusal
        assert await room.state(created["id"]) == ("pending", None)
        assert await storage.head((await room.keys(created["id"]))[1]) is None
        await room.verify(created["id"])

    # Same size and type, other bytes: moto copies them (S3 refuses the copy, 412, and the
    # retry copies them); either way the row is verified from the copy and serves the copy.
    same = await room.created()
    other = b"Z" * len(TEXT)
    assert (await upload(same, TEXT)).status_code == 204
    refusal = await check(same, lambda: upload(same, other))
    if refusal is not None:
        assert refusal.s3_code == "PreconditionFailed", refusal
        await refused_then_retried(same, refusal)
    assert await room.state(same["id"]) == ("verified", None)
    upload_key, file_key = await room.keys(same["id"])
    async with room.res.connection() as conn:
        cur = await conn.execute("SELECT etag FROM attachments WHERE id = %s", (same["id"],))
        row = await cur.fetchone()
    copied = await storage.head(file_key)
    assert row is not None and copied is not None and row[0] == copied.etag
    assert await storage.head(upload_key) is None
    shown = await room.api.get(f"/v1/attachments/{same['id']}", headers=room.member)
    async with httpx.AsyncClient(timeout=10) as http:
        downloaded = (await http.get(shown.json()["download"]["url"])).content
    assert downloaded == await storage.get(file_key) == other

    # Another size, stored by moto (S3 refuses the POST): the check of the copy rejects it.
    longer = await room.created()
    assert (await upload(longer, TEXT)).status_code == 204
    posted: list[httpx.Response] = []

    async def post_longer() -> None:
        posted.append(await upload(longer, TEXT + b"!"))

    refusal = await check(longer, post_longer)
    if refusal is not None:
        await refused_then_retried(longer, refusal)
    if posted[0].status_code == 204:
        reason = f"the upload is {len(TEXT) + 1} bytes, {len(TEXT)} were declared"
        assert await room.state(longer["id"]) == ("rejected", reason)
        assert [await storage.head(k) for k in await room.keys(longer["id"])] == [None, None]
    else:
        assert await room.state(longer["id"]) == ("verified", None)

    # Gone before the copy: the copy fails, nothing is settled, the retry rejects it.
    gone = await room.created()
    assert (await upload(gone, TEXT)).status_code == 204
    refusal = await check(gone, lambda: storage.delete(gone["upload"]["fields"]["key"]))
    assert refusal is not None and refusal.s3_code == "NoSuchKey", refusal
    await refused_then_retried(gone, refusal)
    assert await room.state(gone["id"]) == ("rejected", "nothing was uploaded")
