"""Request bodies: decoded with msgspec into typed Structs; every failure names the field.

msgspec reports the path (`$.messages[3].type`) or the field in backticks; both become the error's
`field` (`messages[3].type`), and the message keeps msgspec's statement of the rule.

Every decoded body is then checked for what PostgreSQL cannot store, wherever it sits: NUL
(U+0000, refused in `text` and as `\\u0000` in `jsonb`) and lone surrogates, in any string and
any object key, and free-form JSON nested deeper than MAX_DEPTH. The error names the place
(`title`, `metadata.k`, `members[2].principal`). `msgspec.Raw` values (message bodies) are the
client's own bytes and go to Redis, never to PostgreSQL: they are not walked.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from appliance.errors import Invalid

T = TypeVar("T")
_AT = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_NAMED = re.compile(r"field `(?P<name>[^`]+)`")
# What PostgreSQL refuses in text and jsonb. msgspec already refuses lone surrogates and raw
# control characters; a surrogate is checked anyway, as any decoded string may come elsewhere.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
MAX_DEPTH = 32  # levels of objects and arrays in a free-form JSON value (metadata)


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
    value = parse(lambda data: msgspec.json.decode(data, type=type_), raw, "body")
    # JSON text can carry NUL or a surrogate only as a \u escape (msgspec refuses raw control
    # characters and invalid UTF-8), so a body without one needs no walk: the publish path's case.
    if b"\\u" in raw or _has_free_form(type_):
        check_storable(value)
    return value


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


def check_text(value: str, field: str) -> str:
    """`value` unless PostgreSQL could not store it (NUL, a lone surrogate): then Invalid."""
    if _UNSTORABLE.search(value):
        raise Invalid("must not contain NUL (U+0000) or a lone surrogate", field=field)
    return value


def check_storable(value: Any, field: str = "", depth: int = 0) -> None:
    """Raise Invalid naming the place of the first string, key or nesting PostgreSQL refuses."""
    if isinstance(value, str):
        check_text(value, field or "body")
    elif isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            check_storable(getattr(value, name), f"{field}.{name}" if field else name, depth)
    elif isinstance(value, dict):
        _deeper(field, depth)
        for key, item in value.items():
            if isinstance(key, str) and _UNSTORABLE.search(key):
                raise Invalid(
                    "object keys must not contain NUL (U+0000) or a lone surrogate",
                    field=field or "body",
                )
            check_storable(item, f"{field}.{key}" if field else str(key), depth + 1)
    elif isinstance(value, list | tuple):
        _deeper(field, depth)
        for i, item in enumerate(value):
            check_storable(item, f"{field}[{i}]", depth + 1)


def _deeper(field: str, depth: int) -> None:
    if depth >= MAX_DEPTH:
        raise Invalid(f"is nested deeper than {MAX_DEPTH} levels", field=field or "body")


_FREE_FORM: dict[Any, bool] = {}


def _has_free_form(type_: Any) -> bool:
    """Whether `type_` can hold free-form JSON (`Any`, e.g. metadata), whose depth is bounded."""
    known = _FREE_FORM.get(type_)
    if known is None:
        known = _FREE_FORM[type_] = _free(msgspec.inspect.type_info(type_))
    return known


def _free(info: msgspec.inspect.Type) -> bool:
    if isinstance(info, msgspec.inspect.AnyType):
        return True
    if isinstance(info, msgspec.inspect.Metadata):
        return _free(info.type)
    if isinstance(info, msgspec.inspect.StructType):
        return any(_free(f.type) for f in info.fields)
    if isinstance(info, msgspec.inspect.DictType):
        return _free(info.key_type) or _free(info.value_type)
    if isinstance(info, msgspec.inspect.ListType | msgspec.inspect.SetType):
        return _free(info.item_type)
    if isinstance(info, msgspec.inspect.UnionType):
        return any(_free(t) for t in info.types)
    return False
