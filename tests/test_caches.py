"""The per-process caches of keys and access grants, against real PostgreSQL: a lookup that raced
an invalidation never stores what it read, and made-up key ids never push real keys out.

The races are made deterministic by holding the looked-up connection open after its query ran
(the lookup has read the old state) until the test has changed the row and invalidated.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import psycopg
import pytest

from appliance.auth import authenticate as authenticate_module
from appliance.auth.authenticate import Authenticator
from appliance.auth.principal import Principal
from appliance.cache import MISSING, Cache
from appliance.config import Config
from appliance.conversations import service
from appliance.conversations.access import Access
from appliance.errors import Forbidden, NotFound, Unauthorized
from appliance.invalidation import Invalidation
from appliance.resources import Resources
from tests.messaging import bearer, issue_key, unique

Conn = psycopg.AsyncConnection[Any]


class Connections:
    """The pool's connections, counted; `hold()` keeps the next one checked out after use until
    `release()`, so the test can act between a lookup's query and its caching."""

    def __init__(self, resources: Resources) -> None:
        self._resources = resources
        self.opened = 0
        self.used = asyncio.Event()
        self._gate = asyncio.Event()
        self._armed = False

    def hold(self) -> None:
        self._gate.clear()
        self.used.clear()
        self._armed = True

    def release(self) -> None:
        self._gate.set()

    def __call__(self) -> AbstractAsyncContextManager[Conn]:
        return self._connection()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Conn]:
        self.opened += 1
        held, self._armed = self._armed, False
        async with self._resources.connection() as conn:
            yield conn
        if held:
            self.used.set()
            await self._gate.wait()


@pytest.fixture
def connections(resources: Resources) -> Connections:
    return Connections(resources)


def key_id(key: str) -> str:
    return key.split("_")[1]


async def raced(
    connections: Connections, lookup: Any, change: Callable[[], Any]
) -> asyncio.Task[Any]:
    """Start `lookup`, let its query run, apply `change` (row + invalidation), then let it end."""
    connections.hold()
    task = asyncio.create_task(lookup)
    await asyncio.wait_for(connections.used.wait(), 10)
    await change()
    connections.release()
    await asyncio.wait_for(asyncio.shield(task), 10)
    return task


async def test_a_key_lookup_racing_a_revocation_caches_nothing_stale(
    config: Config, resources: Resources, connections: Connections
) -> None:
    key = await issue_key(resources, ["read"])
    auth = Authenticator(config, connections)

    async def revoke() -> None:
        async with resources.connection() as conn:
            await conn.execute(
                "UPDATE api_keys SET revoked_at = now() WHERE id = %s", (key_id(key),)
            )
        auth.forget(key_id(key))  # what the invalidation event does

    authorization = bearer(key)["Authorization"]
    lookup = await raced(connections, auth.authenticate(authorization, None, None), revoke)
    assert lookup.result().id.startswith("key:")  # it began before the revocation
    with pytest.raises(Unauthorized) as refused:
        await auth.authenticate(bearer(key)["Authorization"], None, None)
    assert refused.value.reason == "key_revoked"


async def test_a_role_lookup_racing_a_removal_caches_nothing_stale(
    resources: Resources, connections: Connections
) -> None:
    conversation, user = unique("c"), f"user:{unique('u')}"
    async with resources.connection() as conn:
        await service.create(conn, service.ConversationCreate(conversation=conversation), "key:t")
        await service.put_member(conn, conversation, user, "member")
    access = Access(connections, ttl=3600)
    principal = Principal(user, frozenset())

    async def remove() -> None:
        async with resources.connection() as conn:
            await service.remove_member(conn, conversation, user)
        access.forget(Invalidation("member", conversation, user))

    await access.require(principal, conversation, "view")  # existence cached; the role too
    access.forget(Invalidation("member", conversation, user))
    generation = access.generation
    await raced(connections, access.require(principal, conversation, "publish"), remove)
    assert access.generation > generation  # what a racing subscribe looks at
    with pytest.raises(Forbidden) as refused:
        await access.require(principal, conversation, "publish")
    assert refused.value.reason == "not_member"


