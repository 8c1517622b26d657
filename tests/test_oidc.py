"""OIDC bearer verification against a real HTTP issuer (discovery + JWKS) in a thread.

Keys are generated per module with `cryptography`; the issuer counts JWKS fetches and can swap
its key set (rotation), change the issuer it claims, or stop answering.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from structlog.testing import capture_logs

from appliance.auth.oidc import OidcIdentity, OidcVerifier
from appliance.config.model import OidcSection
from appliance.errors import Unauthorized, Unavailable
from tests.support import free_port

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

    def make(**overrides: Any) -> OidcVerifier:
        fields: dict[str, Any] = {
            "enabled": True,
            "issuer": issuer.url,
            "audience": AUDIENCE,
            "http_timeout": 2.0,
            **overrides,
        }
        made.append(OidcVerifier(OidcSection(**fields)))
        return made[-1]

    yield make
    for verifier in made:
        await verifier.aclose()


def sign(
    issuer: Issuer,
    key: PrivateKey,
    kid: str | None,
    *,
    alg: str | None = None,
    drop: tuple[str, ...] = (),
    **claims: Any,
) -> str:
    now = int(time.time())
    payload = {"iss": issuer.url, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300}
    payload.update(claims)
    for claim in drop:
        del payload[claim]
    algorithm = alg or ("RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256")
    headers = {"kid": kid} if kid is not None else {}
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
    verifier = verifier_for(jwks_min_refresh=0.5)
    await verifier.verify(sign(issuer, rsa_key, "rsa-1"))
    assert issuer.jwks_fetches == 1
    # Right after a fetch, an unknown kid does not refetch.
    await rejected(verifier, sign(issuer, rsa_key, "forged-0"), "token_kid_unknown")
    assert issuer.jwks_fetches == 1
    await asyncio.sleep(0.6)
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
    verifier = verifier_for(jwks_min_refresh=0.2)
    await verifier.verify(sign(issuer, rsa_key, "rsa-1"))
    issuer.publish((rsa_key_new, "rsa-2"))
    await asyncio.sleep(0.3)
    identity = await verifier.verify(sign(issuer, rsa_key_new, "rsa-2", sub="carol"))
    assert identity.user == "carol"
    assert issuer.jwks_fetches == 2
    # The retired key is gone from the refetched set.
    await rejected(verifier, sign(issuer, rsa_key, "rsa-1"), "token_kid_unknown")


async def eventually(condition: Callable[[], bool], what: str) -> None:
    for _ in range(100):
        if condition():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"{what} did not happen within 5 s")


async def test_cache_ttl_refetches_known_keys_in_the_background(
    issuer: Issuer,
    verifier_for: Callable[..., OidcVerifier],
    rsa_key: rsa.RSAPrivateKey,
    rsa_key_new: rsa.RSAPrivateKey,
) -> None:
    verifier = verifier_for(jwks_cache_ttl=0.2, jwks_min_refresh=0.1)
    token = sign(issuer, rsa_key, "rsa-1")
    await verifier.verify(token)
    issuer.publish((rsa_key, "rsa-1"), (rsa_key_new, "rsa-2"))
    await asyncio.sleep(0.3)
    assert (await verifier.verify(token)).user == "alice"  # the expired set still serves
    await eventually(lambda: issuer.jwks_fetches == 2, "the background refetch")
    # The refetched set is in use: a key published meanwhile verifies with no fetch of its own.
    await eventually(lambda: verifier._background is None, "the end of the refetch")
    assert (await verifier.verify(sign(issuer, rsa_key_new, "rsa-2", sub="bob"))).user == "bob"
    assert issuer.jwks_fetches == 2


async def test_a_hanging_issuer_delays_no_token_whose_key_is_known(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = verifier_for(jwks_cache_ttl=0.2, jwks_min_refresh=0.1, http_timeout=20)
    token = sign(issuer, rsa_key, "rsa-1")
    await verifier.verify(token)
    await asyncio.sleep(0.3)
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
    verifier = verifier_for(jwks_min_refresh=0.1, http_timeout=20)
    await verifier.verify(sign(issuer, rsa_key, "rsa-1"))
    await asyncio.sleep(0.2)
    issuer.publish((rsa_key_new, "rsa-2"))
    issuer.answering.clear()
    token = sign(issuer, rsa_key_new, "rsa-2", sub="carol")
    first = asyncio.ensure_future(verifier.verify(token))
    await eventually(lambda: issuer.jwks_fetches == 2, "the refetch for the new kid")
    later = [asyncio.ensure_future(verifier.verify(token)) for _ in range(5)]
    await asyncio.sleep(0.3)  # past jwks_min_refresh while the fetch is still held
    issuer.answering.set()
    results = await asyncio.wait_for(asyncio.gather(first, *later), 5)
    assert [r.user for r in results] == ["carol"] * 6
    assert issuer.jwks_fetches == 2


async def test_stale_keys_survive_an_issuer_outage(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = verifier_for(jwks_cache_ttl=0.2, jwks_min_refresh=0.1)
    token = sign(issuer, rsa_key, "rsa-1")
    await verifier.verify(token)
    issuer.stop()
    await asyncio.sleep(0.3)
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


async def test_discovery_issuer_mismatch_is_unavailable(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    issuer.claimed_issuer = "https://elsewhere.example/realms/test"
    with pytest.raises(Unavailable, match=r"elsewhere\.example") as caught:
        await verifier_for().verify(sign(issuer, rsa_key, "rsa-1"))
    assert caught.value.status == 503
    assert issuer.jwks_fetches == 0


async def test_discovery_not_found_is_unavailable(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    verifier = verifier_for(discovery_url=f"{issuer.base}/missing")
    with pytest.raises(Unavailable, match="404"):
        await verifier.verify(sign(issuer, rsa_key, "rsa-1"))


async def test_non_http_discovery_url_is_unavailable(
    issuer: Issuer, verifier_for: Callable[..., OidcVerifier], rsa_key: rsa.RSAPrivateKey
) -> None:
    with pytest.raises(Unavailable, match="not http"):
        await verifier_for(discovery_url="file:///etc/passwd").verify(
            sign(issuer, rsa_key, "rsa-1")
        )


async def test_issuer_down_is_unavailable_not_unauthorized(
    issuer: Issuer, rsa_key: rsa.RSAPrivateKey
) -> None:
    section = OidcSection(
        enabled=True,
        issuer=f"http://127.0.0.1:{free_port()}/realms/test",
        audience=AUDIENCE,
        http_timeout=2.0,
    )
    verifier = OidcVerifier(section)
    token = sign(issuer, rsa_key, "rsa-1", iss=section.issuer)
    for _ in range(2):  # the retry within jwks_min_refresh fails fast, also with 503
        with pytest.raises(Unavailable) as caught:
            await verifier.verify(token)
        assert not isinstance(caught.value, Unauthorized)
        assert caught.value.status == 503
    await verifier.aclose()
