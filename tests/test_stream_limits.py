"""`/v1/stream` at its limits, against real granian processes: a peer that never reads the close,
sockets per principal across processes, oversized frames, the close code at shutdown, and a
resume after Redis lost its data.

Every wait has a deadline; the bounds asserted are the configured ones plus a wide margin.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import os
import signal
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from appliance.realtime.slots import Slots
from appliance.realtime.transport import linger_zero, matches
from appliance.redis_keys import Keys
from tests.api_process import ApiProcess, admin_key, api_settings
from tests.test_stream import Api, api_client, recv

pytestmark = pytest.mark.process

TIMEOUT = 10.0  # per receive: only so that a broken build fails instead of hanging
NOISE = frozenset({"ping", "presence", "receipt"})
Frame = dict[str, Any]


# -- processes and clients -----------------------------------------------------------------------


async def closed_total(api: Api, code: int) -> float:
    response = await api.http.get("/metrics")
    assert response.status_code == 200, response.text
    return samples_with(response.text, "appliance_websocket_closed_total", reason=str(code))


async def subscriber_key(api: Api) -> str:
    return (await api.key("subscribe"))[1]


def samples_with(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def expect(ws: ClientConnection, event: str) -> Frame:
    """The next `event` frame; only noise may come first. Pings keep each receive short of its
    timeout, so the whole wait has a deadline of its own."""
    try:
        async with asyncio.timeout(TIMEOUT * 3):
            while True:
                frame = await recv(ws)
                if frame["event"] == event:
                    return frame
                assert frame["event"] in NOISE, f"expected {event}, got {frame}"
    except TimeoutError:
        raise AssertionError(f"no {event} frame within {TIMEOUT * 3:g}s") from None


async def subscribe(ws: ClientConnection, conversation: str, since: int | None = None) -> Frame:
    op: dict[str, Any] = {"op": "subscribe", "conversation": conversation}
    if since is not None:
        op["since"] = since
    await ws.send(json.dumps(op))
    return await expect(ws, "subscribed")


async def closed(ws: ClientConnection) -> tuple[int | None, list[Frame]]:
    """Read until the server closes, within a deadline: (close code, frames before it)."""
    frames: list[Frame] = []
    async with asyncio.timeout(TIMEOUT * 3):
        with contextlib.suppress(ConnectionClosed):
            while True:
                frames.append(json.loads(await ws.recv()))
    return ws.close_code, frames


# -- a raw client that stops reading --------------------------------------------------------------


def raw_socket(port: int, key: str) -> socket.socket:
    """A WebSocket opened by hand on a socket with a small receive buffer (back-pressure comes
    quickly); the 101 response read and nothing after it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", port))
    nonce = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {nonce}\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {key}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        byte = sock.recv(1)  # byte by byte: not one byte of the frames that follow
        assert byte, f"the server closed during the handshake: {head!r}"
        head += byte
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One client frame (FIN set), masked with a zero key: the payload goes out as it is."""
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
    return header + bytes(4) + payload


def server_side(port: int, client_port: int) -> str | None:
    """The TCP state (hex, as in /proc/net/tcp) of the server's end of one loopback connection,
    or None once the server holds no socket for it."""
    local = f"0100007F:{port:04X}"
    remote = f"0100007F:{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            return fields[3]
    return None


# -- 1. a close the peer never reads ---------------------------------------------------------------


@pytest.mark.parametrize("bind", ["127.0.0.1", "0.0.0.0"])
async def test_a_close_the_peer_never_reads_ends_the_connection_within_close_timeout(
    base_settings: dict[str, Any], migrated: str, tmp_path: Path, bind: str
) -> None:
    """A client that stops reading is closed as a slow consumer; its close frame cannot be
    written (the buffers are full) and the client never answers it. The server's socket is
    gone (reset) within stall_timeout + close_timeout, not kept until the client leaves.
    Bound to 0.0.0.0 (the default) too: granian's scope then names the bind address, not the
    socket's own."""
    settings = api_settings(
        copy.deepcopy(base_settings),
        tmp_path,
        realtime={"queue_max": 1_000_000, "stall_timeout": 0.5, "close_timeout": 1.0},
        api={"max_body_bytes": 16 * 1_048_576, "bind": bind},
    )
    with ApiProcess(tmp_path, settings).running() as proc:
        admin = await asyncio.to_thread(admin_key, proc.settings)
        async with api_client(proc, admin) as api:
            key = await subscriber_key(api)
            conversation = await api.conversation()
            sock = raw_socket(proc.port, key)
            with sock:
                client_port = sock.getsockname()[1]
                op = {"op": "subscribe", "conversation": conversation}
                sock.sendall(client_frame(json.dumps(op).encode()))
                seen = b""
                while b"subscribed" not in seen:
                    chunk = sock.recv(4096)  # each within the socket's timeout
                    assert chunk, f"closed before subscribed: {seen!r}"
                    seen += chunk
                # From here the client reads nothing: publish until the server gives up on it.
                pad = "x" * 30_000
                for _ in range(60):
                    await api.publish_batch(conversation, [{"pad": pad}] * 100)
                    if await closed_total(api, 4008) > 0:
                        break
                assert await closed_total(api, 4008) > 0, "never closed as a slow consumer"
                gave_up = time.monotonic()
                # The server's end disappears (RST), well within the bound...
                while (state := server_side(proc.port, client_port)) is not None:
                    assert time.monotonic() - gave_up < 1.0 + 15.0, f"still there: state {state}"
                    await asyncio.sleep(0.1)
                print(f"server socket gone {time.monotonic() - gave_up:.2f}s after the 4008")
                # ... and the client, reading again, finds the connection reset or ended.
                sock.settimeout(TIMEOUT)
                ended = False
                try:
                    while sock.recv(1 << 20):
                        pass
                    ended = True
                except ConnectionResetError:
                    ended = True
                assert ended
        log = proc.log(2000)
        assert "websocket_reset_failed" not in log
        assert "websocket_reset_not_found" not in log