async def test_made_up_key_ids_never_evict_real_keys(
    config: Config,
    resources: Resources,
    connections: Connections,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(authenticate_module, "_UNKNOWN_MAX", 5)
    key = await issue_key(resources, ["read"])
    auth = Authenticator(config, connections)
    await auth.authenticate(bearer(key)["Authorization"], None, None)
    made_up = [f"ak_{i:012d}_{'s' * 43}" for i in range(50)]
    for candidate in made_up:
        with pytest.raises(Unauthorized):
            await auth.authenticate(bearer(candidate)["Authorization"], None, None)
    assert connections.opened == 1 + 50  # one query per id it had not seen
    await auth.authenticate(bearer(key)["Authorization"], None, None)
    assert connections.opened == 51  # the real key is still cached
    with pytest.raises(Unauthorized):  # the latest made-up ids are remembered too
        await auth.authenticate(bearer(made_up[-1])["Authorization"], None, None)
    assert connections.opened == 51


class Clock:
    """A timer the test moves by hand: the stale window is checked without waiting for it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_entry_past_its_ttl_is_stale_within_the_window_then_gone() -> None:
    clock = Clock()
    cache: Cache[str, str] = Cache(ttl=30, maxsize=10, stale_window=300, timer=clock)
    cache.put("k", "v", cache.generation)
    clock.now += 29.9
    assert cache.get("k") == "v"
    clock.now += 0.2  # past the TTL: reloaded when PostgreSQL answers, stale() when it cannot
    assert cache.get("k") is MISSING
    assert cache.stale("k") == "v"
    clock.now += 299.7  # 329.8 s old: still within TTL + window
    assert cache.stale("k") == "v"
    clock.now += 0.3
    assert cache.stale("k") is MISSING


def test_a_dropped_entry_is_not_served_stale() -> None:
    """An invalidation (a revocation, a removal) holds during an outage too."""
    clock = Clock()
    cache: Cache[str, str] = Cache(ttl=30, maxsize=10, stale_window=300, timer=clock)
    for key in ("a", "b"):
        cache.put(key, key, cache.generation)
    clock.now += 60
    cache.drop("a")
    assert (cache.stale("a"), cache.stale("b")) == (MISSING, "b")
    cache.clear()
    assert cache.stale("b") is MISSING


def test_without_a_stale_window_nothing_outlives_the_ttl() -> None:
    clock = Clock()
    cache: Cache[str, str] = Cache(ttl=30, maxsize=10, timer=clock)
    cache.put("k", "v", cache.generation)
    clock.now += 30
    assert (cache.get("k"), cache.stale("k")) == (MISSING, MISSING)


def test_a_dropped_group_is_not_served_stale() -> None:
    clock = Clock()
    cache: Cache[tuple[str, str], str] = Cache(
        ttl=30, maxsize=10, stale_window=300, timer=clock, group=lambda key: key[0]
    )
    for key in (("c1", "u1"), ("c1", "u2"), ("c2", "u1")):
        cache.put(key, "member", cache.generation)
    clock.now += 60
    cache.drop_group("c1")
    assert [cache.stale(key) for key in (("c1", "u1"), ("c1", "u2"), ("c2", "u1"))] == [
        MISSING,
        MISSING,
        "member",
    ]


def filled(entries: int, clock: Clock) -> Cache[tuple[str, str], str]:
    """A cache of `entries` roles over conversations of 4 members, plus 3 of conversation "c"."""
    cache: Cache[tuple[str, str], str] = Cache(
        ttl=30, maxsize=entries + 3, stale_window=300, timer=clock, group=lambda key: key[0]
    )
    for i in range(entries):
        cache.put((f"other{i // 4}", f"u{i}"), "member", cache.generation)
    for user in ("u1", "u2", "u3"):
        cache.put(("c", user), "member", cache.generation)
    return cache


def test_a_drop_costs_the_entries_it_drops_not_the_size_of_the_cache() -> None:
    """An invalidation event is handled on the event loop: it must not walk a full cache."""
    for entries in (10, 100_000):
        cache = filled(entries, Clock())
        cache.drop(("other0", "u0"))
        assert cache.visited == 1
        cache.drop_group("c")
        assert cache.visited == 1 + 3  # the three entries of "c", whatever the cache holds
        assert len(cache) == entries - 1
        assert cache.stale(("other1", "u4")) == "member"


def test_the_group_index_follows_expiry_and_eviction() -> None:
    """Entries leaving by themselves leave the index too: it never outgrows the cache."""
    clock = Clock()
    cache = filled(1000, clock)
    for i in range(2000):  # evicts the least recently used: all of the above
        cache.put((f"new{i // 4}", f"u{i}"), "member", cache.generation)
    assert len(cache) == 1003
    assert sum(len(keys) for keys in cache._data.groups.values()) == 1003
    cache.drop_group("c")  # evicted already: nothing to visit
    assert cache.visited == 0
    clock.now += 331  # past TTL + window: all expire at the next put
    cache.put(("last", "u"), "member", cache.generation)
    assert len(cache) == 1
    assert cache._data.groups == {"last": {("last", "u")}}


def test_negative_entries_are_gone_at_their_ttl() -> None:
    """A made-up key id or conversation name is never served stale: only within the TTL."""
    clock = Clock()
    cache: Cache[str, bool] = Cache(
        ttl=30, maxsize=100, stale_window=300, timer=clock, negative=lambda found: not found
    )
    cache.put("made-up", False, cache.generation)
    cache.put("real", True, cache.generation)
    clock.now += 29.9
    assert (cache.get("made-up"), cache.stale("made-up")) == (False, False)
    clock.now += 0.2
    assert (cache.get("made-up"), cache.stale("made-up")) == (MISSING, MISSING)
    assert cache.stale("real") is True
    for i in range(20):  # a flood of made-up names, once past their TTL, takes no room
        cache.put(f"made-up-{i}", False, cache.generation)
    clock.now += 30
    cache.put("real-2", True, cache.generation)
    assert (len(cache), cache.stale("real")) == (2, True)


async def test_access_and_keys_drop_by_key_and_forget_made_up_names_at_the_ttl(
    config: Config, resources: Resources, connections: Connections
) -> None:
    """The wiring: events drop without a scan, and negative lookups are negative entries."""
    access = Access(connections, ttl=30, stale_window=300)
    for i in range(1000):
        access._roles.put((f"other{i}", "user:u"), "member", access._roles.generation)
    for user in ("user:a", "user:b"):
        access._roles.put(("c", user), "member", access._roles.generation)
    access.forget(Invalidation("conversation", "c", None))
    access.forget(Invalidation("member", "other1", "user:u"))
    assert (access._roles.visited, access._exists.visited) == (2 + 1, 1)
    assert (len(access._roles), access._roles.stale(("other2", "user:u"))) == (999, "member")
    name = unique("nope")
    with pytest.raises(NotFound):
        await access.require(Principal("user:u", frozenset()), name, "view")
    assert access._exists.stale(name) is False  # cached within the TTL
    assert access._exists._data.ttu(name, (0.0, False), 0.0) == 30  # not kept for the window
    assert access._exists._data.ttu(name, (0.0, True), 0.0) == 330
    auth = Authenticator(config, connections)
    assert auth._unknown._data.ttu("id", (0.0, None), 0.0) == config.auth.key_cache_ttl
    assert auth._known._data.ttu("id", (0.0, None), 0.0) == (
        config.auth.key_cache_ttl + config.auth.stale_window
    )
