"""Attachments over HTTP: create an upload, say it is done, read it back with a download link.

Creating and completing need the right to publish in the conversation, reading the right to
read it. An attachment whose conversation the caller may not reach is answered exactly like an
unknown id (404), so ids reveal nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from litestar import Response, get, post
from litestar.params import FromPath

from appliance import queue
from appliance.api.body import decode
from appliance.api.deps import DEPENDENCIES, Req, Who, services
from appliance.api.json import json_response
from appliance.api.openapi import BEARER, CONVERSATION, ON_BEHALF_OF, documented, link
from appliance.api.routing import router
from appliance.api.services import Services
from appliance.attachments import service
from appliance.attachments.jobs import VERIFY, payload
from appliance.auth.principal import Principal
from appliance.conversations.access import Action
from appliance.errors import Invalid, NotFound

PARAMS = {"conversation": CONVERSATION, "attachment": service.ID_SCHEMA}
# Every route authenticates (401), may refuse the credential itself (403: impersonation) and
# needs PostgreSQL (503); a malformed id or conversation is 400, an unreachable one 404.
ERRORS = (400, 401, 403, 404, 503)
_CREATED = "$response.body#/id"
CREATED_LINKS = {
    name: link(name, attachment=_CREATED) for name in ("complete_attachment", "get_attachment")
}


async def _reachable(svc: Services, principal: Principal, text: str, action: Action) -> service.Row:
    """The attachment `text` names if `principal` may `action` in its conversation; else 404."""
    if not service.valid_id(text):
        raise Invalid("must be an attachment id (26 characters of a ULID)", field="attachment")
    async with svc.connection() as conn:
        row = await service.find(conn, text)
    if row is None or not await svc.access.allowed(principal, row.conversation, action):
        raise NotFound(f"no attachment {text}", field="attachment")
    return row


@post(
    "/conversations/{conversation:str}/attachments",
    operation_class=documented(
        returns=service.Created,
        body=service.UploadRequest,
        errors=(*ERRORS, 413),
        params=PARAMS,
        headers=[ON_BEHALF_OF],
        links=CREATED_LINKS,
    ),
)
async def create_attachment(
    request: Req, conversation: FromPath[str], principal: Who
) -> Response[bytes]:
    """A pending upload and its presigned form POST (S3 refuses any other size or type)."""
    svc = services(request)
    await svc.access.require(principal, conversation, "publish")
    spec = decode(await request.body(), service.UploadRequest)
    async with svc.connection() as conn:
        created = await service.create(
            conn, svc.resources.storage, svc.config.attachments, conversation, principal.id, spec
        )
    return json_response(created, 201)


@post(
    "/attachments/{attachment:str}/complete",
    status_code=202,
    operation_class=documented(
        returns=service.Status,
        also={200: (service.Status, "Already verified")},
        body=service.CompleteRequest,
        body_required=False,
        errors=(*ERRORS, 409, 413),
        params=PARAMS,
        headers=[ON_BEHALF_OF],
    ),
)
async def complete_attachment(
    request: Req, attachment: FromPath[str], principal: Who
) -> Response[bytes]:
    """The upload is done: check it (a job) → 202 `pending`; 200 once verified; 409 rejected."""
    svc = services(request)
    raw = await request.body()
    if raw.strip():
        decode(raw, service.CompleteRequest)
    row = await _reachable(svc, principal, attachment, "publish")
    if row.state == "verified":
        return json_response(service.Status(row.id, row.state), 200)
    if row.state == "rejected":
        service.require_verified(row, "attachment")  # 409 attachment_rejected, with the reason
    async with svc.connection() as conn, conn.transaction():
        if await service.request_check(conn, row.id):
            await queue.enqueue(conn, VERIFY, payload(row.id))
    return json_response(service.Status(row.id, "pending"), 202)


@get(
    "/attachments/{attachment:str}",
    operation_class=documented(
        returns=service.Attachment,
        errors=(*ERRORS, 409),
        params=PARAMS,
        headers=[ON_BEHALF_OF],
    ),
)
async def get_attachment(
    request: Req, attachment: FromPath[str], principal: Who
) -> Response[bytes]:
    """A verified attachment's metadata and a presigned download link (`download_expires`) to
    its file key: the copy that was checked, which no upload form can write."""
    svc = services(request)
    row = await _reachable(svc, principal, attachment, "read")
    service.require_verified(row, "attachment")
    expires = int(svc.config.attachments.download_expires)
    url = await svc.resources.storage.presign_get(
        row.key, expires, service.disposition(row.filename)
    )
    expires_at = datetime.now(UTC) + timedelta(seconds=expires)
    return json_response(service.view(row, url, expires_at))


ROUTER = router(
    "/v1",
    [create_attachment, complete_attachment, get_attachment],
    dependencies=DEPENDENCIES,
    tags=["attachments"],
    security=BEARER,
)
