"""`attachments.verify`: check an upload against its declaration, once.

Enqueued by `POST /v1/attachments/{id}/complete` in the transaction that notes the request. HEAD
the object: the declared size and content type make it verified; anything else (no object, other
bytes, another type) makes it rejected and deletes the object. A job for an upload that is no
longer pending does nothing, so a repeated or replayed job is harmless.
"""

from __future__ import annotations

import msgspec
import structlog

from appliance import metrics
from appliance.attachments import service
from appliance.resources import Resources

log = structlog.get_logger()

VERIFY = "attachments.verify"


class Job(msgspec.Struct, forbid_unknown_fields=True):
    """The payload of an `attachments.verify` job."""

    attachment: str


def payload(attachment_id: str) -> bytes:
    return msgspec.json.encode(Job(attachment_id))


async def verify(res: Resources, payload: bytes) -> None:
    job = msgspec.json.decode(payload, type=Job)
    async with res.connection() as conn:
        row = await service.find(conn, job.attachment)
    if row is None or row.state != "pending":
        log.info("attachment_check_skipped", attachment=job.attachment,
                 state=row.state if row else None)  # fmt: skip
        return
    head = await res.storage.head(row.key)
    reason = service.problem(row, head)
    async with res.connection() as conn:
        settled = await service.settle(conn, row.id, head, reason)
    if not settled:  # expired or checked by a concurrent job meanwhile
        log.info("attachment_check_skipped", attachment=row.id, state="settled")
        return
    metrics.ATTACHMENT_CHECKS.labels("verified" if reason is None else "rejected").inc()
    if reason is None:
        log.info("attachment_verified", attachment=row.id, conversation=row.conversation,
                 size=row.size, content_type=row.content_type)  # fmt: skip
        return
    log.info("attachment_rejected", attachment=row.id, conversation=row.conversation,
             reason=reason)  # fmt: skip
    if head is not None:
        # After the row says rejected: nothing can publish it meanwhile. If this delete fails,
        # expire_uploads deletes the object with the row later.
        await res.storage.delete(row.key)
