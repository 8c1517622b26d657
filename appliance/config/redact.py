"""The effective configuration as plain data with every secret redacted (for `config show`)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, SecretStr

from appliance.config.model import Config

MASK = "***"
# Greedy to the last "@" of the token (where URL parsers split): a raw "@" in a password is masked.
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)\S*@", re.IGNORECASE)


# libpq also takes the password as a parameter: `?password=…` in a URL, `password=…` in key=value.
_PASSWORD_PARAM = re.compile(r"(?P<head>\bpassword=)[^&\s]*", re.IGNORECASE)
_CONNECTION_URL = re.compile(r"^(postgres|postgresql|redis|rediss|unix)://", re.IGNORECASE)


def scrub(text: str) -> str:
    """Mask passwords inside `text`: `scheme://user:secret@host` → `user:***@`, `password=***`."""
    text = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}{MASK}@", text)
    return _PASSWORD_PARAM.sub(lambda m: f"{m.group('head')}{MASK}", text)


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        # Connection URLs keep user, host and database readable for operators.
        secret = value.get_secret_value()
        return scrub(secret) if _CONNECTION_URL.match(secret) else MASK
    if isinstance(value, BaseModel):
        return {name: _plain(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def redacted(config: Config) -> dict[str, Any]:
    plain: dict[str, Any] = _plain(config)
    return plain
