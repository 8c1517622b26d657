"""The effective configuration as plain data with every secret redacted (for `config show`)."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, SecretStr

from appliance.config.model import Config

MASK = "***"
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@", re.IGNORECASE)


def scrub(text: str) -> str:
    """Mask the password of any URL inside `text` (`scheme://user:secret@host` → `user:***@`)."""
    return _URL_PASSWORD.sub(lambda m: f"{m.group('head')}{MASK}@", text)


def redact_url(url: str) -> str:
    """A connection URL with its password masked; other parts stay readable for operators."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:{MASK}@{parts.hostname or ''}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _plain(value: Any, key: str) -> Any:
    if isinstance(value, SecretStr):
        secret = value.get_secret_value()
        return redact_url(secret) if "://" in secret else MASK
    if isinstance(value, BaseModel):
        return {name: _plain(getattr(value, name), name) for name in type(value).model_fields}
    if isinstance(value, list):
        return [_plain(v, key) for v in value]
    return value


def redacted(config: Config) -> dict[str, Any]:
    plain: dict[str, Any] = _plain(config, "")
    return plain
