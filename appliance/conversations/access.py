"""Who may do what in a conversation: scopes, membership roles and key prefixes, on every route.

Existence and roles are cached per api process for `[auth] membership_cache_ttl`; every change is
announced on the invalidation channel and dropped here at once, so a removed member or a deleted
conversation is refused within milliseconds on every process. While PostgreSQL cannot be asked,
what was cached serves for `[auth] stale_window` past its TTL (docs/operations.md).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, cast

import psycopg

from appliance import metrics
from appliance.auth.principal import Principal
from appliance.cache import MISSING, Cache
from appliance.conversations import service
from appliance.errors import Forbidden, NotFound
from appliance.invalidation import Invalidation

Conn = psycopg.AsyncConnection[Any]
ConnFactory = Callable[[], AbstractAsyncContextManager[Conn]]
Action = Literal["view", "read", "publish", "subscribe", "receipt", "manage"]

# Scopes that grant an action without membership (within the key's prefix).
_SCOPE_GRANTS: dict[Action, frozenset[str]] = {
    "view": frozenset({"read", "manage", "publish", "subscribe"}),
    "read": frozenset({"read"}),
    "publish": frozenset({"publish"}),
    "subscribe": frozenset({"subscribe"}),
    "receipt": frozenset(),
    "manage": frozenset({"manage"}),
}
_ROLE_GRANTS: dict[str, frozenset[Action]] = {
    "owner": frozenset({"view", "read", "publish", "subscribe", "receipt", "manage"}),
    "member": frozenset({"view", "read", "publish", "subscribe", "receipt"}),
    "reader": frozenset({"view", "read", "subscribe", "receipt"}),
}
_CACHE_MAX = 100_000


class Access:
    def __init__(self, connection: ConnFactory, ttl: float, stale_window: float = 0.0) -> None:
        self._connection = connection
        # A name that is no conversation is forgotten at its TTL (anyone can make those up).
        self._exists: Cache[str, bool] = Cache(
            ttl, _CACHE_MAX, stale_window, negative=lambda found: not found
        )
        # Grouped by conversation: deleting one drops its roles without a scan of the cache.
        self._roles: Cache[tuple[str, str], str | None] = Cache(
            ttl, _CACHE_MAX, stale_window, group=lambda key: key[0]
        )

    @property
    def generation(self) -> int:
        """Advances with every invalidation: a check made under an older one may be stale."""
        return self._exists.generation + self._roles.generation

    async def require(self, principal: Principal, conversation: str, action: Action) -> None:
        """Raise NotFound, or Forbidden with the reason, unless `principal` may do `action`."""
        service.check_id(conversation)
        if not principal.may_touch(conversation):
            raise Forbidden("prefix", f"this key is limited to conversations '{principal.prefix}*'")
        if not await self._exists_cached(conversation):
            raise NotFound(f"no conversation {conversation!r}", field="conversation")
        if any(principal.has(scope) for scope in _SCOPE_GRANTS[action]):
            return
        role = await self.role(conversation, principal.id)
        if role is None:
            raise Forbidden("not_member", f"{principal.id} is not a member of {conversation!r}")
        if action not in _ROLE_GRANTS[role]:
            raise Forbidden("role", f"role {role!r} may not {action} in {conversation!r}")

    async def allowed(self, principal: Principal, conversation: str, action: Action) -> bool:
        try:
            await self.require(principal, conversation, action)
        except (Forbidden, NotFound):
            return False
        return True

    async def role(self, conversation: str, principal: str) -> str | None:
        key = (conversation, principal)
        cached = self._roles.get(key)
        if cached is not MISSING:
            return cast("str | None", cached)
        generation = self._roles.generation
        try:
            async with self._connection() as conn:
                role = await service.role_of(conn, conversation, principal)
        except psycopg.OperationalError as exc:
            return cast("str | None", _stale(self._roles, key, "roles", exc))
        self._roles.put(key, role, generation)
        return role

    async def _exists_cached(self, conversation: str) -> bool:
        cached = self._exists.get(conversation)
        if cached is not MISSING:
            return cast(bool, cached)
        generation = self._exists.generation
        try:
            async with self._connection() as conn:
                found = await service.exists(conn, conversation)
        except psycopg.OperationalError as exc:
            return cast(bool, _stale(self._exists, conversation, "conversations", exc))
        self._exists.put(conversation, found, generation)
        return found

    def forget(self, event: Invalidation | None) -> None:
        """Apply an invalidation event; None (a missed-event window) forgets everything."""
        if event is None:
            self._exists.clear()
            self._roles.clear()
        elif event.kind == "conversation":
            self._exists.drop(event.id)
            self._roles.drop_group(event.id)
        elif event.kind == "member" and event.principal is not None:
            self._roles.drop((event.id, event.principal))


def _stale(cache: Cache[Any, Any], key: Any, name: str, outage: psycopg.Error) -> object:
    """When PostgreSQL cannot be asked (fast while it is known down): what was cached within
    `[auth] stale_window`, unless an invalidation dropped it; else the outage goes on up."""
    value = cache.stale(key)
    if value is MISSING:
        raise outage
    metrics.STALE_SERVED.labels(name).inc()
    return value
