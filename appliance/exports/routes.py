"""`POST /v1/conversations/{c}/exports` and `GET /v1/exports/{id}`: request an export of a
conversation's full history, then follow it to its presigned link.

Who may read the conversation's history (a member, or a key with `read`) may export it and read
its exports; to anyone else an export is 404, so its id tells nothing. So is an export of a
conversation purged since (even if its id was created again).
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
from litestar import Response, get, post
from litestar.params import FromPath

from appliance.api.body import decode
from appliance.api.deps import DEPENDENCIES, Req, Who, services
from appliance.api.json import json_response
from appliance.api.openapi import BEARER, CONVERSATION, ON_BEHALF_OF, documented, link
from appliance.api.routing import router
from appliance.errors import NotFound
from appliance.exports import service
from appliance.exports.service import Export

PARAMS = {"conversation": CONVERSATION, "export": service.ID_SCHEMA}
# From a requested export to where it is followed.
REQUESTED_LINKS = {"get_export": link("get_export", export="$response.body#/id")}


class ExportRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The optional body of a request: an empty object (options may come later)."""


@post(
    "/v1/conversations/{conversation:str}/exports",
    status_code=202,
    operation_class=documented(
        returns=Export,
        body=ExportRequest,
        body_required=False,
        errors=(400, 401, 403, 404, 413, 503),
        params=PARAMS,
        headers=[ON_BEHALF_OF],
        links=REQUESTED_LINKS,
    ),
)
async def request_export(
    request: Req, conversation: FromPath[str], principal: Who
) -> Response[bytes]:
    """Queue an export of the whole history → 202 `{id, state: "queued", ...}`. The body is
    optional: none, or `{}`."""
    svc = services(request)
    raw = await request.body()
    if raw.strip():
        decode(raw, ExportRequest)
    await svc.access.require(principal, conversation, "read")
    async with svc.connection() as conn:
        export = await service.request(conn, conversation, principal.id)
    return json_response(export, 202)


@get(
    "/v1/exports/{export:str}",
    operation_class=documented(
        returns=Export,
        errors=(400, 401, 403, 404, 503),
        params=PARAMS,
        headers=[ON_BEHALF_OF],
    ),
)
async def get_export(request: Req, export: FromPath[str], principal: Who) -> Response[bytes]:
    """The export's state and progress; once ready, a presigned link to its object and size."""
    svc = services(request)
    found = None
    if service.valid_id(export):
        async with svc.connection() as conn:
            found = await service.locate(conn, export)
    if found is None or not await svc.access.allowed(principal, found.export.conversation, "read"):
        raise NotFound(f"no export {export!r}", field="export")
    expires = svc.config.exports.link_expires
    shown = await service.with_link(found, svc.resources.storage, expires, datetime.now(UTC))
    return json_response(shown)


ROUTER = router(
    "/",
    [request_export, get_export],
    dependencies=DEPENDENCIES,
    tags=["exports"],
    security=BEARER,
)
