"""One error root. Subclasses carry data; the api maps them to HTTP in one place (api/errors.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import psycopg
import redis.exceptions


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


class Refused(ApplianceError):
    """A 401 or 403. `reason` is the error code and the label of the auth-failures metric."""

    def __init__(self, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, code=reason, headers=headers)
        self.reason = reason


class Unauthorized(Refused):
    """Who are you: no, malformed, unknown, revoked or expired credentials."""

    status = 401

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason, message, {"WWW-Authenticate": "Bearer"})


class Forbidden(Refused):
    """Known principal, not allowed."""

    status = 403


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


# What the clients raise when PostgreSQL or Redis does not answer (connection refused or lost,
# timeouts, the pool exhausted: psycopg_pool.PoolTimeout is an OperationalError). Not their
# other errors (a failing statement or script is a bug: 500).
OUTAGES: tuple[type[Exception], ...] = (
    psycopg.OperationalError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)


def known(exc: BaseException) -> ApplianceError | None:
    """What the caller is told of `exc`: itself, a 503 naming the dependency for one of OUTAGES
    (the client's detail is for the log only), a 400 for a value PostgreSQL refused, or None:
    a bug."""
    if isinstance(exc, ApplianceError):
        return exc
    if isinstance(exc, OUTAGES):
        return unavailable("postgresql" if isinstance(exc, psycopg.Error) else "redis")
    if isinstance(exc, psycopg.DataError):
        return refused_value()
    return None


def refused_value() -> Invalid:
    """The last line of defence behind the validation at the edge (api/body.py): PostgreSQL
    refused a value it was given (NUL, out of range, ...). Its detail is for the log only."""
    return Invalid("a value in this request cannot be stored (refused by the database)")


def unavailable(dependency: str) -> Unavailable:
    """The 503 callers see when `dependency` does not answer: no host, port or client detail."""
    return Unavailable(f"{dependency} is unavailable, retry later")


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
