"""What the api's routes use, opened once per api process in the lifespan and closed there."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import msgspec
import psycopg
import redis.asyncio as aioredis

from appliance.activity import ActivityLog
from appliance.auth.authenticate import Authenticator
from appliance.config import Config
from appliance.conversations.access import Access
from appliance.invalidation import Invalidation, announce
from appliance.messages.blocks import BlockCache
from appliance.messages.history import History
from appliance.messages.publish import Publisher
from appliance.realtime.hub import Hub
from appliance.realtime.presence import Presence
from appliance.realtime.slots import Slots
from appliance.realtime.stream import Session
from appliance.realtime.transport import Resets
from appliance.redis_keys import Keys
from appliance.resources import Resources


@dataclass
class Services:
    resources: Resources
    auth: Authenticator
    access: Access
    publisher: Publisher
    history: History
    presence: Presence
    activity: ActivityLog
    hub: Hub = field(init=False)
    sessions: set[Session] = field(default_factory=set)
    resets: Resets = field(default_factory=Resets)  # sockets whose close could not be written
    slots: Slots = field(init=False)
    # Marks this process's announcements: the hub hears them too, and they are applied already.
    origin: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def config(self) -> Config:
        return self.resources.config

    @property
    def redis(self) -> aioredis.Redis:
        return self.resources.redis

    @property
    def keys(self) -> Keys:
        return self.resources.keys

    def connection(self) -> AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        return self.resources.connection()

    async def announce(self, event: Invalidation) -> None:
        """A committed change: applied to this process's caches and sockets at once, then told to
        the others (best effort, see appliance/invalidation.py)."""
        event = msgspec.structs.replace(event, origin=self.origin)
        self._apply(event)
        await announce(self.redis, self.keys, event)

    def invalidate(self, event: Invalidation | None) -> None:
        """An invalidation event from the hub (None: events may have been missed); this
        process's own were applied when it made them."""
        if event is None or event.origin != self.origin:
            self._apply(event)

    def _apply(self, event: Invalidation | None) -> None:
        self.access.forget(event)
        if event is None or event.kind == "key":
            self.auth.forget(event.id if event else None)
        for session in list(self.sessions):
            if event is None:
                session.spawn(session.recheck(None))
            elif event.kind == "key" and session.principal.key_id == event.id:
                session.spawn(session.reauthenticate())
            elif (event.kind == "conversation" and event.id in session.subs) or (
                event.kind == "member" and session.principal.id == event.principal
            ):
                session.spawn(session.recheck(event.id))


@asynccontextmanager
async def open_services(res: Resources) -> AsyncIterator[Services]:
    config = res.config
    svc = Services(
        resources=res,
        auth=Authenticator(config, res.connection),
        access=Access(res.connection, config.auth.membership_cache_ttl, config.auth.stale_window),
        publisher=Publisher(res.redis, res.keys, config.messages, res.connection),
        history=History(
            res.redis,
            res.keys,
            res.connection,
            BlockCache(res.storage, config.segments.cache_bytes),
        ),
        presence=Presence(
            res.redis, res.keys, config.realtime.presence_ttl, config.realtime.receipt_ttl
        ),
        activity=ActivityLog(
            config.activity, res.pool, close_timeout=config.appliance.stop_timeout
        ),
    )
    svc.hub = Hub(config.redis, res.keys, svc.invalidate)
    svc.slots = Slots(
        res.redis,
        res.keys,
        config.realtime.max_sockets_per_principal,
        config.realtime.presence_ttl,
    )
    await svc.hub.start()
    await svc.auth.start()
    await svc.activity.start()
    try:
        yield svc
    finally:
        for session in list(svc.sessions):
            session.close(1001, "server shutting down")
        await asyncio.sleep(0)
        await svc.activity.aclose()
        await svc.auth.aclose()
        await svc.hub.aclose()
