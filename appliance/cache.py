"""The per-process cache behind authentication and access checks.

Entries are fresh for a TTL and are dropped at once by invalidation events. A lookup that began
before an invalidation must not store its result, which may predate the change: every drop
advances `generation`, and `put` only stores what was loaded under the current one.

Past its TTL an entry is kept for `stale_window` seconds more, for one use only: when PostgreSQL
cannot be asked, `stale()` still answers from it, so known keys and members go on publishing
through an outage. A dropped entry is gone for good: invalidations hold during an outage too.
A negative entry (`negative(value)`: a made-up key id, a conversation that does not exist) is
gone at its TTL: anyone can mint those, and the window would only let them fill the cache.

A drop costs the entries it drops, not the size of the cache: one key is one pop, and a group
(`group(key)`: all the roles of one conversation) is found through an index of its keys, kept in
step with every way an entry leaves (drop, expiry, eviction of the least recently used).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar, cast

import cachetools

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
MISSING = object()


class _Store(cachetools.TLRUCache[Any, tuple[float, Any], float]):
    """A TLRU cache that knows the keys of each group (with `group`), whatever removes them."""

    def __init__(
        self,
        maxsize: int,
        ttu: Callable[[Any, tuple[float, Any], float], float],
        timer: Callable[[], float],
        group: Callable[[Any], Hashable] | None,
    ) -> None:
        super().__init__(maxsize, ttu, timer)
        self._group = group
        self.groups: dict[Hashable, set[Any]] = {}

    def __setitem__(self, key: Any, value: tuple[float, Any]) -> None:
        super().__setitem__(key, value)
        if self._group is not None and cachetools.Cache.__contains__(self, key):
            self.groups.setdefault(self._group(key), set()).add(key)

    def __delitem__(self, key: Any) -> None:
        try:
            super().__delitem__(key)
        finally:
            self._unindex(key)

    def expire(self, time: float | None = None) -> list[tuple[Any, tuple[float, Any]]]:
        expired = super().expire(time)
        for key, _ in expired:
            self._unindex(key)
        return expired

    def clear(self) -> None:
        super().clear()
        self.groups.clear()

    def _unindex(self, key: Any) -> None:
        if self._group is None:
            return
        group = self._group(key)
        keys = self.groups.get(group)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.groups[group]


class Cache(Generic[K, V]):
    def __init__(
        self,
        ttl: float,
        maxsize: int,
        stale_window: float = 0.0,
        timer: Callable[[], float] = time.monotonic,
        *,
        group: Callable[[K], Hashable] | None = None,
        negative: Callable[[V], bool] = lambda value: False,
    ) -> None:
        self._ttl = ttl
        self._timer = timer

        def until(key: K, entry: tuple[float, V], now: float) -> float:
            return now + (ttl if negative(entry[1]) else ttl + stale_window)

        # Full, the least recently used entry goes: a flood of new keys never empties the cache.
        # Each value carries the monotonic time it was loaded at.
        self._data = _Store(maxsize, until, timer, group)
        self.generation = 0
        self.visited = 0  # entries a drop looked at (what a drop costs; tests check it)

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: K) -> V | object:
        """The value if loaded within the TTL, or MISSING."""
        entry = self._data.get(key)
        if entry is None or self._timer() - entry[0] >= self._ttl:
            return MISSING
        return cast(V, entry[1])

    def stale(self, key: K) -> V | object:
        """The value if loaded within TTL + stale window (for when it cannot be reloaded)."""
        entry = self._data.get(key)
        return MISSING if entry is None else cast(V, entry[1])

    def put(self, key: K, value: V, generation: int) -> None:
        """Store what was loaded while `generation` was current, unless a drop came since."""
        if generation == self.generation:
            self._data[key] = (self._timer(), value)

    def drop(self, key: K) -> None:
        """Drop one entry."""
        self.generation += 1
        self.visited += 1
        self._data.pop(key, None)

    def drop_group(self, group: Hashable) -> None:
        """Drop every entry of `group` (the cache was made with `group`)."""
        self.generation += 1
        for key in list(self._data.groups.get(group, ())):
            self.visited += 1
            self._data.pop(key, None)

    def clear(self) -> None:
        """Drop every entry (a missed-event window)."""
        self.generation += 1
        self._data.clear()
