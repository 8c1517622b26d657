"""Where a webhook may be delivered: the URL's form, and the addresses its host resolves to.

A receiver URL is the admin's, but the host it names is whatever DNS says at delivery time, so
the check runs at delivery, on the resolved addresses, and the connection goes to the address
that passed (never to a second lookup's answer, which DNS rebinding could change). Unless
`[webhooks] allow_private` is true, an address is refused when it is not globally routable:
loopback, RFC 1918 and other private ranges, IPv6 unique-local and site-local (fec0::/10),
link-local (cloud metadata at 169.254.169.254), multicast, unspecified, "this network"
(0.0.0.0/8), shared CGNAT (100.64.0.0/10), benchmarking (198.18.0.0/15), reserved (240.0.0.0/4),
documentation space, IPv4-compatible IPv6 (::a.b.c.d), and IPv6 forms that embed such an IPv4
address (mapped, 6to4, Teredo's server or client, NAT64 64:ff9b::/96). The ranges are listed
here as well as asked of `ipaddress`, whose answers differ between Python versions (3.11 calls
fec0::1 global). If any address a host resolves to is refused, the host is.

Lookups run on a few threads of their own (`LOOKUP_THREADS`), never the loop's default
executor: a cancelled lookup frees its coroutine, not its thread, so a receiver whose DNS hangs
would otherwise fill the pool that `asyncio.to_thread` shares with the rest of the worker.
While every lookup thread is busy, a delivery waits for one within its own timeout. Answers are
kept `DNS_TTL` seconds (checked again on every use: the check depends on the config).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import SplitResult, urlsplit

from appliance.errors import ApplianceError, Invalid

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_URL = 2048
LOOKUP_THREADS = 4  # DNS lookups at once, on threads of their own
DNS_TTL = 30.0  # seconds an answer is reused
DNS_CACHE_MAX = 1024  # hosts remembered at most
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# Asked explicitly (not only of ipaddress's is_private/is_global, which vary by Python version).
_REFUSED: tuple[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network], ...] = (
    ("this-network", ipaddress.IPv4Network("0.0.0.0/8")),
    ("shared (CGNAT)", ipaddress.IPv4Network("100.64.0.0/10")),
    ("benchmarking", ipaddress.IPv4Network("198.18.0.0/15")),
    ("reserved", ipaddress.IPv4Network("240.0.0.0/4")),
    ("site-local", ipaddress.IPv6Network("fec0::/10")),
    ("IPv4-compatible", ipaddress.IPv6Network("::/96")),
)
Lookup = Callable[[str, int], Sequence[tuple[Any, ...]]]


class Unreachable(ApplianceError):
    """A delivery target refused before connecting (its address) or not resolved."""

    code = "unreachable"


@dataclass(frozen=True)
class Target:
    """A vetted delivery target: connect to one of `ips` (in order), speak to `host`."""

    scheme: str
    host: str  # as in the URL (the Host header and TLS server name)
    ips: tuple[IP, ...]  # every address the host resolved to, all checked
    port: int
    path: str  # path and query, at least "/"

    def url(self, ip: IP) -> str:
        literal = f"[{ip}]" if ip.version == 6 else str(ip)
        return f"{self.scheme}://{literal}:{self.port}{self.path}"

    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def check_url(url: str, *, allow_private: bool, field: str = "url") -> SplitResult:
    """`url` split, if it is an absolute http(s) URL with a host, no user info and no fragment,
    and (unless `allow_private`) its host is not a literal non-public address; else Invalid."""
    if len(url) > MAX_URL:
        raise Invalid(f"must be at most {MAX_URL} characters", field=field)
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise Invalid("must not contain whitespace or control characters", field=field)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        if "port" in str(exc).lower():
            raise Invalid("port must be 1-65535", field=field) from None
        raise Invalid(f"is not a valid URL: {exc}", field=field) from None
    if parts.scheme not in ("http", "https"):
        raise Invalid("must be an http or https URL", field=field)
    if not parts.hostname:
        raise Invalid("must name a host", field=field)
    if parts.username is not None or parts.password is not None:
        raise Invalid("must not carry user info (user:password@): use the signature", field=field)
    if parts.fragment or url.endswith("#"):
        raise Invalid("must not have a fragment (#...)", field=field)
    if port == 0:
        raise Invalid("port must be 1-65535", field=field)
    literal = _literal(parts.hostname)
    if literal is not None and not allow_private:
        reason = refused(literal)
        if reason is not None:
            raise Invalid(
                f"host is a {reason} address, refused unless [webhooks] allow_private",
                field=field,
            )
    return parts


def refused(ip: IP) -> str | None:
    """Why `ip` is not a public delivery address (None: it is). An IPv6 address that embeds an
    IPv4 one (mapped, 6to4, Teredo, NAT64) is judged by what it embeds."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
        if ip in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        inner = [v4 for v4 in embedded if v4 is not None]
        if inner:
            reason = next((r for r in map(refused, inner) if r is not None), None)
            return None if reason is None else f"{reason} (embedded in IPv6)"
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        *((name, ip.version == net.version and ip in net) for name, net in _REFUSED),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
        ("non-global", not ip.is_global),
    )
    return next((name for name, hit in checks if hit), None)


