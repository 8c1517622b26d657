"""One delivery attempt: a signed POST to a vetted address, bounded in time and memory.

The whole attempt (resolution, connect, TLS, send, answer) runs under `[webhooks] timeout`; at
most `[webhooks] max_response_bytes` of the answer's body are read and none of it kept;
redirects are never followed (a 3xx is a failure: a receiver that moved must be re-registered,
and following it would send the events, signed, to a host nobody vetted). The connection goes to
the address addresses.resolve() checked, with the URL's host in the Host header and as the TLS
server name, so certificates are verified against the host the admin registered.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ssl
import time
from dataclasses import dataclass
from functools import cache
from typing import Literal

import httpx

from appliance import __version__
from appliance.config.model import WebhooksSection
from appliance.errors import Invalid
from appliance.webhooks.addresses import Unreachable, resolve

Outcome = Literal["delivered", "http_error", "redirect", "timeout", "connection", "refused"]
USER_AGENT = f"appliance-webhooks/{__version__}"


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    status: int | None  # the receiver's HTTP status, if it answered
    error: str | None
    duration: float  # seconds
    read: int  # bytes of the answer's body read

    @property
    def ok(self) -> bool:
        return self.outcome == "delivered"


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The `Webhook-Signature` header value: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"v1={mac.hexdigest()}"


def headers(delivery: str, secret: str, body: bytes, now: float | None = None) -> dict[str, str]:
    timestamp = int(time.time() if now is None else now)
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "Webhook-Id": delivery,
        "Webhook-Timestamp": str(timestamp),
        "Webhook-Signature": signature(secret, timestamp, body),
    }


@cache
def _tls() -> ssl.SSLContext:
    """One verifying TLS context per process (loading the CA bundle costs milliseconds)."""
    return ssl.create_default_context()


async def post(url: str, delivery: str, secret: str, body: bytes, cfg: WebhooksSection) -> Result:
    """POST `body` to `url` once; never raises for what the receiver or the network does."""
    start = time.monotonic()
    outcome: Outcome
    status: int | None = None
    error: str | None = None
    read = 0
    try:
        async with asyncio.timeout(cfg.timeout):
            target = await resolve(url, allow_private=cfg.allow_private)
            sent = headers(delivery, secret, body)
            sent["Host"] = target.host_header()
            extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
            async with (
                httpx.AsyncClient(
                    verify=_tls(),
                    timeout=cfg.timeout,
                    follow_redirects=False,
                    trust_env=False,  # no proxy from the environment: connect to the vetted address
                ) as http,
                http.stream(
                    "POST", target.url(), content=body, headers=sent, extensions=extensions
                ) as response,
            ):
                status = response.status_code
                async for chunk in response.aiter_raw():
                    read += len(chunk)
                    if read >= cfg.max_response_bytes:
                        break  # the rest is never read; closing drops the connection
        if 200 <= status < 300:
            outcome = "delivered"
        elif 300 <= status < 400:
            outcome = "redirect"
            location = response.headers.get("location", "")[:200]
            error = f"HTTP {status} redirect to {location!r} (redirects are not followed)"
        else:
            outcome = "http_error"
            error = f"HTTP {status}"
    except TimeoutError:
        outcome, error = "timeout", f"no complete answer within {cfg.timeout:g} s"
    except httpx.TimeoutException:
        outcome, error = "timeout", f"no complete answer within {cfg.timeout:g} s"
    except (Unreachable, Invalid) as exc:
        outcome, error = "refused", exc.message
    except (httpx.HTTPError, OSError, ssl.SSLError) as exc:
        outcome, error = "connection", f"{type(exc).__name__}: {exc}"[:500]
    return Result(outcome, status, error, time.monotonic() - start, read)
