"""The hub: this api process's single Redis pub/sub connection, shared by all its sockets.

It subscribes a conversation's channel while at least one local socket wants it, hands every
frame to those sockets (decoded once, whatever the number of sockets), and carries the
invalidation channel. When the connection drops and comes back, every listener is told to
resynchronise: sockets catch up from the tail, caches clear.

The reader task alone reconnects the connection, with redis-py's own reconnects turned off:
redis-py's pub/sub reconnects from whichever task met the error, so a subscribe racing the
reader's read used to run a second handshake on the same connection (two reads at once, replies
taken by the wrong reader, writes to a closed transport). Subscribes and unsubscribes are sent
only while the connection is up, one at a time, never during a reconnect.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Protocol

import msgspec
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from appliance import invalidation
from appliance.config.model import RedisSection
from appliance.errors import unavailable
from appliance.redis_keys import Keys, client

log = structlog.get_logger()
SUBSCRIBE_TIMEOUT = 5.0
RECONNECT_MAX = 1.0  # seconds between reconnect attempts at most (from 0.1, doubling)
# What the connection raises when Redis is gone: the client turns a failed write of any kind
# into a ConnectionError (redis_keys._LostOnFailedSend).
LOST = (RedisConnectionError, RedisTimeoutError, OSError)


class _Down(Exception):
    """The connection is down: an unsubscribe is not sent (the reconnect drops the channel)."""


class Listener(Protocol):
    def on_frame(self, seq: int | None, at: float | None, frame: str) -> None:
        """`seq` and `at` (the message's `ts` as epoch seconds) are None for events."""

    def resync(self) -> None: ...


class _Seq(msgspec.Struct):
    seq: int
    ts: str


class _Frame(msgspec.Struct):
    event: str
    message: _Seq | None = None


_decode_frame = msgspec.json.Decoder(_Frame).decode


class Hub:
    def __init__(
        self,
        section: RedisSection,
        keys: Keys,
        on_invalidate: Callable[[invalidation.Invalidation | None], None],
    ) -> None:
        self._redis = client(section, "hub", reconnect=False)
        self._pubsub = self._redis.pubsub()
        self._keys = keys
        self._on_invalidate = on_invalidate
        self._channels: dict[bytes, set[Listener]] = {}
        # Set True when Redis confirms the channel's subscription, False when it was not sent.
        self._confirmed: dict[bytes, asyncio.Future[bool]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._up = asyncio.Event()  # connected, resubscribed, and not known to be lost since
        self._lock = asyncio.Lock()  # one send or reconnect at a time

    async def start(self) -> None:
        """Connects (raising if Redis does not answer) and starts the reader."""
        await self._pubsub.subscribe(self._keys.invalidations())
        self._up.set()
        self._reader = asyncio.create_task(self._read(), name="hub-reader")

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        # Typed here: redis-py types PubSub.aclose only from 8.2 (older ones fail mypy's strict
        # untyped-call check, newer ones an ignore comment).
        close: Callable[[], Awaitable[None]] = self._pubsub.aclose
        await close()
        await self._redis.aclose()

    async def join(self, channel: str, listener: Listener) -> None:
        """Returns once the channel is subscribed: from here on, no frame is missed."""
        name = channel.encode()
        listeners = self._channels.get(name)
        if listeners is None:
            listeners = self._channels[name] = set()
            pending = self._confirmed[name] = asyncio.get_running_loop().create_future()
            try:
                await self._send(self._pubsub.subscribe, name, wait=True)
            except BaseException:
                if self._channels.get(name) is listeners:
                    del self._channels[name]
                if self._confirmed.get(name) is pending:
                    del self._confirmed[name]
                if not pending.done():
                    pending.set_result(False)  # a join waiting on it fails too
                raise
        listeners.add(listener)
        confirmed = self._confirmed.get(name)
        if confirmed is not None:
            try:
                subscribed = await asyncio.wait_for(asyncio.shield(confirmed), SUBSCRIBE_TIMEOUT)
            except TimeoutError:
                subscribed = False
                log.warning("hub_subscribe_unconfirmed", timeout=SUBSCRIBE_TIMEOUT)
            if not subscribed:
                await self.leave(channel, listener)
                raise unavailable("redis")

    async def leave(self, channel: str, listener: Listener) -> None:
        name = channel.encode()
        listeners = self._channels.get(name)
        if listeners is None:
            return
        listeners.discard(listener)
        if not listeners:
            del self._channels[name]
            self._confirmed.pop(name, None)
            try:
                # Harmless if not sent: frames of a channel nobody here wants are dropped on
                # arrival, and the next reconnect unsubscribes it.
                await self._send(self._pubsub.unsubscribe, name, wait=False)
            except LOST as exc:
                log.warning("hub_unsubscribe_failed", error=str(exc))
            except _Down:
                pass

    @property
    def channels(self) -> int:
        return len(self._channels)

    def _ready(self) -> bool:
        """Up, and still connected: a send or read never (re)connects the connection."""
        connection = self._pubsub.connection
        return self._up.is_set() and connection is not None and connection.is_connected

    async def _send(
        self, command: Callable[[bytes], Awaitable[object]], name: bytes, *, wait: bool
    ) -> None:
        """Send a (un)subscribe while the connection is up, after waiting up to
        SUBSCRIBE_TIMEOUT for the reader to reconnect it if `wait` (else _Down). A failed send
        marks the connection lost; the reader reconnects it."""
        if not self._ready():
            if not wait:
                raise _Down
            try:
                await asyncio.wait_for(self._up.wait(), SUBSCRIBE_TIMEOUT)
            except TimeoutError:
                log.warning("hub_down", waited=SUBSCRIBE_TIMEOUT)
                raise unavailable("redis") from None
        async with self._lock:
            if not self._ready():  # lost again while this waited
                if not wait:
                    raise _Down
                raise unavailable("redis")
            try:
                await command(name)
            except LOST as exc:
                self._lost(exc)
                if not wait:
                    raise
                log.warning("hub_subscribe_failed", error=str(exc))
                raise unavailable("redis") from None

    def _lost(self, exc: BaseException) -> None:
        if self._up.is_set():
            self._up.clear()
            log.warning("hub_connection_lost", error=str(exc))

    async def _reconnect(self) -> None:
        """Drop what is left of the connection and connect again: redis-py resubscribes every
        channel it knows of, channels left meanwhile are unsubscribed, listeners resync."""
        async with self._lock:
            connection = self._pubsub.connection
            assert connection is not None  # start() made it
            await connection.disconnect(nowait=True)
            await self._pubsub.connect()
            wanted = {*self._channels, self._keys.invalidations().encode()}
            stale = [name for name in self._pubsub.channels if name not in wanted]
            if stale:
                await self._pubsub.unsubscribe(*stale)
            self._up.set()
        log.warning("hub_reconnected", channels=len(self._channels))
        # What was published while the connection was down is read from the tail.
        self._on_invalidate(None)
        for listeners in list(self._channels.values()):
            for listener in list(listeners):
                listener.resync()

    async def _read(self) -> None:
        """Every local socket's only feed: it lives until aclose(), whatever its connection
        does. An unexpected failure is logged with its traceback and, since the connection may
        be left mid-reply, met like a lost connection."""
        invalidations = self._keys.invalidations().encode()
        backoff = 0.1
        while True:
            if not self._ready():
                try:
                    await self._reconnect()
                except Exception as exc:
                    if isinstance(exc, LOST):
                        log.warning("hub_reconnect_failed", error=str(exc), retry_in=backoff)
                    else:
                        log.exception("hub_reconnect_failed", retry_in=backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, RECONNECT_MAX)
                    continue
            try:
                message = await self._pubsub.get_message(timeout=None)
            except LOST as exc:
                self._lost(exc)
                continue
            except ResponseError as exc:  # an error reply (an ACL refusing a channel, say)
                log.error("hub_error_reply", error=str(exc))
                continue
            except Exception as exc:
                log.exception("hub_read_failed", retry_in=backoff)
                self._lost(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_MAX)
                continue
            backoff = 0.1
            if message is None:
                continue
            kind, channel = message["type"], message["channel"]
            if kind == "subscribe":
                confirmed = self._confirmed.pop(channel, None)
                if confirmed is not None and not confirmed.done():
                    confirmed.set_result(True)
            elif kind == "message":
                try:
                    if channel == invalidations:
                        self._invalidate(message["data"])
                    else:
                        self._dispatch(channel, message["data"])
                except Exception:
                    # This task is every local socket's only feed: one bad frame must not end it.
                    log.exception("hub_frame_failed", channel=channel)

    def _invalidate(self, payload: bytes) -> None:
        try:
            event = invalidation.decode(payload)
        except msgspec.DecodeError:
            log.warning("hub_bad_invalidation", payload=payload[:200])
            return
        self._on_invalidate(event)

    def _dispatch(self, channel: bytes, payload: bytes) -> None:
        listeners = self._channels.get(channel)
        if not listeners:
            return
        seq = at = None
        try:
            head = _decode_frame(payload)
            if head.message is not None:  # parsed once, whatever the number of listeners
                seq, at = head.message.seq, datetime.fromisoformat(head.message.ts).timestamp()
        except (msgspec.DecodeError, ValueError):  # not one of ours (ValidationError included)
            log.warning("hub_bad_frame", channel=channel)
            return
        frame = payload.decode()
        for listener in list(listeners):
            listener.on_frame(seq, at, frame)