@pytest.mark.parametrize(
    ("server", "client", "local", "peer", "expected"),
    [
        ("127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.1", True),
        ("0.0.0.0", "127.0.0.1", "127.0.0.1", "127.0.0.1", True),  # granian's, bound to any
        ("::", "127.0.0.1", "::ffff:127.0.0.1", "::ffff:127.0.0.1", True),  # dual-stack
        ("::", "::ffff:127.0.0.1", "::ffff:127.0.0.1", "::ffff:127.0.0.1", True),
        ("::", "::1", "::1", "::1", True),
        ("::ffff:127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.1", True),
        ("127.0.0.1", "::ffff:127.0.0.1", "::ffff:127.0.0.1", "::ffff:127.0.0.1", True),
        ("10.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.1", False),  # another local address
        ("0.0.0.0", "127.0.0.1", "127.0.0.1", "127.0.0.2", False),  # another peer
        ("::1", "::1", "127.0.0.1", "::1", False),
    ],
)
def test_a_reset_matches_the_socket_whatever_address_the_scope_names(
    server: str, client: str, local: str, peer: str, expected: bool
) -> None:
    """The scope's server address is the bind address (unspecified = any local one), and IPv4
    may be spelt IPv4-mapped on either side."""
    wanted = ((server, 8000), (client, 50000))
    assert matches(wanted, (local, 8000), (peer, 50000)) is expected
    assert not matches(wanted, (local, 8001), (peer, 50000))  # another port
    assert not matches(wanted, (local, 8000), (peer, 50001))  # another peer port


