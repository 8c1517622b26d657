"""Bounded logging of lines that repeat once per request while a dependency is down.

The first occurrence of a key is logged at once. Later ones within `every` seconds are only
counted, and at the end of that window one line carries the count (`repeated=N`, `seconds=S`);
so a key writes at most one line per window however many requests fail. A key quiet for a whole
window starts afresh. Metrics still count every request: the log says that it happens and since
when, not how often. Neither structlog nor the standard library offers this (their filters drop
lines, they do not count them), and it is too small to take a dependency for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

Emit = Callable[..., Any]  # a bound logger method: log.warning, log.error
MAX_KEYS = 256  # keys come from a small set (event, dependency, error type); beyond it, no throttle


@dataclass
class _Key:
    last: float  # when a line of this key was last written
    held: int = 0  # occurrences counted since, not written
    emit: Emit | None = None
    event: str = ""
    fields: dict[str, Any] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None


class Throttle:
    """`throttle(log.warning, "event", key, **fields)` in place of `log.warning("event", **fields)`.

    The summary is written by a timer on the running event loop; without one (or if that loop
    has gone), by the next occurrence once the window has passed.
    """

    def __init__(self, every: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self._clock = clock
        self._keys: dict[Hashable, _Key] = {}

    def __call__(self, emit: Emit, event: str, key: Hashable, **fields: Any) -> None:
        now = self._clock()
        state = self._keys.get(key)
        if state is None or (state.held == 0 and now - state.last >= self.every):
            if state is None and len(self._keys) >= MAX_KEYS:
                emit(event, **fields)
                return
            self._keys[key] = _Key(last=now)
            emit(event, **fields)
            return
        state.held += 1
        state.emit, state.event, state.fields = emit, event, fields
        if now - state.last >= self.every:  # the timer did not run: write the summary now
            self._flush(key)
        elif state.timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            state.timer = loop.call_later(state.last + self.every - now, self._flush, key)

    def _flush(self, key: Hashable) -> None:
        state = self._keys[key]
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None
        if state.held and state.emit is not None:
            now = self._clock()
            seconds = round(now - state.last, 1)
            state.emit(state.event, **state.fields, repeated=state.held, seconds=seconds)
            state.held, state.last = 0, now
