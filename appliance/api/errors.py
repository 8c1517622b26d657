"""The one mapping from exceptions to HTTP: `{"error": {"code", "message", "field"}}`."""

from __future__ import annotations

from typing import Any

import psycopg
import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import ExceptionHandlersMap

from appliance import metrics
from appliance.errors import OUTAGES, ApplianceError, Unavailable, known, refused_value
from appliance.logthrottle import Throttle

log = structlog.get_logger()
# While a dependency is down every request fails the same way, thousands a second under load:
# those lines are logged once, then summed up once per window (metrics count each request).
OUTAGE_LOG = Throttle(every=5.0)

_CODES = {
    400: "invalid",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    503: "unavailable",
}


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field}}


def error_response(status: int, code: str, message: str, field: str | None = None) -> Response[Any]:
    return Response(error_body(code, message, field), status_code=status)


def _validation_field(exc: ValidationException) -> tuple[str | None, str]:
    """litestar puts `[{"key", "message", "source"}]` in `extra`; report the first one."""
    if isinstance(exc.extra, list) and exc.extra and isinstance(exc.extra[0], dict):
        first = exc.extra[0]
        key = first.get("key")
        message = first.get("message") or exc.detail
        return (str(key) if key else None), str(message)
    return None, exc.detail


def handle_appliance_error(_: Request[Any, Any, Any], exc: ApplianceError) -> Response[Any]:
    if isinstance(exc, Unavailable):
        # Not the whole message: a storage error's carries S3's detail; its operation suffices.
        key = ("request_failed", exc.code, exc.message.split(":")[0])
        OUTAGE_LOG(log.error, "request_failed", key, code=exc.code, error=exc.message)
    elif exc.status >= 500:
        log.error("request_failed", code=exc.code, error=exc.message)
    metrics.count_refused(exc)
    response = error_response(exc.status, exc.code, exc.message, exc.field)
    if isinstance(exc, Unavailable):
        response.headers["Retry-After"] = "1"  # every 503: a dependency that may come back
    response.headers.update(exc.headers)
    return response


def handle_http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    if isinstance(exc, ValidationException):
        field, message = _validation_field(exc)
        return error_response(400, "invalid", message, field)
    # 413 from litestar's own limit (a body without Content-Length): the body, like access.py says.
    field = "body" if exc.status_code == 413 else None
    response = error_response(
        exc.status_code, _CODES.get(exc.status_code, "error"), exc.detail, field
    )
    if exc.headers:
        response.headers.update(exc.headers)
    return response


def handle_outage(_: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    dependency = "postgresql" if isinstance(exc, psycopg.Error) else "redis"
    kind = type(exc).__name__
    OUTAGE_LOG(
        log.warning,
        "dependency_unavailable",
        ("dependency_unavailable", dependency, kind),
        dependency=dependency,
        error=str(exc),
        type=kind,
    )
    unavailable = known(exc)
    assert unavailable is not None
    response = error_response(unavailable.status, unavailable.code, unavailable.message)
    response.headers["Retry-After"] = "1"
    return response


def handle_data_error(_: Request[Any, Any, Any], exc: psycopg.DataError) -> Response[Any]:
    """A value PostgreSQL refused that validation at the edge let through: a 400, never a 500,
    and logged as the validation gap it is."""
    first = (str(exc).splitlines() or [""])[0]
    log.error("database_refused_value", error=first, type=type(exc).__name__)
    refused = refused_value()
    return error_response(refused.status, refused.code, refused.message, refused.field)


def handle_unexpected(_: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.error("unhandled_exception", exc_info=exc)
    return error_response(HTTP_500_INTERNAL_SERVER_ERROR, "internal", "internal error")


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    ApplianceError: handle_appliance_error,
    HTTPException: handle_http_exception,
    **dict.fromkeys(OUTAGES, handle_outage),
    psycopg.DataError: handle_data_error,
    Exception: handle_unexpected,
}
