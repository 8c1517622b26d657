"""What `/schema/openapi.json` says beyond what litestar sees in a handler's signature.

Handlers read their bodies with msgspec (api/body.py) and answer JSON they encode themselves
(api/json.py), so litestar alone would document no request body and a string response. Each
route declares instead, with `documented(...)`, its body type, its success status and type, and
every error status it can answer; the schemas come from the same msgspec types that decode and
encode the wire. The document's shared parts (the error shape, storable JSON, bearer auth) are
added by the render plugin, `Document`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Request
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Operation

from appliance.auth.principal import PRINCIPAL

JSON = "application/json"
ERROR_REF = {"$ref": "#/components/schemas/Error"}
STORABLE_REF = {"$ref": "#/components/schemas/StorableJson"}
# api/body.py refuses NUL (and lone surrogates, which JSON text cannot carry unescaped) in every
# string and object key of a body but message bodies: PostgreSQL cannot store them.
NO_NUL = "^[^\\u0000]*$"
BEARER: list[dict[str, list[str]]] = [{"bearer": []}]

_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "field"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "field": {"type": ["string", "null"]},
            },
        }
    },
}
_STORABLE_SCHEMA = {
    "description": "Any JSON without NUL (U+0000) in a string or key, nested at most 32 deep",
    "anyOf": [
        {"type": "string", "pattern": NO_NUL},
        {"type": ["number", "boolean", "null"]},
        {"type": "array", "items": STORABLE_REF},
        {
            "type": "object",
            "propertyNames": {"pattern": NO_NUL},
            "additionalProperties": STORABLE_REF,
        },
    ],
}
COMPONENTS: dict[str, Any] = {
    "schemas": {"Error": _ERROR_SCHEMA, "StorableJson": _STORABLE_SCHEMA},
    "securitySchemes": {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key (ak_<id>_<secret>) or an OIDC access token",
        }
    },
}

_ERRORS: dict[int, str] = {
    400: "invalid: `field` names the input, `message` states the rule",
    401: "credentials missing, malformed, unknown, revoked or expired (`code` says which)",
    403: "not allowed: scope, prefix, not_member, role or impersonate_denied",
    404: "no such conversation, member, message or key",
    409: "conflict: the id or name exists, or the Idempotency-Key was used with another body",
    413: "the request body exceeds [api] max_body_bytes",
    429: "rate limited: retry after Retry-After seconds",
    503: "PostgreSQL, Redis or the OIDC issuer did not answer: retry later",
}
_INT = {"schema": {"type": "integer", "minimum": 1}}
_ERROR_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}},
    429: {"Retry-After": {"required": True, **_INT}},
    503: {"Retry-After": {"required": False, **_INT}},
}

# Path and query parameters as the handlers check them (litestar sees plain strings).
CONVERSATION = {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"}
MEMBER = {"type": "string", "pattern": PRINCIPAL.pattern.removesuffix("\\Z") + "$"}
KEY_ID = {"type": "string", "pattern": "^[a-z0-9]{12}$"}
MAX_SEQ = 2**63 - 1
SEQ = {"type": "integer", "minimum": 1, "maximum": MAX_SEQ}
ON_BEHALF_OF = {
    "name": "X-On-Behalf-Of",
    "in": "header",
    "required": False,
    "description": "Act for this user (an API key with the impersonate scope)",
    "schema": {"type": "string", "pattern": "^user:[A-Za-z0-9._@:|+-]{1,200}$"},
}


def schema_of(type_: Any, *, request: bool = False) -> dict[str, Any]:
    """msgspec's JSON Schema of `type_` with every `$ref` inlined and patterns in ECMA-262
    spelling (`$`, not `\\Z`). For a request, it also states what api/body.py refuses: NUL in
    strings and keys, free-form values beyond StorableJson."""
    (top,), defs = msgspec.json.schema_components([type_], ref_template="{name}")
    inlined: dict[str, Any] = _inline(top, defs, request)
    return inlined


def _inline(node: Any, defs: dict[str, Any], request: bool) -> Any:
    if isinstance(node, list):
        return [_inline(item, defs, request) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return _inline(defs[node["$ref"]], defs, request)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "pattern" and isinstance(value, str):
            out[key] = value.removesuffix("\\Z") + "$" if value.endswith("\\Z") else value
        elif key == "title" and isinstance(value, str):
            continue  # msgspec's struct names: noise in an inlined schema
        else:
            out[key] = _inline(value, defs, request)
    if request and out.get("type") == "string" and "pattern" not in out and "format" not in out:
        out["pattern"] = NO_NUL
    if request and out.get("type") == "object" and "properties" not in out:
        out["propertyNames"] = {"pattern": NO_NUL}
        out["additionalProperties"] = STORABLE_REF
    return out


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def documented(
    *,
    returns: Any = None,
    body: Any = None,
    body_required: bool = True,
    errors: Iterable[int] = (),
    also: Mapping[int, tuple[Any, str]] | None = None,
    params: Mapping[str, dict[str, Any]] | None = None,
    headers: Iterable[dict[str, Any]] = (),
    media_type: str = JSON,
    links: Mapping[str, dict[str, Any]] | None = None,
) -> type[Operation]:
    """An Operation class (a route decorator's `operation_class`) that documents the route.

    The decorator's status code is answered with `returns` (a msgspec type; None: no content),
    `also` maps other success statuses to (type, description), `body` is the request body type,
    `errors` every error status, `params` schemas of path and query parameters by name (where
    the handler parses a string itself), `headers` header parameters, `links` OpenAPI links
    from the success response to the operations (by handler name) its values address.
    """
    ok = None if returns is None else {"schema": schema_of(returns)}
    successes = {
        str(code): _json(schema_of(type_), text) for code, (type_, text) in (also or {}).items()
    }
    failures: dict[str, Any] = {}
    for code in sorted(set(errors)):
        error = _json(ERROR_REF, _ERRORS[code])
        if code in _ERROR_HEADERS:
            error["headers"] = _ERROR_HEADERS[code]
        failures[str(code)] = error
    request_body = (
        None
        if body is None
        else {
            "required": body_required,
            "content": {JSON: {"schema": schema_of(body, request=True)}},
        }
    )
    overrides = dict(params or {})
    extra = list(headers)

    @dataclass
    class Documented(Operation):
        def to_schema(self) -> dict[str, Any]:
            schema = super().to_schema()
            # litestar's entry for the decorator's status code, with its description.
            status, generated = next(
                (code, r) for code, r in schema["responses"].items() if code.startswith("2")
            )
            success = {"description": generated.get("description", "Success")}
            if ok is not None:
                success["content"] = {media_type: ok}
            if generated.get("headers"):
                success["headers"] = generated["headers"]
            if links:
                success["links"] = dict(links)
            schema["responses"] = {status: success, **successes, **failures}
            if request_body is not None:
                schema["requestBody"] = request_body
            parameters = schema.get("parameters", [])
            for parameter in parameters:
                if parameter.get("name") in overrides:
                    parameter["schema"] = overrides[parameter["name"]]
            if parameters or extra:
                schema["parameters"] = [*parameters, *extra]
            return schema

    return Documented


def operation_id(handler: HTTPRouteHandler, *_: Any) -> str:
    """The handler's name in camelCase (`create_conversation` → `createConversation`): unique,
    and what links name."""
    return operation_id_of(handler.handler_name)


def link(operation: str, **parameters: str) -> dict[str, Any]:
    """An OpenAPI link to `operation` (a handler name) with runtime expressions for values."""
    return {"operationId": operation_id_of(operation), "parameters": parameters}


def operation_id_of(handler_name: str) -> str:
    first, *rest = handler_name.split("_")
    return first + "".join(word.title() for word in rest)


def complete(openapi_schema: dict[str, Any]) -> dict[str, Any]:
    """litestar's document (`app.openapi_schema.to_schema()`) with the shared components."""
    components = openapi_schema.setdefault("components", {})
    for section, entries in COMPONENTS.items():
        components.setdefault(section, {}).update(entries)
    return openapi_schema


class Document(JsonRenderPlugin):
    """`/schema/openapi.json` (and `/schema`): the complete document."""

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        return self.render_json(request, complete(openapi_schema))
