"""Every WebSocket closed with 1001 before granian stops a worker.

On SIGTERM or SIGINT a granian worker (2.8) stops accepting, cancels the task of every
WebSocket and drops its runtime, which ends each connection without a close frame (clients
see 1006), and only then runs the ASGI lifespan shutdown: too late to close anything. So the
worker takes these signals first. They are blocked in the worker's main thread before any other
thread starts (every later thread, granian's runtime threads included, inherits the mask), and a
thread of our own waits for them. On one, every socket is closed with 1001 (each close bounded
by `[realtime] close_timeout`, see transport.py), then the signal is unblocked in the loop's
thread and raised there again: granian's own handler stops the worker as before.

Only in granian's workers (the factory path of `create_app`): a process that embeds the app
(tests) keeps its signals. A child process would inherit the mask; the api starts none.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from typing import TYPE_CHECKING

import structlog

from appliance.realtime.stream import CLOSE_GOING_AWAY

if TYPE_CHECKING:
    from litestar.datastructures import State

    from appliance.api.services import Services

log = structlog.get_logger()
SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def block_signals() -> None:
    """Before any thread starts: SIGTERM and SIGINT wait for `drain_on_signal`."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


def drain_on_signal(state: State, svc: Services, timeout: float) -> None:
    """From the lifespan startup (in the loop's thread): on SIGTERM or SIGINT, mark the api as
    stopping (`/readyz` 503, new sockets closed 1001), close every socket with 1001, and let
    granian stop the worker."""
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    running: set[asyncio.Task[None]] = set()

    async def drain(signum: int) -> None:
        started = time.monotonic()
        try:
            state.shutting_down = True
            await close_all(svc, timeout)
            log.info(
                "websockets_closed",
                signal=signal.Signals(signum).name,
                left=len(svc.sessions),
                seconds=round(time.monotonic() - started, 3),
            )
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
            signal.pthread_kill(loop_thread, signum)

    def start(signum: int) -> None:
        task = loop.create_task(drain(signum))
        running.add(task)
        task.add_done_callback(running.discard)

    def wait() -> None:
        signum = signal.sigwait(SIGNALS)
        loop.call_soon_threadsafe(start, signum)

    block_signals()  # already, unless called on its own (then: no thread started before)
    threading.Thread(target=wait, name="signal-drain", daemon=True).start()


async def close_all(svc: Services, timeout: float) -> None:
    """Close every socket with 1001 and wait until their handlers are done (each close frame
    written, or its connection reset after `timeout`)."""
    sessions = list(svc.sessions)
    for session in sessions:
        session.close(CLOSE_GOING_AWAY, "server shutting down")
    if sessions:
        waits = [asyncio.create_task(session.ended.wait()) for session in sessions]
        await asyncio.wait(waits, timeout=timeout + 1.0)  # + a reset walk
        for wait in waits:
            wait.cancel()
