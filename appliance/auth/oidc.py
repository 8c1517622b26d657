"""Verification of OIDC bearer JWTs (Keycloak or any standard issuer) against the issuer's JWKS.

The discovery document and the JWKS are fetched lazily, in a worker thread, on first use. The key
set is cached for `jwks_cache_ttl` (then refetched in the background while the cached keys keep
serving); a token with an unknown `kid` refetches it, at most once per `jwks_min_refresh`, so
keys rotated at the issuer work without a restart while a flood of forged kids cannot hammer the
issuer. When a refresh fails, the keys already held stay in use (an issuer outage does not log
everybody out); with no keys at all, verification is Unavailable: 503 with a Retry-After of when
the next fetch may begin. The issuer's URLs and what failed go to the log only.

Only access tokens are accepted, never ID tokens: `token_kinds` sorts a verified token into the
kinds `[oidc] token_types` names (docs/api.md, "Access tokens, not ID tokens").
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jwt
import structlog

from appliance.auth.principal import PRINCIPAL
from appliance.config.model import OidcSection
from appliance.errors import Unauthorized, Unavailable, unavailable

log = structlog.get_logger()

# A discovery document or JWKS is a few kilobytes; anything much larger is not one.
_MAX_DOCUMENT = 1_048_576
# Most specific first: all of these subclass jwt.InvalidTokenError.
_REASONS: tuple[tuple[type[jwt.PyJWTError], str, str], ...] = (
    (jwt.ExpiredSignatureError, "token_expired", "the token has expired"),
    (jwt.ImmatureSignatureError, "token_not_yet_valid", "the token is not valid yet"),
    (jwt.InvalidAudienceError, "token_audience", "the token is not meant for this audience"),
    (jwt.InvalidIssuerError, "token_issuer", "the token comes from another issuer"),
    (jwt.InvalidAlgorithmError, "token_algorithm", "the token's algorithm is not allowed"),
)

# Claims only an ID token carries (OpenID Connect Core 1.0, 2 and 3.3.2.11). Keycloak before 25
# also put `nonce` into access tokens, but those carry its `typ` claim, which decides first.
_ID_CLAIMS = ("nonce", "at_hash", "c_hash", "s_hash")
# Claims access tokens carry and ID tokens never do: scope (Auth0, Okta, RFC 9068), scp (Entra ID
# and Okta delegated tokens), gty (Auth0 machine-to-machine), azpacr and appidacr (Entra ID v2
# and v1 access tokens, app-only ones included).
_ACCESS_CLAIMS = ("scope", "scp", "gty", "azpacr", "appidacr")


class _IssuerError(Exception):
    """A failed discovery or JWKS fetch; its message names URLs, so it is for the log only."""


def _id_refused() -> Unauthorized:
    return Unauthorized("token_type", "an ID token is not an access token")


def _not_access(what: str, value: object) -> Unauthorized:
    shown = repr(value)
    shown = shown if len(shown) <= 40 else f"{shown[:37]}..."
    return Unauthorized("token_type", f"a token whose {what} is {shown} is not an access token")


def token_kinds(header: dict[str, Any], claims: dict[str, Any]) -> frozenset[str]:
    """The kinds of access token a verified token is (any of "at+jwt", "bearer",
    "access-claims", "plain"); raises Unauthorized `token_type` for an ID token or any other
    kind of token, whatever `[oidc] token_types` says."""
    typ = header.get("typ")
    # RFC 7515 4.1.9: a media type, compared case-insensitively, "application/" optional.
    media = typ.lower().removeprefix("application/") if isinstance(typ, str) else typ
    if media == "id_token+jwt":
        raise _id_refused()
    if media not in (None, "jwt", "at+jwt"):
        raise _not_access("typ header", typ)
    marked = claims.get("typ")  # Keycloak: Bearer, ID, Refresh, Offline, Logout
    if marked is not None and (not isinstance(marked, str) or marked.lower() != "bearer"):
        if isinstance(marked, str) and marked.lower() == "id":
            raise _id_refused()
        raise _not_access("typ claim", marked)
    if claims.get("token_use") == "id":  # Amazon Cognito
        raise _id_refused()
    kinds = set()
    if media == "at+jwt":
        kinds.add("at+jwt")
    if marked is not None:
        kinds.add("bearer")
    if not kinds:
        # Typed neither way (header typ JWT or none, no typ claim): its claims tell.
        if any(claim in claims for claim in _ID_CLAIMS):
            raise _id_refused()
        kinds.add("plain")
        if any(claim in claims for claim in _ACCESS_CLAIMS):
            kinds.add("access-claims")
    return frozenset(kinds)


@dataclass(frozen=True)
class OidcIdentity:
    user: str  # value of user_claim; the principal is "user:<user>"
    roles: frozenset[str]  # from roles_claim; empty when not configured or absent
    expires_at: float  # exp claim, epoch seconds


class OidcVerifier:
    def __init__(self, section: OidcSection, clock: Callable[[], float] = time.monotonic) -> None:
        """`clock` is monotonic seconds, for the JWKS cache and refetch windows (tests turn it
        by hand)."""
        self._section = section
        self._clock = clock
        issuer = section.issuer.rstrip("/")
        self._discovery_url = section.discovery_url or f"{issuer}/.well-known/openid-configuration"
        self._jwks_uri: str | None = None
        self._keys: list[jwt.PyJWK] | None = None
        self._loaded_at = -math.inf  # monotonic time of the last successful JWKS fetch
        self._attempted_at = -math.inf  # ... when the last attempt began, successful or not
        self._finished_at = -math.inf  # ... and when it ended
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None
        self._token_types = frozenset(section.token_types)

    async def verify(self, token: str) -> OidcIdentity:
        """The identity a bearer token proves; raises Unauthorized or Unavailable (issuer down)."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("token_invalid", "the token is not a well-formed JWT") from None
        alg, kid = header.get("alg"), header.get("kid")
        # Checked before any key is chosen: this stops `none` and HS256 signed with a public key.
        if alg not in self._section.algorithms:
            raise Unauthorized("token_algorithm", "the token's algorithm is not allowed")
        if kid is not None and not isinstance(kid, str):
            raise Unauthorized("token_invalid", "the token's kid is not a string")
        key = await self._key_for(kid)
        if key.algorithm_name != alg:  # an RSA key verifies RS256 only, an EC P-256 key ES256
            raise Unauthorized("token_algorithm", "the token's algorithm does not fit its key")
        section = self._section
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(section.algorithms),
                audience=section.audience,
                issuer=section.issuer,
                leeway=section.leeway,
                options={"require": ["exp", "iss", "aud", section.user_claim]},
            )
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized("token_invalid", f"the token lacks the {exc.claim} claim") from None
        except jwt.PyJWTError as exc:
            reason, message = next(
                ((r, m) for kind, r, m in _REASONS if isinstance(exc, kind)),
                ("token_invalid", f"the token is invalid ({type(exc).__name__})"),
            )
            raise Unauthorized(reason, message) from None
        kinds = token_kinds(header, claims)
        if not kinds & self._token_types:
            kind = " / ".join(sorted(kinds))
            raise Unauthorized(
                "token_type", f"the token's kind ({kind}) is not in [oidc] token_types"
            )
        user = claims.get(section.user_claim)
        # The same rule as every principal id, so "user:<user>" is always a valid one.
        if not isinstance(user, str) or not PRINCIPAL.match(f"user:{user}"):
            raise Unauthorized("token_invalid", f"the {section.user_claim} claim is not a user id")
        try:
            expires_at = float(claims["exp"])  # PyJWT checked it is a number in the future
        except OverflowError:
            raise Unauthorized("token_invalid", "the token's exp claim is out of range") from None
        return OidcIdentity(user=user, roles=self._roles(claims), expires_at=expires_at)

    async def aclose(self) -> None:
        """Stop a background refresh; every fetch opens and closes its own connection."""
        if self._background is not None:
            self._background.cancel()
            await asyncio.gather(self._background, return_exceptions=True)

    def _roles(self, claims: dict[str, Any]) -> frozenset[str]:
        if not self._section.roles_claim:
            return frozenset()
        value: Any = claims
        for part in self._section.roles_claim.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not isinstance(value, list):
            return frozenset()
        return frozenset(role for role in value if isinstance(role, str))

    async def _key_for(self, kid: str | None) -> jwt.PyJWK:
        now = self._clock()
        section = self._section
        if self._keys is None:
            await self._refresh(since=now)
        elif (
            now - self._loaded_at > section.jwks_cache_ttl
            and now - self._attempted_at >= section.jwks_min_refresh
            and self._background is None
        ):
            # Expired keys keep serving while one task refetches: a slow issuer delays nobody
            # whose key is known.
            self._background = asyncio.create_task(self._refresh_later(now), name="oidc-jwks")
        key = self._find(kid)
        if key is None and kid is not None:
            # Rotation at the issuer: a new kid refetches, rate-limited by _refresh.
            await self._refresh(since=now)
            key = self._find(kid)
        if key is None:
            raise Unauthorized("token_kid_unknown", "the token's signing key is not the issuer's")
        return key

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        keys = self._keys or []
        if kid is None:
            return keys[0] if len(keys) == 1 else None
        return next((key for key in keys if key.key_id == kid), None)

    async def _refresh_later(self, since: float) -> None:
        try:
            await self._refresh(since)
        except Unavailable:
            pass  # logged by _refresh; the keys held stay in use
        finally:
            self._background = None

    async def _refresh(self, since: float) -> None:
        """Refetch the JWKS unless an attempt ended since `since` (a caller that waited for it
        takes its result) or the last one began under `jwks_min_refresh` ago."""
        async with self._lock:
            recent = self._clock() - self._attempted_at < self._section.jwks_min_refresh
            if self._finished_at >= since or recent:
                if not self._keys:
                    raise self._unavailable()
                return
            self._attempted_at = self._clock()
            try:
                self._keys = await asyncio.to_thread(self._fetch_keys)
                self._loaded_at = self._clock()
            except _IssuerError as exc:
                log.warning("oidc_jwks_refresh_failed", error=str(exc), stale=bool(self._keys))
                if not self._keys:
                    raise self._unavailable() from None
            finally:
                self._finished_at = self._clock()

    def _unavailable(self) -> Unavailable:
        """The 503 while no keys are held: no URL or detail (those are logged), and Retry-After
        the seconds until `jwks_min_refresh` lets the next fetch begin."""
        error = unavailable("the OIDC issuer")
        wait = self._attempted_at + self._section.jwks_min_refresh - self._clock()
        error.headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return error

    def _fetch_keys(self) -> list[jwt.PyJWK]:
        """Blocking: discovery (once) and the JWKS. Runs in a worker thread."""
        if self._jwks_uri is None:
            document = self._get_json(self._discovery_url)
            if document.get("issuer") != self._section.issuer:
                raise _IssuerError(
                    f"OIDC discovery at {self._discovery_url} names issuer "
                    f"{document.get('issuer')!r}, not the configured {self._section.issuer!r}"
                )
            jwks_uri = document.get("jwks_uri")
            if not isinstance(jwks_uri, str):
                raise _IssuerError(f"OIDC discovery at {self._discovery_url} has no jwks_uri")
            self._jwks_uri = jwks_uri
        entries = self._get_json(self._jwks_uri).get("keys")
        keys: list[jwt.PyJWK] = []
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue  # Keycloak also publishes encryption keys ("use": "enc")
            try:
                key = jwt.PyJWK(entry)
            except jwt.PyJWTError:
                continue  # a key type or algorithm PyJWT cannot use
            if key.algorithm_name in self._section.algorithms:
                keys.append(key)
        if not keys:
            allowed = "/".join(self._section.algorithms)
            raise _IssuerError(f"the OIDC JWKS at {self._jwks_uri} has no {allowed} signing key")
        return keys

    def _get_json(self, url: str) -> dict[str, Any]:
        if urlsplit(url).scheme not in ("http", "https"):
            raise _IssuerError(f"OIDC URL {url!r} is not http(s)")
        # The scheme is checked above, so urlopen cannot reach file: or other handlers.
        request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
        timeout = self._section.http_timeout
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                body = response.read(_MAX_DOCUMENT + 1)
            if len(body) > _MAX_DOCUMENT:
                raise ValueError(f"larger than {_MAX_DOCUMENT} bytes")
            document = json.loads(body)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            if isinstance(exc, urllib.error.HTTPError):
                exc.close()  # it holds the response open
            raise _IssuerError(f"OIDC fetch of {url} failed: {exc}") from None
        if not isinstance(document, dict):
            raise _IssuerError(f"OIDC fetch of {url} did not return a JSON object")
        return document
