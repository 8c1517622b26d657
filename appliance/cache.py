"""The per-process cache behind authentication and access checks.

Entries are fresh for a TTL and are dropped at once by invalidation events. A lookup that began
before an invalidation must not store its result, which may predate the change: every drop
advances `generation`, and `put` only stores what was loaded under the current one.

Past its TTL an entry is kept for `stale_window` seconds more, for one use only: when PostgreSQL
cannot be asked, `stale()` still answers from it, so known keys and members go on publishing
through an outage. A dropped entry is gone for good: invalidations hold during an outage too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import cachetools

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
MISSING = object()


class Cache(Generic[K, V]):
    def __init__(
        self,
        ttl: float,
        maxsize: int,
        stale_window: float = 0.0,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl
        self._timer = timer
        # Full, the least recently used entry goes: a flood of new keys never empties the cache.
        # Each value carries the monotonic time it was loaded at.
        self._data: cachetools.TTLCache[K, tuple[float, V]] = cachetools.TTLCache(
            maxsize, ttl + stale_window, timer=timer
        )
        self.generation = 0

    def get(self, key: K) -> V | object:
        """The value if loaded within the TTL, or MISSING."""
        entry = self._data.get(key)
        if entry is None or self._timer() - entry[0] >= self._ttl:
            return MISSING
        return entry[1]

    def stale(self, key: K) -> V | object:
        """The value if loaded within TTL + stale window (for when it cannot be reloaded)."""
        entry = self._data.get(key)
        return MISSING if entry is None else entry[1]

    def put(self, key: K, value: V, generation: int) -> None:
        """Store what was loaded while `generation` was current, unless a drop came since."""
        if generation == self.generation:
            self._data[key] = (self._timer(), value)

    def drop(self, match: Callable[[K], bool] | None = None) -> None:
        """Drop the entries `match` accepts (all of them with no `match`)."""
        self.generation += 1
        if match is None:
            self._data.clear()
        else:
            for key in [k for k in self._data if match(k)]:
                self._data.pop(key, None)
