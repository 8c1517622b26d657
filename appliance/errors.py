"""One error root. Subclasses carry data; the api maps them to HTTP in one place (api/errors.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose."""

    status = 500
    code = "internal"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code
        self.headers = headers or {}


class Invalid(ApplianceError):
    """Bad input: `field` names it, the message states the rule."""

    status = 400
    code = "invalid"


class Unauthorized(ApplianceError):
    """Who are you: no, malformed, unknown, revoked or expired credentials. `reason` is the metric
    label and the error code."""

    status = 401

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, code=reason, headers={"WWW-Authenticate": "Bearer"})
        self.reason = reason


class Forbidden(ApplianceError):
    """Known principal, not allowed. `reason` is the metric label and the error code."""

    status = 403

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, code=reason)
        self.reason = reason


class NotFound(ApplianceError):
    status = 404
    code = "not_found"


class Conflict(ApplianceError):
    status = 409
    code = "conflict"


class RateLimited(ApplianceError):
    status = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after: float) -> None:
        seconds = max(1, math.ceil(retry_after))
        super().__init__(message, headers={"Retry-After": str(seconds)})
        self.retry_after = seconds


class Unavailable(ApplianceError):
    """A dependency did not answer (PostgreSQL, Redis or S3)."""

    status = 503
    code = "unavailable"


@dataclass(frozen=True)
class Problem:
    key: str
    rule: str

    def __str__(self) -> str:
        return f"{self.key}: {self.rule}"


class ConfigError(ApplianceError):
    """The configuration is invalid; `problems` lists every one of them."""

    code = "config"

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(str(p) for p in problems))
        self.problems = problems
