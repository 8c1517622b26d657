"""Request bodies: decoded with msgspec into typed Structs; every failure names the field.

msgspec reports the path (`$.messages[3].type`) or the field in backticks; both become the error's
`field` (`messages[3].type`), and the message keeps msgspec's statement of the rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

import msgspec

from appliance.errors import Invalid

T = TypeVar("T")
_AT = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_NAMED = re.compile(r"field `(?P<name>[^`]+)`")


def _field(message: str, whole: str) -> tuple[str, str]:
    at = _AT.search(message)
    prefix = at["path"] if at else ""
    rule = message[: at.start()] if at else message
    named = _NAMED.search(rule)
    if named:
        prefix = f"{prefix}.{named['name']}" if prefix else named["name"]
    return (prefix or whole), rule


def decode(raw: bytes, type_: type[T]) -> T:
    if not raw:
        raise Invalid("request body is empty: a JSON object is required", field="body")
    return parse(lambda data: msgspec.json.decode(data, type=type_), raw, "body")


def parse(decoder: Callable[[bytes | str], T], raw: bytes | str, whole: str) -> T:
    """`decoder(raw)`, its failures as Invalid naming the field (`whole` for the document)."""
    try:
        return decoder(raw)
    except msgspec.ValidationError as exc:
        field, rule = _field(str(exc), whole)
        raise Invalid(rule, field=field) from None
    except msgspec.DecodeError as exc:
        raise Invalid(f"{whole} is not valid JSON: {exc}", field=whole) from None
    except UnicodeDecodeError:  # msgspec raises it, not DecodeError, for bad UTF-8 in a string
        raise Invalid(f"{whole} is not valid UTF-8", field=whole) from None
    except RecursionError:  # msgspec's nesting limit (also for msgspec.Raw bodies it skips over)
        raise Invalid("JSON is nested too deeply", field=whole) from None
