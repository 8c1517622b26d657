"""OIDC bearer verification against a real HTTP issuer (discovery + JWKS) in a thread.

Keys are generated per module with `cryptography`; the issuer counts JWKS fetches and can swap
its key set (rotation), change the issuer it claims, or stop answering.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hashlib
import hmac
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from litestar.testing import AsyncTestClient
from structlog.testing import capture_logs
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from appliance.api.app import create_app
from appliance.auth.oidc import OidcIdentity, OidcVerifier
from appliance.config import Config
from appliance.config.model import OidcSection
from appliance.errors import Unauthorized, Unavailable
from appliance.resources import Resources
from tests.api_process import ApiProcess, api_settings
from tests.messaging import unique
from tests.support import free_port
from tests.test_auth_matrix import auth_failures

AUDIENCE = "appliance"
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def jwk(key: PrivateKey, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        data = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
        alg = "RS256"
    else:
        data = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
        alg = "ES256"
    return {**data, "kid": kid, "use": "sig", "alg": alg}


class Issuer:
    """A minimal OIDC issuer: discovery document and JWKS over real HTTP."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.jwks_fetches = 0
        # Cleared: JWKS requests are accepted but not answered until it is set again.
        self.answering = threading.Event()
        self.answering.set()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.url = f"{self.base}/realms/test"
        self.claimed_issuer = self.url
        # A short poll interval keeps shutdown() (once per test) fast.
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/realms/test/.well-known/openid-configuration":
                    body: Any = {"issuer": issuer.claimed_issuer, "jwks_uri": f"{issuer.base}/jwks"}
                elif self.path == "/jwks":
                    issuer.jwks_fetches += 1
                    issuer.answering.wait(30)
                    body = {"keys": list(issuer.keys)}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def publish(self, *keys: tuple[PrivateKey, str]) -> None:
        """Replace the key set (rotation)."""
        self.keys = [jwk(key, kid) for key, kid in keys]

    def stop(self) -> None:
        self.answering.set()
        if self.thread.is_alive():
            self.server.shutdown()
            self.thread.join()
        self.server.server_close()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key_new() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def issuer(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> Iterator[Issuer]:
    server = Issuer()
    server.publish((rsa_key, "rsa-1"), (ec_key, "ec-1"))
    yield server
    server.stop()


@pytest.fixture
async def verifier_for(issuer: Issuer) -> AsyncIterator[Callable[..., OidcVerifier]]:
    """Factory of verifiers for `issuer`; keyword arguments override OidcSection fields."""
    made: list[OidcVerifier] = []

    def make(clock: Callable[[], float] = time.monotonic, **overrides: Any) -> OidcVerifier:
        fields: dict[str, Any] = {
            "enabled": True,
            "issuer": issuer.url,
            "audience": AUDIENCE,
            "http_timeout": 2.0,
            **overrides,
        }
        made.append(OidcVerifier(OidcSection(**fields), clock))
        return made[-1]

    yield make
    for verifier in made:
        await verifier.aclose()


class Clock:
    """A monotonic clock the test turns: cache and refetch windows as long as one likes, and
    no race with a loaded machine's scheduling."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def sign(
    issuer: Issuer,
    key: PrivateKey,
    kid: str | None,
    *,
    alg: str | None = None,
    header_typ: str | None = "at+jwt",
    drop: tuple[str, ...] = (),
    **claims: Any,
) -> str:
    """A token of `issuer`; by default an RFC 9068 access token (header typ at+jwt)."""
    now = int(time.time())
    payload = {"iss": issuer.url, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300}
    payload.update(claims)
    for claim in drop:
        del payload[claim]
    algorithm = alg or ("RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256")
    # PyJWT writes typ "JWT" unless told otherwise, and leaves out a typ of None.
    headers: dict[str, Any] = {"typ": header_typ}
    if kid is not None:
        headers["kid"] = kid
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_parts(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"


async def rejected(verifier: OidcVerifier, token: str, reason: str) -> Unauthorized:
    with pytest.raises(Unauthorized) as caught:
        await verifier.verify(token)
    assert caught.value.reason == reason, caught.value.message
    assert caught.value.status == 401
    assert not token or token not in caught.value.message
    return caught.value


async def test_valid_rs256_token(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = verifier_for()
    exp = int(time.time()) + 120
    token = sign(issuer, rsa_key, "rsa-1", exp=exp)
    identity = await verifier.verify(token)
    assert identity == OidcIdentity(user="alice", roles=frozenset(), expires_at=float(exp))
    await verifier.verify(token)
    assert issuer.jwks_fetches == 1  # the key set is cached


async def test_valid_es256_token(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], ec_key: ec.EllipticCurvePrivateKey
) -> None:
    identity = await verifier_for().verify(sign(issuer, ec_key, "ec-1", sub="bob@example.org"))
    assert identity.user == "bob@example.org"


async def test_expired_beyond_leeway(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    token = sign(issuer, rsa_key, "rsa-1", exp=int(time.time()) - 60)
    await rejected(verifier_for(leeway=30), token, "token_expired")


async def test_expired_within_leeway_is_accepted(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    exp = int(time.time()) - 10
    identity = await verifier_for(leeway=30).verify(sign(issuer, rsa_key, "rsa-1", exp=exp))
    assert identity.expires_at == exp


async def test_not_yet_valid(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    token = sign(issuer, rsa_key, "rsa-1", nbf=int(time.time()) + 120)
    await rejected(verifier_for(leeway=30), token, "token_not_yet_valid")


async def test_wrong_audience(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    token = sign(issuer, rsa_key, "rsa-1", aud="another-app")
    await rejected(verifier_for(), token, "token_audience")


async def test_wrong_issuer(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    token = sign(issuer, rsa_key, "rsa-1", iss="https://evil.example/realms/test")
    await rejected(verifier_for(), token, "token_issuer")


async def test_unknown_kid_refetch_is_rate_limited(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    clock = Clock()
    verifier = verifier_for(jwks_min_refresh=10, clock=clock)
    await verifier.verify(sign(issuer, rsa_key, "rsa-1"))
    assert issuer.jwks_fetches == 1
    # Within jwks_min_refresh of a fetch, an unknown kid does not refetch.
    clock.advance(9.9)
    await rejected(verifier, sign(issuer, rsa_key, "forged-0"), "token_kid_unknown")
    assert issuer.jwks_fetches == 1
    clock.advance(0.2)
    forged = [sign(issuer, rsa_key, f"forged-{n}") for n in range(1, 21)]
    results = await asyncio.gather(*(verifier.verify(t) for t in forged), return_exceptions=True)
    assert all(isinstance(r, Unauthorized) and r.reason == "token_kid_unknown" for r in results)
    assert issuer.jwks_fetches == 2  # twenty forged kids, one refetch


async def test_rotated_keys_verify_without_restart(
    issuer: Issuer,
    verifier_for: Callable[..., OidcVerifier],
    rsa_key: rsa.RSAPrivateKey,
    rsa_key_new: rsa.RSAPrivateKey,
) -> None:
    clock = Clock()
    verifier = verifier_for(jwks_min_refresh=10, clock=clock)
    await verifier.verify(sign(issuer, rsa_key, "rsa-1"))
    issuer.publish((rsa_key_new, "rsa-2"))
    clock.advance(11)
    identity = await verifier.verify(sign(issuer, rsa_key_new, "rsa-2", sub="carol"))
    assert identity.user == "carol"
    assert issuer.jwks_fetches == 2
    # The retired key is gone from the refetched set.
    await rejected(verifier, sign(issuer, rsa_key, "rsa-1"), "token_kid_unknown")


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:g} s")
        await asyncio.sleep(0.02)


async def test_cache_ttl_refetches_known_keys_in_the_background(
    issuer: Issuer,
    verifier_for: Callable[..., OidcVerifier],
    rsa_key: rsa.RSAPrivateKey,
    rsa_key_new: rsa.RSAPrivateKey,
) -> None:
    clock = Clock()
    verifier = verifier_for(jwks_cache_ttl=100, jwks_min_refresh=10, clock=clock)
    token = sign(issuer, rsa_key, "rsa-1")
    await verifier.verify(token)
    issuer.publish((rsa_key, "rsa-1"), (rsa_key_new, "rsa-2"))
    clock.advance(100.1)
    assert (await verifier.verify(token)).user == "alice"  # the expired set still serves
    await eventually(lambda: issuer.jwks_fetches == 2, "the background refetch")
    # The refetched set is in use: a key published meanwhile verifies with no fetch of its own.
    await eventually(lambda: verifier._background is None, "the end of the refetch")
    assert (await verifier.verify(sign(issuer, rsa_key_new, "rsa-2", sub="bob"))).user == "bob"
    assert issuer.jwks_fetches == 2


async def test_a_hanging_issuer_delays_no_token_whose_key_is_known(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    clock = Clock()
    verifier = verifier_for(jwks_cache_ttl=100, jwks_min_refresh=10, http_timeout=20, clock=clock)
    token = sign(issuer, rsa_key, "rsa-1")
    await verifier.verify(token)
    clock.advance(100.1)
    issuer.answering.clear()
    try:
        # Twenty verifications finish while the issuer holds the refetch they started.
        results = await asyncio.wait_for(
            asyncio.gather(*(verifier.verify(token) for _ in range(20))), 5
        )
        assert [r.user for r in results] == ["alice"] * 20
        await eventually(lambda: issuer.jwks_fetches == 2, "the background refetch")
        assert verifier._background is not None  # still waiting for the issuer
    finally:
        issuer.answering.set()
    await eventually(lambda: verifier._background is None, "the end of the refetch")
    assert issuer.jwks_fetches == 2


async def test_callers_waiting_for_a_refetch_take_its_result(
    issuer: Issuer,
    verifier_for: Callable[..., OidcVerifier],
    rsa_key: rsa.RSAPrivateKey,
    rsa_key_new: rsa.RSAPrivateKey,
) -> None:
    # A fetch that outlasts jwks_min_refresh: callers that queued behind it do not fetch again.
    clock = Clock()
    verifier = verifier_for(jwks_min_refresh=10, http_timeout=20, clock=clock)
    await verifier.verify(sign(issuer, rsa_key, "rsa-1"))
    clock.advance(11)  # the new kid may refetch
    issuer.publish((rsa_key_new, "rsa-2"))
    issuer.answering.clear()
    token = sign(issuer, rsa_key_new, "rsa-2", sub="carol")
    first = asyncio.ensure_future(verifier.verify(token))
    await eventually(lambda: issuer.jwks_fetches == 2, "the refetch for the new kid")
    later = [asyncio.ensure_future(verifier.verify(token)) for _ in range(5)]
    await asyncio.sleep(0)  # they start, and queue behind the fetch
    clock.advance(11)  # past jwks_min_refresh while the fetch is still held
    issuer.answering.set()
    results = await asyncio.wait_for(asyncio.gather(first, *later), 5)
    assert [r.user for r in results] == ["carol"] * 6
    assert issuer.jwks_fetches == 2


async def test_stale_keys_survive_an_issuer_outage(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    clock = Clock()
    verifier = verifier_for(jwks_cache_ttl=100, jwks_min_refresh=10, clock=clock)
    token = sign(issuer, rsa_key, "rsa-1")
    await verifier.verify(token)
    issuer.stop()
    clock.advance(100.1)
    with capture_logs() as logs:
        assert (await verifier.verify(token)).user == "alice"
        await eventually(lambda: verifier._background is None, "the failed refetch")
    assert [e["event"] for e in logs] == ["oidc_jwks_refresh_failed"]
    assert logs[0]["stale"] is True


async def test_an_exp_beyond_any_date_is_rejected(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    token = sign(issuer, rsa_key, "rsa-1", exp=10**400)
    error = await rejected(verifier_for(), token, "token_invalid")
    assert "exp claim is out of range" in error.message


async def test_alg_none_is_rejected(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier]
) -> None:
    now = int(time.time())
    claims = {"iss": issuer.url, "aud": AUDIENCE, "sub": "mallory", "exp": now + 300}
    token = unsigned_parts({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, claims) + "."
    await rejected(verifier_for(), token, "token_algorithm")


async def test_hs256_signed_with_the_public_key_is_rejected(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    # The classic confusion attack: the public key PEM used as an HMAC secret. PyJWT refuses to
    # sign with a PEM as HMAC key, so the token is put together by hand.
    secret = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    claims = {"iss": issuer.url, "aud": AUDIENCE, "sub": "mallory", "exp": now + 300}
    signing_input = unsigned_parts({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims)
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    await rejected(verifier_for(), f"{signing_input}.{b64(mac)}", "token_algorithm")


async def test_alg_must_fit_the_key_family(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], ec_key: ec.EllipticCurvePrivateKey
) -> None:
    # An ES256 token whose kid names the RSA key: the RSA key must not be tried for ES256.
    await rejected(verifier_for(), sign(issuer, ec_key, "rsa-1"), "token_algorithm")


async def test_disallowed_configured_algorithm(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], ec_key: ec.EllipticCurvePrivateKey
) -> None:
    await rejected(
        verifier_for(algorithms=["RS256"]), sign(issuer, ec_key, "ec-1"), "token_algorithm"
    )


async def test_tampered_signature(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    head, body, signature = sign(issuer, rsa_key, "rsa-1").split(".")
    middle = len(signature) // 2
    flipped = "A" if signature[middle] != "A" else "B"
    tampered = f"{head}.{body}.{signature[:middle]}{flipped}{signature[middle + 1 :]}"
    await rejected(verifier_for(), tampered, "token_invalid")


async def test_tampered_payload(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    head, _, signature = sign(issuer, rsa_key, "rsa-1").split(".")
    other = sign(issuer, rsa_key, "rsa-1", sub="admin").split(".")[1]
    await rejected(verifier_for(), f"{head}.{other}.{signature}", "token_invalid")


@pytest.mark.parametrize("token", ["", "not-a-jwt", "a.b.c", "e30.e30.e30"])
async def test_garbage_is_rejected_without_fetching(
    verifier_for: Callable[..., OidcVerifier], issuer: Issuer, token: str
) -> None:
    reason = "token_algorithm" if token == "e30.e30.e30" else "token_invalid"  # header {}: no alg
    await rejected(verifier_for(), token, reason)
    assert issuer.jwks_fetches == 0  # malformed tokens never reach the issuer


async def test_roles_from_a_dotted_claim(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = verifier_for(roles_claim="realm_access.roles")
    access = {"roles": ["publish", "read", 7]}
    identity = await verifier.verify(sign(issuer, rsa_key, "rsa-1", realm_access=access))
    assert identity.roles == frozenset({"publish", "read"})
    wrong_type = sign(issuer, rsa_key, "rsa-1", realm_access={"roles": "admin"})
    assert (await verifier.verify(wrong_type)).roles == frozenset()
    assert (await verifier.verify(sign(issuer, rsa_key, "rsa-1"))).roles == frozenset()


async def test_roles_ignored_when_not_configured(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    token = sign(issuer, rsa_key, "rsa-1", realm_access={"roles": ["admin"]})
    assert (await verifier_for().verify(token)).roles == frozenset()


async def test_custom_user_claim(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    token = sign(issuer, rsa_key, "rsa-1", preferred_username="dave")
    assert (await verifier_for(user_claim="preferred_username").verify(token)).user == "dave"


async def test_missing_user_claim(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    error = await rejected(
        verifier_for(), sign(issuer, rsa_key, "rsa-1", drop=("sub",)), "token_invalid"
    )
    assert "sub" in error.message


@pytest.mark.parametrize("claim", ["exp", "aud", "iss"])
async def test_missing_required_claim(
    issuer: Issuer,
    verifier_for: Callable[..., OidcVerifier],
    rsa_key: rsa.RSAPrivateKey,
    claim: str,
) -> None:
    await rejected(verifier_for(), sign(issuer, rsa_key, "rsa-1", drop=(claim,)), "token_invalid")


@pytest.mark.parametrize("user", ["", "has space", "x" * 201, "tab\there"])
async def test_user_claim_must_be_an_id(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey, user: str
) -> None:
    token = sign(issuer, rsa_key, "rsa-1", preferred_username=user)
    await rejected(verifier_for(user_claim="preferred_username"), token, "token_invalid")


async def test_user_claim_must_be_a_string(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    token = sign(issuer, rsa_key, "rsa-1", uid=42)
    await rejected(verifier_for(user_claim="uid"), token, "token_invalid")


async def test_missing_kid_with_one_key_uses_it(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    token = sign(issuer, rsa_key, None)
    await rejected(verifier_for(), token, "token_kid_unknown")  # two keys: ambiguous
    issuer.publish((rsa_key, "rsa-1"))
    assert (await verifier_for().verify(token)).user == "alice"


ISSUER_DOWN = "the OIDC issuer is unavailable, retry later"


async def unavailable(verifier: OidcVerifier, token: str, detail: str) -> Unavailable:
    """verify() fails with the 503 that names no URL, while the log has `detail` and the URL."""
    with capture_logs() as logs, pytest.raises(Unavailable) as caught:
        await verifier.verify(token)
    error = caught.value
    assert (error.status, error.message) == (503, ISSUER_DOWN)
    assert 1 <= int(error.headers["Retry-After"]) <= math.ceil(verifier._section.jwks_min_refresh)
    assert [e["event"] for e in logs] == ["oidc_jwks_refresh_failed"]
    assert detail in logs[0]["error"] and logs[0]["stale"] is False
    return error


async def test_discovery_issuer_mismatch_is_unavailable(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    issuer.claimed_issuer = "https://elsewhere.example/realms/test"
    token = sign(issuer, rsa_key, "rsa-1")
    await unavailable(verifier_for(), token, f"{issuer.url}/.well-known/openid-configuration")
    await unavailable(verifier_for(), token, "names issuer 'https://elsewhere.example")
    assert issuer.jwks_fetches == 0


async def test_discovery_not_found_is_unavailable(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = verifier_for(discovery_url=f"{issuer.base}/missing")
    await unavailable(verifier, sign(issuer, rsa_key, "rsa-1"), f"{issuer.base}/missing failed")
    verifier = verifier_for(discovery_url=f"{issuer.base}/missing")
    await unavailable(verifier, sign(issuer, rsa_key, "rsa-1"), "404")


async def test_non_http_discovery_url_is_unavailable(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = verifier_for(discovery_url="file:///etc/passwd")
    await unavailable(verifier, sign(issuer, rsa_key, "rsa-1"), "'file:///etc/passwd' is not http")


async def test_issuer_down_is_unavailable_not_unauthorized(
    issuer: Issuer, rsa_key: rsa.RSAPrivateKey
) -> None:
    section = OidcSection(
        enabled=True,
        issuer=f"http://127.0.0.1:{free_port()}/realms/test",
        audience=AUDIENCE,
        http_timeout=2.0,
        jwks_min_refresh=30.0,
    )
    verifier = OidcVerifier(section)
    token = sign(issuer, rsa_key, "rsa-1", iss=section.issuer)
    first = await unavailable(verifier, token, f"OIDC fetch of {section.issuer}/.well-known")
    assert not isinstance(first, Unauthorized)
    # The retry within jwks_min_refresh fails fast, also with 503, and is told to come back when
    # the next fetch may begin; it fetches nothing, so it logs nothing.
    with capture_logs() as logs, pytest.raises(Unavailable) as caught:
        await verifier.verify(token)
    assert caught.value.message == ISSUER_DOWN and logs == []
    assert 1 <= int(caught.value.headers["Retry-After"]) <= int(first.headers["Retry-After"])
    assert int(first.headers["Retry-After"]) >= 25  # 30 s less the refused connection's time
    await verifier.aclose()


# Tokens shaped as each issuer issues them, signed by the test issuer (whose URL becomes `iss`).
# The audience is the client id in every one: the set-up where an ID token would pass the
# audience check. Header typ first, then the claims beyond iss, aud, sub, iat and exp.
TENANT = "9188040d-6c67-4c5b-b112-36a304b66dad"
SHAPES: dict[str, tuple[str | None, dict[str, Any]]] = {
    # Keycloak 26: header typ JWT (at+jwt only with the client's RFC 9068 option), claim typ.
    "keycloak access": (
        "JWT",
        {
            "typ": "Bearer",
            "azp": AUDIENCE,
            "jti": "onrtac:5f1c",
            "sid": "3c0a",
            "acr": "1",
            "scope": "openid profile email",
            "realm_access": {"roles": ["publish"]},
            "preferred_username": "alice",
        },
    ),
    # Keycloak before 25 also copied the nonce into access tokens.
    "keycloak access, nonce (before 25)": (
        "JWT",
        {
            "typ": "Bearer",
            "azp": AUDIENCE,
            "nonce": "n-0S6_WzA2Mj",
            "session_state": "3c0a",
            "scope": "openid",
        },
    ),
    "keycloak access, RFC 9068 option": (
        "at+jwt",
        {"typ": "Bearer", "azp": AUDIENCE, "jti": "onrtac:5f1d", "scope": "openid"},
    ),
    "keycloak lightweight access": (
        "JWT",
        {"typ": "Bearer", "azp": AUDIENCE, "jti": "onrtac:5f1e", "sid": "3c0a", "scope": "openid"},
    ),
    "keycloak service account": (
        "JWT",
        {"typ": "Bearer", "azp": AUDIENCE, "scope": "profile email", "clientHost": "10.0.0.7"},
    ),
    # Auth0's default profile: typ JWT, scope, azp; machine-to-machine adds gty.
    "auth0 access": (
        "JWT",
        {
            "aud": [AUDIENCE, "https://tenant.eu.auth0.com/userinfo"],
            "azp": "Xk3c9",
            "sub": "auth0|6512",
            "scope": "openid profile publish",
        },
    ),
    "auth0 machine-to-machine": (
        "JWT",
        {"azp": "Xk3c9", "sub": "Xk3c9@clients", "gty": "client-credentials"},
    ),
    "auth0 access, RFC 9068 profile": (
        "at+jwt",
        {
            "aud": [AUDIENCE, "https://tenant.eu.auth0.com/userinfo"],
            "client_id": "Xk3c9",
            "sub": "auth0|6512",
            "jti": "73WakrfVbNJBaAmhQtEeDv",
            "scope": "openid profile",
        },
    ),
    # Entra ID: header typ always JWT; scp for delegated, roles for app-only, azpacr (v2.0) or
    # appid/appidacr (v1.0) in both.
    "entra v2 delegated": (
        "JWT",
        {
            "aio": "AXQAi/8",
            "azp": "6e74172b",
            "azpacr": "0",
            "name": "Alice",
            "oid": "690222be",
            "preferred_username": "alice@contoso.com",
            "rh": "I",
            "scp": "access_as_user",
            "tid": TENANT,
            "uti": "fqiBqXLPj0e",
            "ver": "2.0",
        },
    ),
    "entra v2 app-only": (
        "JWT",
        {
            "aio": "AXQAi/8",
            "azp": "6e74172b",
            "azpacr": "1",
            "oid": "f8d1",
            "rh": "I",
            "roles": ["publish"],
            "sub": "f8d1",
            "tid": TENANT,
            "uti": "fqiBqXLPj0f",
            "ver": "2.0",
            "idtyp": "app",
        },
    ),
    "entra v1 delegated": (
        "JWT",
        {
            "appid": "6e74172b",
            "appidacr": "0",
            "scp": "user_impersonation",
            "amr": ["pwd"],
            "unique_name": "alice@contoso.com",
            "tid": TENANT,
            "ver": "1.0",
        },
    ),
}
ID_SHAPES: dict[str, tuple[str | None, dict[str, Any]]] = {
    "keycloak id": (
        "JWT",
        {
            "typ": "ID",
            "azp": AUDIENCE,
            "nonce": "n-0S6",
            "sid": "3c0a",
            "at_hash": "JyMVmkVD",
            "acr": "1",
            "auth_time": 1,
            "email_verified": True,
            "preferred_username": "alice",
        },
    ),
    # Keycloak's ID token from a refresh carries no nonce: its typ claim still says ID.
    "keycloak id after refresh": ("JWT", {"typ": "ID", "azp": AUDIENCE, "sid": "3c0a"}),
    "auth0 id": (
        "JWT",
        {
            "sub": "auth0|6512",
            "name": "Alice",
            "nickname": "alice",
            "email": "alice@example.org",
            "sid": "Ho-7",
            "nonce": "bG9naW4",
        },
    ),
    "auth0 id, hybrid flow": (
        "JWT",
        {"sub": "auth0|6512", "sid": "Ho-7", "at_hash": "wfgv", "c_hash": "LDkt"},
    ),
    "entra v2 id": (
        "JWT",
        {
            "aio": "AXQAi/8",
            "name": "Alice",
            "nonce": "123523",
            "oid": "690222be",
            "preferred_username": "alice@contoso.com",
            "rh": "I",
            "roles": ["publish"],
            "tid": TENANT,
            "uti": "fqiBqXLPj0e",
            "ver": "2.0",
        },
    ),
    "cognito id": ("JWT", {"token_use": "id", "cognito:username": "alice", "auth_time": 1}),
    "id_token+jwt header": ("id_token+jwt", {}),
}


def shaped(issuer: Issuer, key: rsa.RSAPrivateKey, shape: tuple[str | None, dict[str, Any]]) -> str:
    header_typ, claims = shape
    return sign(issuer, key, "rsa-1", header_typ=header_typ, **claims)


@pytest.mark.parametrize("name", list(SHAPES))
async def test_access_tokens_of_keycloak_auth0_and_entra_are_accepted(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey,
    name: str,
) -> None:  # fmt: skip
    token = shaped(issuer, rsa_key, SHAPES[name])
    identity = await verifier_for().verify(token)
    assert identity.user == jwt.decode(token, options={"verify_signature": False})["sub"]


@pytest.mark.parametrize("name", list(ID_SHAPES))
async def test_id_tokens_are_refused_whatever_token_types_says(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey,
    name: str,
) -> None:  # fmt: skip
    token = shaped(issuer, rsa_key, ID_SHAPES[name])
    for verifier in (verifier_for(), verifier_for(token_types=["at+jwt", "bearer", "plain"])):
        error = await rejected(verifier, token, "token_type")
        assert error.message == "an ID token is not an access token"


@pytest.mark.parametrize(
    ("header_typ", "claims", "shown"),
    [
        ("JWT", {"typ": "Refresh", "azp": AUDIENCE}, "typ claim is 'Refresh'"),  # Keycloak
        ("JWT", {"typ": "Logout", "events": {}}, "typ claim is 'Logout'"),
        ("logout+jwt", {"events": {}}, "typ header is 'logout+jwt'"),  # back-channel logout
        ("dpop+jwt", {"scope": "openid"}, "typ header is 'dpop+jwt'"),
        ("JWT", {"typ": ["Bearer"], "scope": "x"}, "typ claim is ['Bearer']"),
    ],
)
async def test_other_kinds_of_token_are_refused(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey,
    header_typ: str, claims: dict[str, Any], shown: str,
) -> None:  # fmt: skip
    token = sign(issuer, rsa_key, "rsa-1", header_typ=header_typ, **claims)
    error = await rejected(verifier_for(token_types=["plain"]), token, "token_type")
    assert error.message == f"a token whose {shown} is not an access token"


@pytest.mark.parametrize(
    "header_typ", ["at+jwt", "application/at+jwt", "AT+JWT", "Application/AT+JWT"]
)
async def test_the_rfc_9068_media_type_in_any_spelling(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey,
    header_typ: str,
) -> None:  # fmt: skip
    token = sign(issuer, rsa_key, "rsa-1", header_typ=header_typ)  # no claim beyond the five
    assert (await verifier_for(token_types=["at+jwt"]).verify(token)).user == "alice"


async def test_an_untyped_jwt_without_access_claims_needs_plain(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    # Such as an ID token requested without a nonce: nothing tells it from an access token.
    for header_typ in ("JWT", None):
        token = sign(issuer, rsa_key, "rsa-1", header_typ=header_typ, sid="Ho-7", name="Alice")
        error = await rejected(verifier_for(), token, "token_type")
        assert error.message == "the token's kind (plain) is not in [oidc] token_types"
        assert (await verifier_for(token_types=["plain"]).verify(token)).user == "alice"


UNTYPED = {"auth0 access", "auth0 machine-to-machine", "entra v2 delegated", "entra v2 app-only",
           "entra v1 delegated"}  # fmt: skip


@pytest.mark.parametrize(
    ("token_types", "accepted"),
    [
        (["at+jwt"], {"keycloak access, RFC 9068 option", "auth0 access, RFC 9068 profile"}),
        (["bearer"], {name for name in SHAPES if name.startswith("keycloak")}),
        (["access-claims"], UNTYPED),
        (["plain"], UNTYPED),
    ],
)
async def test_token_types_selects_the_kinds(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey,
    token_types: list[str], accepted: set[str],
) -> None:  # fmt: skip
    """Each kind alone. A typed token (header at+jwt, claim typ) is of its type only: Keycloak's
    scope claim does not make its tokens "access-claims"."""
    verifier = verifier_for(token_types=token_types)
    outcomes: dict[str, str] = {}
    for name, shape in SHAPES.items():
        try:
            await verifier.verify(shaped(issuer, rsa_key, shape))
            outcomes[name] = "accepted"
        except Unauthorized as error:
            outcomes[name] = error.reason
    assert outcomes == {name: "accepted" if name in accepted else "token_type" for name in SHAPES}


# -- through the api: the 401 and its count ------------------------------------------------------

Client = AsyncTestClient[Any]


@pytest.fixture
def api_for(
    settings: dict[str, Any], resources: Resources
) -> Callable[[str], AsyncTestClient[Any]]:
    """The whole app on the run's services, trusting the issuer at `url`."""

    def make(url: str) -> Client:
        settings["oidc"] = {"enabled": True, "issuer": url, "audience": AUDIENCE,
                            "roles_claim": "realm_access.roles", "http_timeout": 2.0}  # fmt: skip
        return AsyncTestClient(app=create_app(Config.model_validate(settings)))

    return make


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_an_id_token_is_a_401_counted_by_its_reason(
    api_for: Callable[[str], Client], issuer: Issuer, rsa_key: rsa.RSAPrivateKey
) -> None:
    header_typ, claims = SHAPES["keycloak access"]
    access = sign(issuer, rsa_key, "rsa-1", header_typ=header_typ,
                  **{**claims, "realm_access": {"roles": ["manage"]}})  # fmt: skip
    id_token = shaped(issuer, rsa_key, ID_SHAPES["keycloak id"])
    async with api_for(issuer.url) as api:
        before = await auth_failures(api, "token_type")
        for token in (id_token, id_token):
            refused = await api.post(
                "/v1/conversations", json={"conversation": unique("oidc")}, headers=bearer(token)
            )
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == "Bearer"
            assert refused.json()["error"] == {
                "code": "token_type", "message": "an ID token is not an access token",
                "field": None}  # fmt: skip
        assert await auth_failures(api, "token_type") == before + 2
        created = await api.post(
            "/v1/conversations", json={"conversation": unique("oidc")}, headers=bearer(access)
        )
        assert created.status_code == 201, created.text
        assert await auth_failures(api, "token_type") == before + 2


async def test_issuer_down_is_a_503_with_retry_after_and_no_url(
    api_for: Callable[[str], Client], issuer: Issuer, rsa_key: rsa.RSAPrivateKey
) -> None:
    down = f"http://127.0.0.1:{free_port()}/realms/test"
    token = sign(issuer, rsa_key, "rsa-1", iss=down)
    async with api_for(down) as api:
        with capture_logs() as logs:
            answers = [
                await api.post("/v1/conversations", json={"conversation": unique("oidc")},
                               headers=bearer(token))
                for _ in range(2)
            ]  # fmt: skip
    for answer in answers:
        assert answer.status_code == 503
        assert answer.json()["error"] == {"code": "unavailable", "message": ISSUER_DOWN,
                                          "field": None}  # fmt: skip
        assert 1 <= int(answer.headers["retry-after"]) <= 10  # jwks_min_refresh's default
        assert "127.0.0.1" not in answer.text and "realms" not in answer.text
    failed = [e for e in logs if e["event"] == "oidc_jwks_refresh_failed"]
    assert len(failed) == 1  # the second request did not fetch again
    assert f"{down}/.well-known/openid-configuration" in failed[0]["error"]


# -- through a real api process: /v1/stream ------------------------------------------------------


async def stream_refusal(url: str, token: str) -> tuple[dict[str, Any], int | None, str]:
    """Connect to /v1/stream with `token`: the one error frame, the close code and reason."""
    frames: list[dict[str, Any]] = []
    async with (
        asyncio.timeout(20),
        connect(f"{url}/v1/stream?token={token}", open_timeout=10) as ws,
    ):
        with contextlib.suppress(ConnectionClosed):
            async for frame in ws:
                frames.append(json.loads(frame))
    assert [f["event"] for f in frames] == ["error"], frames
    return frames[0]["error"], ws.close_code, ws.close_reason or ""


async def test_the_stream_refuses_id_tokens_and_names_no_issuer_url(
    base_settings: dict[str, Any],
    migrated: str,
    tmp_path: Path,
    issuer: Issuer,
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    oidc = {"enabled": True, "issuer": issuer.url, "audience": AUDIENCE, "http_timeout": 1.0,
            "jwks_min_refresh": 1.0}  # fmt: skip
    process = ApiProcess(tmp_path, api_settings(copy.deepcopy(base_settings), tmp_path, oidc=oidc))
    url = process.ws_url.removesuffix("/v1/stream")
    id_token = shaped(issuer, rsa_key, ID_SHAPES["entra v2 id"])
    issuer.answering.clear()  # the JWKS fetch times out: no keys at all
    try:
        process.start()
        error, code, _ = await stream_refusal(url, id_token)
        assert (error["code"], error["message"], code) == ("unavailable", ISSUER_DOWN, 1013)
        assert f"{issuer.base}/jwks failed" in process.log()  # in the log, and only there
        issuer.answering.set()
        deadline = time.monotonic() + 20
        while error["code"] == "unavailable":  # until jwks_min_refresh lets a fetch begin
            assert time.monotonic() < deadline, "the keys were never fetched"
            await asyncio.sleep(0.2)
            error, code, reason = await stream_refusal(url, id_token)
        assert (error["code"], error["message"], code, reason) == (
            "token_type", "an ID token is not an access token", 4001, "token_type")  # fmt: skip
    finally:
        issuer.answering.set()
        process.stop()
