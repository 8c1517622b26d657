"""Request bodies: decoded with msgspec into typed Structs; every failure names the field.

msgspec reports the path (`$.messages[3].type`) or the field in backticks; both become the error's
`field` (`messages[3].type`), and the message keeps msgspec's statement of the rule.
"""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec

from appliance.errors import Invalid

T = TypeVar("T")
_AT = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_NAMED = re.compile(r"field `(?P<name>[^`]+)`")


def _field(message: str) -> tuple[str | None, str]:
    at = _AT.search(message)
    prefix = at["path"] if at else ""
    rule = message[: at.start()] if at else message
    named = _NAMED.search(rule)
    if named:
        prefix = f"{prefix}.{named['name']}" if prefix else named["name"]
    return (prefix or "body"), rule


def decode(raw: bytes, type_: type[T]) -> T:
    if not raw:
        raise Invalid("request body is empty: a JSON object is required", field="body")
    try:
        return msgspec.json.decode(raw, type=type_)
    except msgspec.ValidationError as exc:
        field, rule = _field(str(exc))
        raise Invalid(rule, field=field) from None
    except msgspec.DecodeError as exc:
        raise Invalid(f"body is not valid JSON: {exc}", field="body") from None
    except UnicodeDecodeError:  # msgspec raises it, not DecodeError, for bad UTF-8 in a string
        raise Invalid("body is not valid UTF-8", field="body") from None
    except RecursionError:  # msgspec's nesting limit (also for msgspec.Raw bodies it skips over)
        raise Invalid("JSON is nested too deeply", field="body") from None
