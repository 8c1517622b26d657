"""Attachments: presigned uploads of a conversation, their verification, and what a publish may
reference.

An upload is a row (pending) plus a presigned POST of exactly its declared size and content
type to its own upload key, `attachments/uploads/<conversation hash>/<id>`. Only the
verification job moves the row on, once: to verified when the upload, copied by S3 to its file
key `attachments/files/<conversation hash>/<id>`, is what was declared, else to rejected (and
the objects are deleted). The form stays valid until it expires and may write the upload key
again after verification; no form can write a file key, and downloads read only that, so what
was verified is what is downloaded. A message may reference only a verified upload of its own
conversation, and it carries the upload's recorded name, size and type, never values the client
restates.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

import msgspec
from psycopg.rows import class_row
from ulid import ULID

from appliance.config.model import AttachmentsSection
from appliance.errors import Conflict, Invalid
from appliance.resources import Conn
from appliance.storage import Head, Storage

UPLOADS = "attachments/uploads/"  # written by presigned POSTs, read by verification only
FILES = "attachments/files/"  # written by verification's copy only, read by downloads
State = Literal["pending", "verified", "rejected"]
MAX_SIZE = 5 * 1_073_741_824  # S3's largest single POST upload
# Attachment ids are ULIDs (Crockford base32); anything else is no attachment.
_ID = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}\Z")
ID_SCHEMA = {"type": "string", "pattern": "^[0-9A-HJKMNP-TV-Z]{26}$"}
# After this many seconds a repeated `complete` of a pending upload asks for a check again (the
# first job may have failed); sooner, it only answers that the check is under way.
RECHECK_AFTER = 10
# A type/subtype without parameters, as S3 stores and compares it.
CONTENT_TYPE = r"^[A-Za-z0-9_.+-]+/[A-Za-z0-9_.+-]+\Z"


class UploadRequest(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /v1/conversations/{c}/attachments`: what will be uploaded."""

    filename: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=255,
            pattern=r"^[^\x00-\x1f\x7f/\\]+\Z",
            description="The file's name, without a path",
            examples=["report.pdf"],
        ),
    ]
    content_type: Annotated[
        str,
        msgspec.Meta(
            max_length=127,
            pattern=CONTENT_TYPE,
            description="type/subtype, allowed by [attachments] content_types",
            examples=["application/pdf"],
        ),
    ]
    size: Annotated[
        int,
        msgspec.Meta(
            ge=1,
            le=MAX_SIZE,
            description="Bytes, at most [attachments] max_bytes",
            examples=[1024],
        ),
    ]


class Upload(msgspec.Struct):
    """How to upload: a multipart/form-data POST to `url` with every one of `fields`, then the
    file as the last field, named `file`, before `expires_at`."""

    method: Literal["POST"]
    url: str
    fields: dict[str, str]
    expires_at: datetime


class Created(msgspec.Struct):
    id: str
    upload: Upload


