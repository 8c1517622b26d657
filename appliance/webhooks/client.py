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
from appliance.webhooks.addresses import Target, Unreachable, resolve

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


async def post(
    url: str,
    delivery: str,
    secret: str,
    body: bytes,
    cfg: WebhooksSection,
    *,
    tls: ssl.SSLContext | None = None,
) -> Result:
    """POST `body` to `url` once, within `[webhooks] timeout` from resolution to the answer;
    never raises for what the receiver or the network does. `tls` verifies certificates
    (default: the system's CAs)."""
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
            status, location, read = await exchange(
                target, body, sent, cfg.max_response_bytes, cfg.timeout, tls
            )
        if 200 <= status < 300:
            outcome = "delivered"
        elif 300 <= status < 400:
            outcome = "redirect"
            error = f"HTTP {status} redirect to {location[:200]!r} (redirects are not followed)"
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


async def exchange(
    target: Target,
    body: bytes,
    headers: dict[str, str],
    max_bytes: int,
    timeout: float,
    tls: ssl.SSLContext | None = None,
) -> tuple[int, str, int]:
    """POST `body` to `target`, trying its addresses in order while connecting fails (an IPv6
    address first with an IPv4-only receiver): the status, the Location header, and the bytes
    of the answer's body read (at most `max_bytes` and one network read more; none kept).
    Raises httpx's errors. `timeout` bounds each step (connect, write, read); the caller bounds
    the whole."""
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    async with httpx.AsyncClient(
        verify=tls or _tls(),
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,  # no proxy from the environment: connect to the vetted address
    ) as http:
        for n, ip in enumerate(target.ips, 1):
            try:
                return await _send(http, target.url(ip), body, headers, extensions, max_bytes)
            except httpx.ConnectError:
                if n == len(target.ips):
                    raise
    raise ValueError(f"no address to connect to for {target.host!r}")  # resolve() gives one


async def _send(
    http: httpx.AsyncClient,
    url: str,
    body: bytes,
    headers: dict[str, str],
    extensions: dict[str, str],
    max_bytes: int,
) -> tuple[int, str, int]:
    """One POST: the status, the Location header, and the bytes of the body read (at most
    `max_bytes` and one network read more; none are kept)."""
    read = 0
    async with http.stream(
        "POST", url, content=body, headers=headers, extensions=extensions
    ) as response:
        async for chunk in response.aiter_raw():
            read += len(chunk)
            if read >= max_bytes:
                break  # the rest is never read; closing drops the connection
        return response.status_code, response.headers.get("location", ""), read
