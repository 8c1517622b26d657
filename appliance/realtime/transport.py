"""Ending a WebSocket's connection within a bound, whatever the peer does.

granian writes the close frame and then drops the connection at once: it never waits for the
peer's answer. But writing the frame waits for room in the socket's send buffer, and a peer that
stopped reading (a slow consumer) never makes any: the handler, and the TCP connection with the
megabytes queued for it, would stay until the peer went away. So a close gets `timeout`. Past
it, the connection is marked for reset (SO_LINGER 0) and the close abandoned, which makes
granian drop the transport: the kernel sends RST and frees what was queued, where a plain close
would leave an orphan in FIN-WAIT-1 for as long as the peer acknowledges window probes.

ASGI gives the app no handle on the socket. The one this process holds for the connection is
found by its two addresses among the process's descriptors, for all waiting resets in one walk.
The scope's server address is granian's bind address, not the socket's own: an unspecified one
(0.0.0.0, ::) matches any local address, on the port and the peer's address alone.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from litestar import WebSocket

log = structlog.get_logger()
Pair = tuple[tuple[str, int], tuple[str, int]]  # (this end, the peer), as in the ASGI scope
_LINGER_ZERO = struct.pack("ii", 1, 0)


async def close(
    ws: WebSocket[Any, Any, Any], code: int, reason: str, timeout: float, resets: Resets
) -> bool:
    """Send a close frame; False if it was not written within `timeout` and the connection is
    reset instead. Either way granian has dropped the connection when this returns."""
    # litestar marks the socket gone on any websocket.disconnect, but a frame granian refused
    # leaves the transport able to carry a close (see Session.receiver).
    ws.connection_state = "receive"
    sending = asyncio.ensure_future(ws.close(code, reason))
    done, _ = await asyncio.wait({sending}, timeout=timeout)
    if not done:
        await resets.reset(ws.scope)
        sending.cancel()
        await asyncio.wait({sending})
    if not sending.cancelled():
        sending.exception()  # the peer may be gone already: nothing to close
    return bool(done)


class Resets:
    """Marks this process's sockets for reset, many at once: a walk over a few thousand
    descriptors takes tens of milliseconds, and slow consumers tend to come in crowds."""

    def __init__(self) -> None:
        self._wanted: dict[Pair, asyncio.Future[bool]] = {}
        self._walker: asyncio.Task[None] | None = None

    async def reset(self, scope: Any) -> bool:
        """True if the connection of `scope` was found and marked: its close is then a RST."""
        server, client = scope.get("server"), scope.get("client")
        if not server or not client:
            return False
        pair: Pair = ((str(server[0]), int(server[1])), (str(client[0]), int(client[1])))
        waiter = self._wanted.get(pair)
        if waiter is None:
            waiter = self._wanted[pair] = asyncio.get_running_loop().create_future()
        if self._walker is None:
            self._walker = asyncio.create_task(self._walk())
        found = await asyncio.shield(waiter)
        if not found:
            log.warning("websocket_reset_not_found", server=pair[0], client=pair[1])
        return found

    async def _walk(self) -> None:
        try:
            while self._wanted:
                batch, self._wanted = self._wanted, {}
                try:
                    found = await asyncio.to_thread(linger_zero, set(batch))
                except Exception as exc:  # /proc unreadable: the close still ends the handler
                    log.warning("websocket_reset_failed", error=str(exc))
                    found = set()
                for pair, waiter in batch.items():
                    if not waiter.done():
                        waiter.set_result(pair in found)
        finally:
            self._walker = None


def _host(address: str) -> str:
    """`address` in one spelling: an IPv4-mapped IPv6 address as the IPv4 one."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _unspecified(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_unspecified
    except ValueError:
        return False


def matches(wanted: Pair, local: tuple[str, int], peer: tuple[str, int]) -> bool:
    """Whether a socket with these addresses is the connection of `wanted` (a scope's pair,
    whose server address may be the unspecified one it was bound to)."""
    (server, server_port), (client, client_port) = wanted
    if (local[1], _host(peer[0]), peer[1]) != (server_port, _host(client), client_port):
        return False
    return _unspecified(server) or _host(server) == _host(local[0])


def linger_zero(wanted: set[Pair]) -> set[Pair]:
    """Set SO_LINGER 0 on this process's TCP sockets that are the connection of a pair in
    `wanted` (see `matches`); the pairs found. Options belong to the socket, so a duplicate
    descriptor serves, and it is checked after duplicating: a descriptor reused meanwhile is
    never touched."""
    found: set[Pair] = set()
    by_peer: dict[tuple[int, str, int], list[Pair]] = {}
    for pair in wanted:
        by_peer.setdefault((pair[0][1], _host(pair[1][0]), pair[1][1]), []).append(pair)
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:  # not Linux: no reset, the close still ends the handler
        return found
    for name in names:
        if len(found) == len(wanted):
            break
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            copy = os.dup(int(name))
        except OSError:  # closed meanwhile
            continue
        try:
            sock = socket.socket(fileno=copy)
        except OSError:  # a family Python does not know
            os.close(copy)
            continue
        with sock:
            if sock.type != socket.SOCK_STREAM or sock.family not in (
                socket.AF_INET,
                socket.AF_INET6,
            ):
                continue
            try:
                local, peer = sock.getsockname(), sock.getpeername()
            except OSError:  # a listener, or not connected
                continue
            candidates = by_peer.get((local[1], _host(peer[0]), peer[1]), [])
            hits = [pair for pair in candidates if matches(pair, local[:2], peer[:2])]
            if hits:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
                found.update(hits)
    return found
