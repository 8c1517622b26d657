"""One error root. Subclasses carry data; the api maps them to HTTP in one place (api/errors.py)."""

from __future__ import annotations

from dataclasses import dataclass


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose."""

    status = 500
    code = "internal"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


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
