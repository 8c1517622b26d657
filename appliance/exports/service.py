"""Export rows: requesting an export (the row and its job in one transaction), reading one back
as the API shows it, and the SQL the job and the retention schedule keep it with.

Each run of an export writes its own object, `exports/<id>.<attempt>.jsonl.zst`, named in the
row: a run that a later one superseded can only write (and then deletes) its own, never the
object the row shows. Its state goes queued → running → ready (or failed), and expired once
retention has deleted the object.

An export belongs to the conversation that existed when it was requested: one whose id was
purged and created again (a newer `created_at`) does not see, nor may read, the old exports
(`expire_exports` deletes them).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any, Literal, NamedTuple

import msgspec
from ulid import ULID

from appliance import queue
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


class Located(NamedTuple):
    export: Export
    key: str  # its object's key (the latest run's)


def object_key(export_id: str, attempt: int) -> str:
    """The object run `attempt` (1, 2, ...) of the export writes."""
    return f"{PREFIX}{export_id}.{attempt}.jsonl.zst"


def object_keys(export_id: str, attempts: int) -> list[str]:
    """Every object the export's runs so far may have written."""
    return [object_key(export_id, n) for n in range(1, attempts + 1)]


def valid_id(text: str) -> bool:
    return bool(_ID.match(text))


_COLUMNS = (
    "e.id, e.conversation, e.state, e.messages, e.last_seq, e.head_seq, e.created_at,"
    " e.started_at, e.finished_at, e.size, e.error"
)
# The exports of the conversation that holds their id now: not those of one purged before it
# was created again (its created_at is newer). Attachments keep the same rule.
_LIVE = "exports e JOIN conversations c ON c.id = e.conversation AND c.created_at <= e.created_at"


async def request(
    conn: Conn, conversation: str, requested_by: str, *, enqueue: bool = True
) -> Export:
    """A new queued export of `conversation` and its job, committed together (no job with
    `enqueue=False`: `appliance export` runs it in its own process)."""
    export_id = str(ULID())
    async with conn.transaction():
        cur = await conn.execute(
            f"INSERT INTO exports AS e (id, conversation, requested_by, object_key)"
            f" VALUES (%s, %s, %s, %s) RETURNING {_COLUMNS}",
            (export_id, conversation, requested_by, object_key(export_id, 1)),
        )
        row = await cur.fetchone()
        if enqueue:
            await queue.enqueue(conn, RUN, msgspec.json.encode(Job(export_id)))
    assert row is not None
    return _export(row)


async def locate(conn: Conn, export_id: str) -> Located | None:
    """The export and its object's key, if its conversation is the one it was made of."""
    cur = await conn.execute(
        f"SELECT {_COLUMNS}, e.object_key FROM {_LIVE} WHERE e.id = %s", (export_id,)
    )
    row = await cur.fetchone()
    return None if row is None else Located(_export(row[:-1]), row[-1])


async def get(conn: Conn, export_id: str) -> Export | None:
    found = await locate(conn, export_id)
    return None if found is None else found.export


async def with_link(found: Located, storage: Storage, expires: float, now: datetime) -> Export:
    """The export with a presigned download link when it is ready."""
    export = found.export
    if export.state != "ready":
        return export
    seconds = int(expires)
    url = await storage.presign_get(found.key, seconds)
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
