"""The principal a request acts as, and what its scopes allow."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

Scope = Literal["admin", "manage", "publish", "read", "subscribe", "impersonate"]
SCOPES: tuple[str, ...] = get_args(Scope)
# `admin` implies every scope but `impersonate`, which is always granted explicitly.
_ADMIN_IMPLIES = frozenset({"manage", "publish", "read", "subscribe"})

PRINCIPAL = re.compile(r"^(key|user):[A-Za-z0-9._@:|+-]{1,200}\Z")


@dataclass(frozen=True, slots=True)
class Principal:
    id: str  # "key:<name>" or "user:<sub>"
    scopes: frozenset[str]
    # Conversations this principal may touch start with this (an API key's restriction).
    prefix: str | None = None
    # The API key behind the request, also when it acts for a user (`X-On-Behalf-Of`).
    key_id: str | None = None
    # The key principal acting for `id` under `impersonate`.
    via: str | None = None
    # Epoch seconds when the credential stops working (key expiry, end of a rotated secret's
    # grace, a JWT's exp plus leeway): long-lived WebSockets are closed then.
    expires_at: float | None = None

    def has(self, scope: str) -> bool:
        return scope in self.scopes or (scope in _ADMIN_IMPLIES and "admin" in self.scopes)

    def may_touch(self, conversation: str) -> bool:
        return self.prefix is None or conversation.startswith(self.prefix)
