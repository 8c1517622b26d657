"""`attachments.verify`: check an upload against its declaration, once, and fix what was checked.

Enqueued by `POST /v1/attachments/{id}/complete` in the transaction that notes the request. HEAD
the upload; if its size and content type are the declared ones, S3 copies it to the file key
(on condition that its ETag is still the one HEAD saw) and the copy is checked again, being what
downloads will serve: the declared size and type make the upload verified and its upload key is
deleted. Anything else (no object, other bytes, another type) makes it rejected and deletes both
keys. The row stays locked from the first HEAD until it is settled, so a second job for the
same upload waits and then finds it settled, and expire_uploads leaves it alone meanwhile.

An upload written again between the HEAD and the copy fails the copy (S3 answers 412): the job
fails with StorageError, nothing is settled, and the worker's retry checks the new upload. A
job for an upload that is no longer pending does nothing, so a repeated job is harmless.
"""

from __future__ import annotations

import msgspec
import structlog

from appliance import metrics
from appliance.attachments import service
from appliance.resources import Resources
from appliance.storage import Head, Storage

log = structlog.get_logger()

VERIFY = "attachments.verify"


class Job(msgspec.Struct, forbid_unknown_fields=True):
    """The payload of an `attachments.verify` job."""

    attachment: str


def payload(attachment_id: str) -> bytes:
    return msgspec.json.encode(Job(attachment_id))


async def _check(storage: Storage, row: service.Row) -> tuple[str | None, Head | None]:
    """(why the upload is refused, or None; the HEAD of its file once copied)."""
    upload = await storage.head(row.upload_key)
    reason = service.problem(row, upload)
    if reason is not None or upload is None:
        return reason, None
    await storage.copy(row.upload_key, row.key, if_match=upload.etag)
    # The copy is what downloads serve: it is checked itself, whatever S3 made of If-Match
    # (moto, for one, ignores it and copies whatever the upload key holds by then).
    copied = await storage.head(row.key)
    return service.problem(row, copied), copied


async def verify(res: Resources, payload: bytes) -> None:
    job = msgspec.json.decode(payload, type=Job)
    async with res.connection() as conn, conn.transaction():
        row = await service.lock(conn, job.attachment)
        if row is None or row.state != "pending":
            log.info("attachment_check_skipped", attachment=job.attachment,
                     state=row.state if row else None)  # fmt: skip
            return
        reason, copied = await _check(res.storage, row)
        await service.settle(conn, row.id, copied, reason)
    metrics.ATTACHMENT_CHECKS.labels("verified" if reason is None else "rejected").inc()
    # After the row is settled: a verified row is read from its file key only, a rejected one
    # never. If these deletes fail, expire_uploads deletes the objects later.
    if reason is None:
        log.info("attachment_verified", attachment=row.id, conversation=row.conversation,
                 size=row.size, content_type=row.content_type)  # fmt: skip
        await res.storage.delete(row.upload_key)
        return
    log.info("attachment_rejected", attachment=row.id, conversation=row.conversation,
             reason=reason)  # fmt: skip
    await res.storage.delete_many([row.upload_key, row.key])
