"""Turning credentials into a `Principal`: API keys (cached per process) and OIDC bearer JWTs.

A key is looked up in PostgreSQL once per `[auth] key_cache_ttl` and on every invalidation event
(rotation, revocation); the secret is checked against the SHA-256 on every request. Use of a key
is remembered in memory and written as one batched UPDATE every `last_used_interval`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any, cast

import psycopg
import structlog

from appliance import metrics
from appliance.auth import keys
from appliance.auth.oidc import OidcVerifier
from appliance.auth.principal import PRINCIPAL, SCOPES, Principal
from appliance.cache import MISSING, Cache
from appliance.config import Config
from appliance.errors import Forbidden, Unauthorized

log = structlog.get_logger()
Conn = psycopg.AsyncConnection[Any]
ConnFactory = Callable[[], AbstractAsyncContextManager[Conn]]
# A role from the OIDC roles claim grants the scope of the same name; never `impersonate`, and
# never `admin` (issuers commonly have an "admin" role of their own; keys are managed with keys).
_ROLE_SCOPES = frozenset(SCOPES) - {"impersonate", "admin"}
_KNOWN_MAX = 100_000
_UNKNOWN_MAX = 10_000


def bearer(authorization: str | None, token: str | None) -> str:
    """The credential from `Authorization: Bearer …` or, for browsers' WebSockets, `?token=`."""
    if authorization is not None:
        scheme, _, value = authorization.partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not value or " " in value:
            raise Unauthorized("malformed_credentials", "Authorization must be 'Bearer <token>'")
        return value
    if token:
        return token
    raise Unauthorized("missing_credentials", "credentials required: Authorization: Bearer <key>")


class Authenticator:
    def __init__(self, config: Config, connection: ConnFactory) -> None:
        self._config = config
        self._connection = connection
        ttl, stale = config.auth.key_cache_ttl, config.auth.stale_window
        self._known: Cache[str, keys.KeyRecord] = Cache(ttl, _KNOWN_MAX, stale)
        # Ids that are no key, apart: a flood of made-up ids never evicts the real ones.
        # Not kept past the TTL: serving "no such key" stale would help no one through an outage.
        self._unknown: Cache[str, None] = Cache(ttl, _UNKNOWN_MAX, stale, negative=lambda _: True)
        self._used: dict[str, datetime] = {}
        self._oidc = OidcVerifier(config.oidc) if config.oidc.enabled else None
        self._flusher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_loop(), name="keys-last-used")

    async def aclose(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self._flush_used()
        if self._oidc is not None:
            await self._oidc.aclose()

    def forget(self, key_id: str | None = None) -> None:
        """Drop one cached key (an invalidation event) or all of them (a missed-event window)."""
        for cache in (self._known, self._unknown):
            if key_id is None:
                cache.clear()
            else:
                cache.drop(key_id)

    async def authenticate(
        self, authorization: str | None, token: str | None, on_behalf_of: str | None
    ) -> Principal:
        credential = bearer(authorization, token)
        if credential.startswith("ak_"):
            principal = await self._api_key(credential)
        elif self._oidc is not None:
            identity = await self._oidc.verify(credential)
            principal = Principal(
                f"user:{identity.user}",
                identity.roles & _ROLE_SCOPES,
                expires_at=identity.expires_at + self._config.oidc.leeway,
            )
        else:
            raise Unauthorized("malformed_credentials", "not an API key (OIDC is not enabled)")
        if on_behalf_of is None:
            return principal
        if not principal.has("impersonate") or principal.key_id is None:
            raise Forbidden("impersonate_denied", "X-On-Behalf-Of needs a key with 'impersonate'")
        if not on_behalf_of.startswith("user:") or not PRINCIPAL.match(on_behalf_of):
            raise Forbidden("impersonate_denied", "X-On-Behalf-Of must be 'user:<id>'")
        return Principal(
            on_behalf_of,
            frozenset(),
            principal.prefix,
            principal.key_id,
            principal.id,
            principal.expires_at,
        )

    async def _api_key(self, credential: str) -> Principal:
        match = keys.KEY.match(credential)
        if match is None:
            raise Unauthorized("malformed_credentials", "API keys look like ak_<id>_<secret>")
        record = await self._record(match["id"])
        now = datetime.now(UTC)
        matched = record.matches(match["secret"], now) if record is not None else None
        if record is None or matched is None:
            raise Unauthorized("invalid_key", "unknown API key")
        if record.revoked:
            raise Unauthorized("key_revoked", "this API key was revoked")
        if record.expires_at is not None and record.expires_at <= now:
            raise Unauthorized("key_expired", "this API key has expired")
        self._used[record.id] = now
        ends = [record.expires_at, record.previous_expires_at if matched == "previous" else None]
        expires = min((end for end in ends if end is not None), default=None)
        return Principal(
            f"key:{record.name}",
            record.scopes,
            record.conversation_prefix,
            record.id,
            expires_at=expires.timestamp() if expires is not None else None,
        )

    async def _record(self, key_id: str) -> keys.KeyRecord | None:
        known = self._known.get(key_id)
        if known is not MISSING:
            return cast(keys.KeyRecord, known)
        if self._unknown.get(key_id) is not MISSING:
            return None
        known_generation, unknown_generation = self._known.generation, self._unknown.generation
        try:
            async with self._connection() as conn:
                record = await keys.fetch(conn, key_id)
        except psycopg.OperationalError:
            # PostgreSQL cannot be asked (fast while it is known down): what this process knew
            # of the id within `[auth] stale_window`, unless an invalidation dropped it.
            stale = self._known.stale(key_id)
            if stale is MISSING and self._unknown.stale(key_id) is MISSING:
                raise
            metrics.STALE_SERVED.labels("keys").inc()
            return None if stale is MISSING else cast(keys.KeyRecord, stale)
        if record is None:
            self._unknown.put(key_id, None, unknown_generation)
        else:
            self._known.put(key_id, record, known_generation)
        return record

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.auth.last_used_interval)
            await self._flush_used()

    async def _flush_used(self) -> None:
        used, self._used = self._used, {}
        if not used:
            return
        try:
            async with self._connection() as conn:
                await keys.record_use(conn, used)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            log.warning("keys_last_used_failed", error=str(exc), keys=len(used))
            for key_id, at in used.items():  # keep them for the next batch
                self._used[key_id] = max(at, self._used.get(key_id, at))