def _getaddrinfo(host: str, port: int) -> Sequence[tuple[Any, ...]]:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


class Resolver:
    """DNS lookups on `threads` threads of their own, answers kept `ttl` seconds. A lookup
    holds its thread until getaddrinfo returns, even when its caller gave up: callers wait for
    a free thread (within their own timeout) instead of queueing behind hung lookups."""

    def __init__(
        self,
        lookup: Lookup = _getaddrinfo,
        *,
        threads: int = LOOKUP_THREADS,
        ttl: float = DNS_TTL,
        size: int = DNS_CACHE_MAX,
    ) -> None:
        self._lookup = lookup
        self._threads = threads
        self._ttl = ttl
        self._size = size
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="webhook-dns")
        self._free = threading.Semaphore(threads)
        self._lock = threading.Lock()
        self._busy = 0
        self._answers: dict[tuple[str, int], tuple[float, tuple[IP, ...]]] = {}

    def close(self) -> None:
        """Let the threads end once their lookups return (tests; the process's resolver lives
        as long as the process)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def busy(self) -> int:
        """Lookup threads running getaddrinfo now (callers that gave up included)."""
        return self._busy

    async def addresses(self, host: str, port: int) -> tuple[IP, ...]:
        """`host`'s addresses in the resolver's order, without repeats (one per socket type
        and protocol); Unreachable if it does not resolve."""
        now = time.monotonic()
        known = self._answers.get((host, port))
        if known is not None and known[0] > now:
            return known[1]
        # Every thread busy (slow DNS): wait for one, within the caller's timeout. The slot is
        # freed from a thread, which no asyncio.Event of this loop can be set from directly.
        while not self._free.acquire(blocking=False):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        try:
            future = self._executor.submit(self._run, host, port)
        except BaseException:
            self._free.release()
            raise
        # Freed when the lookup ends, or when it is cancelled before its thread took it.
        future.add_done_callback(lambda _: self._free.release())
        try:
            infos = await asyncio.wrap_future(future)
        except (socket.gaierror, UnicodeError) as exc:
            raise Unreachable(f"host {host!r} did not resolve: {exc}") from None
        found = [ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos]
        answer = tuple(dict.fromkeys(found))
        if not answer:
            raise Unreachable(f"host {host!r} resolved to no address")
        self._remember((host, port), answer)
        return answer

    def _run(self, host: str, port: int) -> Sequence[tuple[Any, ...]]:
        with self._lock:
            self._busy += 1
        try:
            return self._lookup(host, port)
        finally:
            with self._lock:
                self._busy -= 1

    def _remember(self, key: tuple[str, int], answer: tuple[IP, ...]) -> None:
        now = time.monotonic()
        if len(self._answers) >= self._size:
            for old in [k for k, (until, _) in self._answers.items() if until <= now]:
                del self._answers[old]
            while len(self._answers) >= self._size:
                del self._answers[next(iter(self._answers))]  # the oldest answer
        self._answers.pop(key, None)
        self._answers[key] = (now + self._ttl, answer)


@cache
def resolver() -> Resolver:
    """The process's resolver (made at first use; its threads start with the first lookup)."""
    return Resolver()


async def resolve(url: str, *, allow_private: bool, dns: Resolver | None = None) -> Target:
    """The target to connect to for `url`: its host resolved (by `dns`, default the process's
    resolver), every address checked. Raises Unreachable (not resolved, or refused) or Invalid
    (the URL's form)."""
    parts = check_url(url, allow_private=allow_private)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    literal = _literal(host)
    if literal is not None:
        addresses: tuple[IP, ...] = (literal,)
    else:
        addresses = await (dns or resolver()).addresses(host, port)
    if not allow_private:
        for ip in addresses:
            reason = refused(ip)
            if reason is not None:
                raise Unreachable(
                    f"host {host!r} resolves to {ip}, a {reason} address "
                    "(refused unless [webhooks] allow_private)"
                )
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    return Target(parts.scheme, host, addresses, port, path)


def _literal(host: str) -> IP | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None
