"""One delivery attempt: a signed POST to a vetted address, bounded in time and memory.

The whole attempt (resolution, connect, TLS, send, answer) runs under `[webhooks] timeout`; at
most `[webhooks] max_response_bytes` of the answer's body are read and none of it kept;
redirects are never followed (a 3xx is a failure: a receiver that moved must be re-registered,
and following it would send the events, signed, to a host nobody vetted). The connection goes to
the address addresses.resolve() checked, with the URL's host in the Host header and as the TLS
server name, so certificates are verified against the host the admin registered.

Connections are kept open between deliveries (a new TCP connection and TLS handshake per
delivery cost most of its CPU): each event loop keeps up to `MAX_CLIENTS` httpx clients, one per
(scheme, host, vetted address, port), each closed after `IDLE` seconds unused. The host is part
of the key because httpx pools connections by the address it connects to: two hosts on one
address must not share a TLS connection verified for the other's name. A client whose address
the host no longer resolves to is simply not used again and idles out. The worker closes them
when it stops (`close_clients`). A POST on a kept connection that the receiver closed just then
(its keep-alive ran out) is sent once more on a new connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ssl
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cache
from typing import Literal

import httpx

from appliance import __version__
from appliance.config.model import WebhooksSection
from appliance.errors import Invalid
from appliance.webhooks.addresses import IP, Target, Unreachable, resolve

Outcome = Literal["delivered", "http_error", "redirect", "timeout", "connection", "refused"]
USER_AGENT = f"appliance-webhooks/{__version__}"
IDLE = 30.0  # seconds an unused client (and its kept-alive connections) stays open
MAX_CLIENTS = 32  # open clients per event loop at most (past it, the least recently used goes)
KEEP_ALIVE = 4  # idle connections a client keeps (one per concurrent delivery to it)


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
    pool = clients()
    for n, ip in enumerate(target.ips, 1):
        for again in (False, True):
            kept = pool.kept(target, ip, tls or _tls())
            try:
                async with pool.lease(target, ip, tls or _tls()) as http:
                    return await _send(
                        http, target.url(ip), body, headers, extensions, max_bytes, timeout
                    )
            except httpx.ConnectError:
                if n == len(target.ips):
                    raise
                break
            except (httpx.RemoteProtocolError, httpx.WriteError):
                # A kept connection the receiver closed just as it was reused (its keep-alive
                # ran out): once more, on a new connection. Receivers drop a repeat by
                # Webhook-Id in case the first one got through.
                if again or not kept:
                    raise
    raise ValueError(f"no address to connect to for {target.host!r}")  # resolve() gives one


async def _send(
    http: httpx.AsyncClient,
    url: str,
    body: bytes,
    headers: dict[str, str],
    extensions: dict[str, str],
    max_bytes: int,
    timeout: float,
) -> tuple[int, str, int]:
    """One POST: the status, the Location header, and the bytes of the body read (at most
    `max_bytes` and one network read more; none are kept)."""
    read = 0
    async with http.stream(
        "POST", url, content=body, headers=headers, extensions=extensions, timeout=timeout
    ) as response:
        async for chunk in response.aiter_raw():
            read += len(chunk)
            if read >= max_bytes:
                break  # the rest is never read; closing drops the connection
        return response.status_code, response.headers.get("location", ""), read


ClientKey = tuple[str, str, str, int, ssl.SSLContext]  # scheme, host, address, port, TLS


@dataclass
class _Open:
    http: httpx.AsyncClient
    users: int = 0  # deliveries using it now
    used: float = 0.0  # time.monotonic() its last user finished


def _client(tls: ssl.SSLContext) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        verify=tls,
        follow_redirects=False,
        trust_env=False,  # no proxy from the environment: connect to the vetted address
        limits=httpx.Limits(max_keepalive_connections=KEEP_ALIVE, keepalive_expiry=IDLE),
    )


class Clients:
    """The open clients of one event loop, kept between deliveries (see the module's doc)."""

    def __init__(self, *, idle: float = IDLE, size: int = MAX_CLIENTS) -> None:
        self._idle = idle
        self._size = size
        self._open: dict[ClientKey, _Open] = {}
        self._closing = False

    def __len__(self) -> int:
        return len(self._open)

    def kept(self, target: Target, ip: IP, tls: ssl.SSLContext) -> bool:
        """Whether a client for `target` at `ip` has served a delivery already (its connection
        may be reused)."""
        entry = self._open.get((target.scheme, target.host, str(ip), target.port, tls))
        return entry is not None and entry.used > 0

    @asynccontextmanager
    async def lease(
        self, target: Target, ip: IP, tls: ssl.SSLContext
    ) -> AsyncIterator[httpx.AsyncClient]:
        """The client for `target` at `ip`; a client of its own, closed after use, while
        closing or when every kept client is in use."""
        await self._sweep()
        key = (target.scheme, target.host, str(ip), target.port, tls)
        entry = self._open.get(key)
        if entry is None and not self._closing and await self._room():
            entry = self._open[key] = _Open(_client(tls))
        if entry is None:
            async with _client(tls) as once:
                yield once
            return
        entry.users += 1
        try:
            yield entry.http
        finally:
            entry.users -= 1
            entry.used = time.monotonic()
            if self._closing and not entry.users:
                self._open.pop(key, None)
                await entry.http.aclose()

    async def _sweep(self) -> None:
        """Close the clients unused for `idle` seconds."""
        now = time.monotonic()
        stale = [k for k, e in self._open.items() if not e.users and now - e.used >= self._idle]
        for key in stale:
            await self._open.pop(key).http.aclose()

    async def _room(self) -> bool:
        """Whether a client may be added (closing the least recently used idle one if full)."""
        if len(self._open) < self._size:
            return True
        idle = [(e.used, k) for k, e in self._open.items() if not e.users]
        if not idle:
            return False
        await self._open.pop(min(idle)[1]).http.aclose()
        return True

    async def aclose(self) -> None:
        """Close the idle clients now, and those in use when their delivery ends."""
        self._closing = True
        for key in [k for k, e in self._open.items() if not e.users]:
            await self._open.pop(key).http.aclose()


# Each event loop's clients (a connection belongs to the loop that opened it). Filled at the
# first delivery, emptied by close_clients; a loop that is collected takes its entry with it.
_CLIENTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Clients] = (
    weakref.WeakKeyDictionary()
)


def clients() -> Clients:
    """The running event loop's clients."""
    loop = asyncio.get_running_loop()
    found = _CLIENTS.get(loop)
    if found is None:
        found = _CLIENTS[loop] = Clients()
    return found


async def close_clients() -> None:
    """Close the running loop's kept clients (the worker, when it stops; tests)."""
    found = _CLIENTS.pop(asyncio.get_running_loop(), None)
    if found is not None:
        await found.aclose()
