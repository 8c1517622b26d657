"""The per-process cache behind authentication and access checks.

Entries live for a TTL and are dropped at once by invalidation events. A lookup that began before
an invalidation must not store its result, which may predate the change: every drop advances
`generation`, and `put` only stores what was loaded under the current one.
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
    def __init__(self, ttl: float, maxsize: int) -> None:
        # Full, the least recently used entry goes: a flood of new keys never empties the cache.
        self._data: cachetools.TTLCache[K, V] = cachetools.TTLCache(
            maxsize, ttl, timer=time.monotonic
        )
        self.generation = 0

    def get(self, key: K) -> V | object:
        """The cached value, or MISSING."""
        return self._data.get(key, MISSING)

    def put(self, key: K, value: V, generation: int) -> None:
        """Store what was loaded while `generation` was current, unless a drop came since."""
        if generation == self.generation:
            self._data[key] = value

    def drop(self, match: Callable[[K], bool] | None = None) -> None:
        """Drop the entries `match` accepts (all of them with no `match`)."""
        self.generation += 1
        if match is None:
            self._data.clear()
        else:
            for key in [k for k in self._data if match(k)]:
                self._data.pop(key, None)
