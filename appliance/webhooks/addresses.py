"""Where a webhook may be delivered: the URL's form, and the addresses its host resolves to.

A receiver URL is the admin's, but the host it names is whatever DNS says at delivery time, so
the check runs at delivery, on the resolved addresses, and the connection goes to the address
that passed (never to a second lookup's answer, which DNS rebinding could change). Unless
`[webhooks] allow_private` is true, an address is refused when it is not globally routable:
loopback, RFC 1918 and other private ranges, IPv6 unique-local, link-local (cloud metadata at
169.254.169.254), multicast, unspecified, reserved, documentation and shared CGNAT
(100.64.0.0/10) space, and IPv6 forms that embed such an IPv4 address (mapped, 6to4, Teredo,
NAT64). If any address a host resolves to is refused, the host is.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from appliance.errors import ApplianceError, Invalid

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_URL = 2048
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")


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
    """Why `ip` is not a public delivery address (None: it is)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = refused(embedded)
            return None if inner is None else f"{inner} (embedded in IPv6)"
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("shared (CGNAT)", isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
        ("non-global", not ip.is_global),
    )
    return next((name for name, hit in checks if hit), None)


async def resolve(url: str, *, allow_private: bool) -> Target:
    """The target to connect to for `url`: its host resolved once, every address checked.
    Raises Unreachable (not resolved, or refused) or Invalid (the URL's form)."""
    parts = check_url(url, allow_private=allow_private)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    literal = _literal(host)
    if literal is not None:
        addresses: list[IP] = [literal]
    else:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except (socket.gaierror, UnicodeError) as exc:
            raise Unreachable(f"host {host!r} did not resolve: {exc}") from None
        # In the resolver's order, without repeats (one per socket type and protocol).
        found = [ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos]
        addresses = list(dict.fromkeys(found))
        if not addresses:
            raise Unreachable(f"host {host!r} resolved to no address")
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
    return Target(parts.scheme, host, tuple(addresses), port, path)


def _literal(host: str) -> IP | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None
