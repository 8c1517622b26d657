"""Export rows: requesting an export (the row and its job in one transaction), reading one back
as the API shows it, and the SQL the job and the retention schedule keep it with.

An export's object is `exports/<id>.jsonl.zst`; its state goes queued → running → ready (or
failed), and expired once retention has deleted the object.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any, Literal

import msgspec
from ulid import ULID

from appliance.resources import Conn
from appliance.storage import Storage

RUN = "exports.run"
PREFIX = "exports/"
State = Literal["queued", "running", "ready", "failed", "expired"]
# Export ids are ULIDs (Crockford base32); anything else is no export.
_ID = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}\Z")
ID_SCHEMA = {"type": "string", "pattern": "^[0-9A-HJKMNP-TV-Z]{26}$"}


class Job(msgspec.Struct, forbid_unknown_fields=True):
    """The payload of an `exports.run` job."""

    export: str


class Export(msgspec.Struct):
    """An export as `GET /v1/exports/{id}` shows it. `messages` and `last_seq` are the progress
    (messages written so far, the last seq written); `head_seq` the newest seq when the run
    started, where it stops. `url` (valid until `url_expires_at`) and `size` once ready."""

    id: str
    conversation: str
    state: State
    messages: int
    last_seq: int
    head_seq: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    size: int | None = None
    url: str | None = None
    url_expires_at: datetime | None = None
    error: str | None = None


def object_key(export_id: str) -> str:
    return f"{PREFIX}{export_id}.jsonl.zst"


def valid_id(text: str) -> bool:
    return bool(_ID.match(text))


_COLUMNS = (
    "id, conversation, state, messages, last_seq, head_seq, created_at, started_at,"
    " finished_at, size, error"
)


async def request(
    conn: Conn, conversation: str, requested_by: str, *, enqueue: bool = True
) -> Export:
    """A new queued export of `conversation` and its job, committed together (no job with
    `enqueue=False`: `appliance export` runs it in its own process)."""
    # Imported here: appliance.jobs imports this feature's job handler, which imports this.
    from appliance import jobs

    export_id = str(ULID())
    async with conn.transaction():
        cur = await conn.execute(
            f"INSERT INTO exports (id, conversation, requested_by, object_key)"
            f" VALUES (%s, %s, %s, %s) RETURNING {_COLUMNS}",
            (export_id, conversation, requested_by, object_key(export_id)),
        )
        row = await cur.fetchone()
        if enqueue:
            await jobs.enqueue(conn, RUN, msgspec.json.encode(Job(export_id)))
    assert row is not None
    return _export(row)


async def get(conn: Conn, export_id: str) -> Export | None:
    cur = await conn.execute(f"SELECT {_COLUMNS} FROM exports WHERE id = %s", (export_id,))
    row = await cur.fetchone()
    return None if row is None else _export(row)


async def with_link(export: Export, storage: Storage, expires: float, now: datetime) -> Export:
    """`export` with a presigned download link when it is ready."""
    if export.state != "ready":
        return export
    seconds = int(expires)
    url = await storage.presign_get(object_key(export.id), seconds)
    return msgspec.structs.replace(export, url=url, url_expires_at=now + timedelta(seconds=seconds))


def _export(row: tuple[Any, ...]) -> Export:
    (id_, conversation, state, messages, last_seq, head_seq) = row[:6]
    created_at, started_at, finished_at, size, error = row[6:]
    return Export(
        id=id_,
        conversation=conversation,
        state=state,
        messages=messages,
        last_seq=last_seq,
        head_seq=head_seq,
        created_at=created_at,
        started_at=started_at,
        finished_at=finished_at,
        size=size,
        error=error,
    )