class CompleteRequest(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /v1/attachments/{id}/complete` takes no body, or an empty object."""


class Status(msgspec.Struct):
    """`POST /v1/attachments/{id}/complete`: the upload's state (`pending` while it is checked)."""

    id: str
    state: State


class Download(msgspec.Struct):
    url: str
    expires_at: datetime


class Attachment(msgspec.Struct):
    """`GET /v1/attachments/{id}`: a verified upload and a link to download it."""

    id: str
    conversation: str
    uploader: str
    filename: str
    content_type: str
    size: int
    state: State
    created_at: datetime
    verified_at: datetime | None
    download: Download


@dataclass
class Row:
    id: str
    conversation: str
    uploader: str
    filename: str
    content_type: str
    size: int
    upload_key: str
    key: str
    state: State
    reason: str | None
    etag: str | None
    created_at: datetime
    completed_at: datetime | None
    verified_at: datetime | None


_COLUMNS = (
    "a.id, a.conversation, a.uploader, a.filename, a.content_type, a.size, a.upload_key,"
    " a.key, a.state, a.reason, a.etag, a.created_at, a.completed_at, a.verified_at"
)
# Uploads of the conversation as it now exists: once a deleted conversation is purged its id
# may be created again, and the earlier one's uploads (until expire_uploads deletes them) must
# not become the new one's.
_LIVE = (
    "attachments a JOIN conversations c ON c.id = a.conversation AND c.created_at <= a.created_at"
)


def valid_id(text: str) -> bool:
    return bool(_ID.match(text))


def object_keys(conversation: str, attachment_id: str) -> tuple[str, str]:
    """(upload key, file key). A hash, not the id: conversation ids may hold `.` runs and `:`
    that some S3 APIs treat as path syntax."""
    digest = hashlib.sha256(conversation.encode()).hexdigest()[:32]
    return f"{UPLOADS}{digest}/{attachment_id}", f"{FILES}{digest}/{attachment_id}"


def allowed_type(content_type: str, allowlist: list[str]) -> bool:
    family = content_type.split("/", 1)[0] + "/*"
    return any(entry.lower() in (content_type, family) for entry in allowlist)


def check(request: UploadRequest, section: AttachmentsSection) -> UploadRequest:
    """The request with its content type in lower case; Invalid naming the field it breaks."""
    content_type = request.content_type.lower()
    if not allowed_type(content_type, section.content_types):
        allowed = ", ".join(section.content_types)
        raise Invalid(
            f"{content_type} is not an allowed type ([attachments] content_types: {allowed})",
            field="content_type",
        )
    if request.size > section.max_bytes:
        raise Invalid(
            f"must be at most {section.max_bytes} bytes ([attachments] max_bytes)", field="size"
        )
    return msgspec.structs.replace(request, content_type=content_type)


def disposition(filename: str) -> str:
    """Content-Disposition of a download: saved under its name, never shown as a page (an
    image/svg+xml upload may hold script). Quoted-string for old clients, RFC 5987 for all."""
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\%' else "_" for c in filename)
    encoded = urllib.parse.quote(filename, safe="")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


async def create(
    conn: Conn,
    storage: Storage,
    section: AttachmentsSection,
    conversation: str,
    uploader: str,
    request: UploadRequest,
) -> Created:
    """Record a pending upload and presign its form POST (the row first: an upload is never
    possible for a key the expiry schedule does not know)."""
    request = check(request, section)
    attachment_id = str(ULID())
    upload_key, key = object_keys(conversation, attachment_id)
    await conn.execute(
        """INSERT INTO attachments
               (id, conversation, uploader, filename, content_type, size, upload_key, key)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s)""",
        (attachment_id, conversation, uploader, request.filename, request.content_type,
         request.size, upload_key, key),
    )  # fmt: skip
    expires = int(section.upload_expires)
    post = await storage.presign_post(upload_key, request.content_type, request.size, expires)
    expires_at = datetime.now(UTC) + timedelta(seconds=expires)
    return Created(attachment_id, Upload("POST", post.url, post.fields, expires_at))


async def find(conn: Conn, attachment_id: str) -> Row | None:
    async with conn.cursor(row_factory=class_row(Row)) as cur:
        await cur.execute(f"SELECT {_COLUMNS} FROM {_LIVE} WHERE a.id = %s", (attachment_id,))
        return await cur.fetchone()


async def lock(conn: Conn, attachment_id: str) -> Row | None:
    """The upload, its row locked until `conn`'s transaction ends (run it in one)."""
    async with conn.cursor(row_factory=class_row(Row)) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} FROM {_LIVE} WHERE a.id = %s FOR UPDATE OF a", (attachment_id,)
        )
        return await cur.fetchone()


async def request_check(conn: Conn, attachment_id: str) -> bool:
    """Note that the client says its upload is done; whether a verification job is due now
    (pending, and not asked for within RECHECK_AFTER seconds). Run it in the transaction that
    enqueues the job."""
    cur = await conn.execute(
        """UPDATE attachments SET completed_at = now()
           WHERE id = %s AND state = 'pending'
             AND (completed_at IS NULL OR completed_at < now() - make_interval(secs => %s))
           RETURNING id""",
        (attachment_id, RECHECK_AFTER),
    )
    return await cur.fetchone() is not None


def problem(row: Row, head: Head | None) -> str | None:
    """Why the stored object is not the declared upload, or None when it is."""
    if head is None:
        return "nothing was uploaded"
    if head.size != row.size:
        return f"the upload is {head.size} bytes, {row.size} were declared"
    if head.content_type.lower() != row.content_type:
        return f"the upload is {head.content_type or 'untyped'}, {row.content_type} was declared"
    return None


async def settle(conn: Conn, attachment_id: str, head: Head | None, reason: str | None) -> None:
    """Verified (reason None, `head` the file's) or rejected; a row no longer pending is left
    as it is."""
    if reason is None:
        await conn.execute(
            """UPDATE attachments SET state = 'verified', verified_at = now(), etag = %s
               WHERE id = %s AND state = 'pending'""",
            (head.etag if head else None, attachment_id),
        )
    else:
        await conn.execute(
            """UPDATE attachments SET state = 'rejected', reason = %s
               WHERE id = %s AND state = 'pending'""",
            (reason, attachment_id),
        )


def require_verified(row: Row, field: str) -> None:
    """Conflict naming `field` unless the upload is verified."""
    if row.state == "pending":
        raise Conflict(
            f"attachment {row.id} is not verified yet: upload it, then POST"
            f" /v1/attachments/{row.id}/complete and wait until it is verified",
            field=field,
            code="attachment_pending",
        )
    if row.state == "rejected":
        raise Conflict(
            f"attachment {row.id} was rejected: {row.reason}; create a new upload",
            field=field,
            code="attachment_rejected",
        )


async def of_conversation(conn: Conn, conversation: str, ids: list[str]) -> dict[str, Row]:
    """The uploads of `conversation` among `ids` (another conversation's are left out)."""
    async with conn.cursor(row_factory=class_row(Row)) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} FROM {_LIVE} WHERE a.id = ANY(%s) AND a.conversation = %s",
            (ids, conversation),
        )
        return {row.id: row for row in await cur.fetchall()}


def view(row: Row, url: str, expires_at: datetime) -> Attachment:
    return Attachment(
        row.id,
        row.conversation,
        row.uploader,
        row.filename,
        row.content_type,
        row.size,
        row.state,
        row.created_at,
        row.verified_at,
        Download(url, expires_at),
    )
