"""The hub: this api process's single Redis pub/sub connection, shared by all its sockets.

It subscribes a conversation's channel while at least one local socket wants it, hands every
frame to those sockets (decoded once, whatever the number of sockets), and carries the
invalidation channel. When the connection drops and comes back (redis-py resubscribes on
connect), every listener is told to resynchronise: sockets catch up from the tail, caches clear.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

import msgspec
import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from appliance import invalidation
from appliance.errors import unavailable
from appliance.redis_keys import Keys

log = structlog.get_logger()
SUBSCRIBE_TIMEOUT = 5.0


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
        redis: aioredis.Redis,
        keys: Keys,
        on_invalidate: Callable[[invalidation.Invalidation | None], None],
    ) -> None:
        self._pubsub = redis.pubsub()
        self._keys = keys
        self._on_invalidate = on_invalidate
        self._channels: dict[bytes, set[Listener]] = {}
        self._confirmed: dict[bytes, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._pubsub.subscribe(self._keys.invalidations())
        assert self._pubsub.connection is not None
        self._pubsub.connection.register_connect_callback(self._connected)
        self._reader = asyncio.create_task(self._read(), name="hub-reader")

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    async def join(self, channel: str, listener: Listener) -> None:
        """Returns once the channel is subscribed: from here on, no frame is missed."""
        name = channel.encode()
        listeners = self._channels.get(name)
        if listeners is None:
            listeners = self._channels[name] = set()
            self._confirmed[name] = asyncio.get_running_loop().create_future()
            try:
                await self._pubsub.subscribe(name)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                del self._channels[name]
                self._confirmed.pop(name, None)
                log.warning("hub_subscribe_failed", error=str(exc))
                raise unavailable("redis") from None
        listeners.add(listener)
        confirmed = self._confirmed.get(name)
        if confirmed is not None:
            try:
                await asyncio.wait_for(asyncio.shield(confirmed), SUBSCRIBE_TIMEOUT)
            except TimeoutError:
                await self.leave(channel, listener)
                log.warning("hub_subscribe_unconfirmed", timeout=SUBSCRIBE_TIMEOUT)
                raise unavailable("redis") from None

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
                await self._pubsub.unsubscribe(name)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                # Harmless: frames of a channel nobody here wants are dropped on arrival.
                log.warning("hub_unsubscribe_failed", error=str(exc))

    @property
    def channels(self) -> int:
        return len(self._channels)

    async def _connected(self, _: Any) -> None:
        """redis-py calls this on every reconnect (registered after the first), after it has
        resubscribed: what was published while the connection was down is read from the tail."""
        log.warning("hub_reconnected", channels=len(self._channels))
        self._on_invalidate(None)
        for listeners in list(self._channels.values()):
            for listener in list(listeners):
                listener.resync()

    async def _read(self) -> None:
        invalidations = self._keys.invalidations().encode()
        backoff = 0.1
        while True:
            try:
                message = await self._pubsub.get_message(timeout=None)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("hub_connection_lost", error=str(exc), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            if message is None:
                continue
            kind, channel = message["type"], message["channel"]
            if kind == "subscribe":
                confirmed = self._confirmed.pop(channel, None)
                if confirmed is not None and not confirmed.done():
                    confirmed.set_result(None)
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