@pytest.mark.parametrize("bind", ["0.0.0.0", "::"])
def test_linger_zero_finds_a_socket_accepted_on_an_any_address(bind: str) -> None:
    """A listener bound to any address: the accepted socket is found from the scope granian
    would give (the bind address, the peer), and only it gets SO_LINGER 0."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6")
    with socket.socket(family) as listener:
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind((bind, 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as client:
            accepted, peer = listener.accept()
            with accepted:
                wanted = ((bind, port), (peer[0], client.getsockname()[1]))
                other = ((bind, port), (peer[0], client.getsockname()[1] + 1))
                assert linger_zero({wanted, other}) == {wanted}
                linger = accepted.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
                assert struct.unpack("ii", linger) == (1, 0)
                untouched = client.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
                assert struct.unpack("ii", untouched) == (0, 0)


# -- 5. Redis lost its data ----------------------------------------------------------------------


async def test_after_redis_lost_its_data_a_resume_above_the_head_gets_seq_reset(
    base_settings: dict[str, Any], migrated: str, tmp_path: Path, private_redis: Any
) -> None:
    """Seqs start again at 1 after a flush: a resume with `since` above the new head, and a live
    subscription that hears a seq it already had, both end with `seq_reset`, never skipping the
    new messages that take those seqs."""
    port, _, _ = private_redis
    settings = api_settings(
        copy.deepcopy(base_settings), tmp_path, redis={"url": f"redis://127.0.0.1:{port}/0"}
    )
    with ApiProcess(tmp_path, settings).running() as proc:
        admin = await asyncio.to_thread(admin_key, proc.settings)
        async with api_client(proc, admin) as api:
            key = await subscriber_key(api)
            conversation = await api.conversation()
            assert await api.publish_batch(conversation, [{"n": n} for n in range(5)]) == [
                1,
                2,
                3,
                4,
                5,
            ]
            async with api.socket(key) as live:
                await subscribe(live, conversation, since=0)
                seqs = [(await expect(live, "message"))["message"]["seq"] for _ in range(5)]
                assert seqs == [1, 2, 3, 4, 5]

                redis = aioredis.Redis(port=port)
                try:
                    await redis.flushall()
                finally:
                    await redis.aclose()
                assert await api.publish_batch(conversation, [{"n": "new"}]) == [1]

                # The live subscription hears seq 1 again: it ends, naming the head.
                error = (await expect(live, "error"))["error"]
                assert (error["code"], error["conversation"], error["seq"]) == (
                    "seq_reset",
                    conversation,
                    1,
                )
            async with api.socket(key) as ws:
                await ws.send(
                    json.dumps({"op": "subscribe", "conversation": conversation, "since": 5})
                )
                error = (await expect(ws, "error"))["error"]
                assert (error["code"], error["field"], error["conversation"], error["seq"]) == (
                    "seq_reset",
                    "since",
                    conversation,
                    1,
                )
                # Not subscribed after it: a resume from the history's end gets what follows.
                assert (await subscribe(ws, conversation, since=0))["seq"] == 1
                assert (await expect(ws, "message"))["message"]["body"] == {"n": "new"}
                assert await api.publish_batch(conversation, [{"n": "next"}]) == [2]
                assert (await expect(ws, "message"))["message"]["seq"] == 2
            # A negative since is still invalid.
            async with api.socket(key) as ws:
                await ws.send(
                    json.dumps({"op": "subscribe", "conversation": conversation, "since": -1})
                )
                error = (await expect(ws, "error"))["error"]
                assert (error["code"], error["field"]) == ("invalid", "since")


# -- 3. frame size -------------------------------------------------------------------------------

LIMIT = 65_536
MiB = 1_048_576


def op_of_size(size: int, **fields: Any) -> str:
    """A ping op of exactly `size` bytes with `fields`, padded with spaces."""
    text = json.dumps({"op": "ping", **fields})
    return text[:-1] + " " * (size - len(text)) + "}"


@pytest.mark.parametrize(
    "size",
    [LIMIT + 1, LIMIT + MiB, 8 * MiB, 16 * MiB, 16 * MiB + 1, 64 * MiB],
    ids=["limit+1", "limit+1MiB", "8MiB", "16MiB", "16MiB+1", "64MiB"],
)
async def test_a_frame_over_max_frame_bytes_is_closed_1009_unread(
    frames_server: ApiProcess, size: int
) -> None:
    """Up to 16 MiB granian reads the frame and the app refuses it unparsed (an op with an
    unknown field would get an `invalid` error frame if parsed); beyond, granian drops it and
    the app, told only "disconnected" (1005), answers 1009: the client gets 1009 either way."""
    admin = await asyncio.to_thread(admin_key, frames_server.settings)
    async with api_client(frames_server, admin) as api:
        key = await subscriber_key(api)
        async with api.socket(key, options={"max_size": None, "close_timeout": TIMEOUT}) as ws:
            await ws.send(json.dumps({"op": "ping"}))
            await expect(ws, "pong")
            with contextlib.suppress(ConnectionClosed):  # the server may close mid-send
                await asyncio.wait_for(ws.send(op_of_size(size, x=1)), TIMEOUT * 3)
            code, frames = await closed(ws)
        assert code == 1009, (code, frames)
        assert all(f["event"] in NOISE | {"pong"} for f in frames), frames
        # The process goes on serving.
        async with api.socket(key) as ws:
            await ws.send(op_of_size(LIMIT))  # exactly at the limit: read and answered
            await expect(ws, "pong")


@pytest.fixture(scope="module")
def frames_server(
    base_settings: dict[str, Any], migrated: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiProcess]:
    directory = tmp_path_factory.mktemp("frames-api")
    settings = api_settings(
        copy.deepcopy(base_settings), directory, realtime={"max_frame_bytes": LIMIT}
    )
    with ApiProcess(directory, settings).running() as proc:
        yield proc


# -- 4. the api stops ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("workers", "group"),
    [(1, False), (2, False), (2, True)],
    ids=["1-worker", "2-workers", "2-workers-group"],
)
async def test_sockets_get_1001_when_the_api_stops(
    base_settings: dict[str, Any], migrated: str, tmp_path: Path, workers: int, group: bool
) -> None:
    """SIGTERM to granian's main process (as supervisord sends it), or to its whole process
    group: every open socket is closed with 1001 before the worker stops, none sees 1006."""
    settings = api_settings(copy.deepcopy(base_settings), tmp_path, api={"workers": workers})
    with ApiProcess(tmp_path, settings).running() as proc:
        assert proc.proc is not None
        admin = await asyncio.to_thread(admin_key, proc.settings)
        async with api_client(proc, admin) as api:
            key = await subscriber_key(api)
            conversation = await api.conversation()
            async with contextlib.AsyncExitStack() as stack:
                sockets = [await stack.enter_async_context(api.socket(key)) for _ in range(8)]
                for ws in sockets:
                    await subscribe(ws, conversation)
                if group:
                    os.killpg(proc.proc.pid, signal.SIGTERM)
                else:
                    os.kill(proc.proc.pid, signal.SIGTERM)
                codes = [(await closed(ws))[0] for ws in sockets]
        assert codes == [1001] * len(sockets), f"{codes}\n{proc.log()}"
        returncode = await asyncio.to_thread(proc.proc.wait, 30)
        assert returncode == 0, proc.log()


# -- 2. sockets per principal --------------------------------------------------------------------


async def served(ws: ClientConnection) -> None:
    await ws.send(json.dumps({"op": "ping"}))
    await expect(ws, "pong")


async def admitted(api: Api, key: str) -> bool:
    """Open a socket: True if it is served, False if refused with too_many_sockets and 4029."""
    async with api.socket(key) as ws:
        try:
            await ws.send(json.dumps({"op": "ping"}))
            async with asyncio.timeout(TIMEOUT * 3):  # pings keep each receive alive
                while (frame := await recv(ws))["event"] != "pong":
                    assert frame["event"] in NOISE or frame["error"]["code"] == "too_many_sockets"
        except ConnectionClosed:
            assert ws.close_code == 4029, ws.close_code
            return False
        return True


async def test_sockets_per_principal_are_limited_across_processes(
    base_settings: dict[str, Any], migrated: str, tmp_path: Path
) -> None:
    """Two api processes on one Redis share each principal's `max_sockets_per_principal`; one
    more socket gets `too_many_sockets` and 4029; a closed socket gives its slot back, and the
    slots of a process killed outright lapse after presence_ttl."""
    realtime = {"max_sockets_per_principal": 3, "ping_interval": 1.0, "presence_ttl": 3.0}
    one = api_settings(copy.deepcopy(base_settings), tmp_path / "one", realtime=realtime)
    two = api_settings(copy.deepcopy(base_settings), tmp_path / "two", realtime=realtime)
    with (
        ApiProcess(tmp_path / "one", one).running() as a,
        ApiProcess(tmp_path / "two", two).running() as b,
    ):
        admin = await asyncio.to_thread(admin_key, a.settings)
        async with (
            api_client(a, admin) as on_a,
            api_client(b, admin) as on_b,
            contextlib.AsyncExitStack() as stack,
        ):
            key, other = await subscriber_key(on_a), await subscriber_key(on_a)
            first = await stack.enter_async_context(on_a.socket(key))
            held = [first, await stack.enter_async_context(on_a.socket(key))]
            held.append(await stack.enter_async_context(on_b.socket(key)))
            for ws in held:
                await served(ws)

            async with on_b.socket(key) as ws:
                code, frames = await closed(ws)
            assert code == 4029, (code, frames)
            assert [f["error"]["code"] for f in frames] == ["too_many_sockets"], frames
            async with on_b.socket(other) as ws:  # the limit is per principal
                await served(ws)

            # A closed socket gives its slot back (once its handler is done: retry a while).
            await first.close()
            deadline = time.monotonic() + 20.0
            while not await admitted(on_b, key):
                assert time.monotonic() < deadline, "the closed socket's slot never came back"
                await asyncio.sleep(0.2)

            # Process one dies without closing anything: its socket's slot lapses.
            assert a.proc is not None
            os.killpg(a.proc.pid, signal.SIGKILL)
            deadline = time.monotonic() + 30.0
            while not await admitted(on_b, key):
                assert time.monotonic() < deadline, "a dead process's slot never lapsed"
                await asyncio.sleep(0.5)


async def test_a_renewal_reclaims_a_lost_slot_so_the_limit_holds_again(
    base_settings: dict[str, Any],
) -> None:
    """A ping's renewal puts back the slot of an admitted socket when Redis lost the set (restart
    without data, FLUSH, an outage longer than the ttl), never refusing it; a new socket is then
    counted against it instead of opening beside it without a slot."""
    redis = aioredis.Redis.from_url(base_settings["redis"]["url"])
    keys = Keys(f"{base_settings['redis']['key_prefix']}-slots-{uuid.uuid4().hex[:8]}", 16)
    slots = Slots(redis, keys, limit=1, ttl=60.0)
    try:
        assert await slots.take("p", "A")
        assert not await slots.take("p", "B")
        await redis.delete(keys.sockets("p"))  # the set is lost; socket A stays open

        await slots.renew("p", "A")
        assert await redis.zrange(keys.sockets("p"), 0, -1) == [b"A"]
        assert 0 < await redis.pttl(keys.sockets("p")) <= 60_000
        assert not await slots.take("p", "B")

        # Lost again, and a new socket took the free slot before A's next ping: A's renewal is
        # not refused (A stays open), and from then on both count against the limit.
        await redis.delete(keys.sockets("p"))
        assert await slots.take("p", "B")
        await slots.renew("p", "A")
        assert sorted(await redis.zrange(keys.sockets("p"), 0, -1)) == [b"A", b"B"]
        assert not await slots.take("p", "C")

        await slots.give_back("p", "A")
        await slots.give_back("p", "B")
        assert await slots.take("p", "C")
    finally:
        await redis.delete(keys.sockets("p"))
        await redis.aclose()
