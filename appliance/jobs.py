"""Job plumbing: the entrypoint registry the worker serves, and enqueueing from anywhere.

Feature modules own their handlers (`appliance/<feature>/jobs.py`) and are listed in `ENTRYPOINTS`;
the worker wraps each with a timeout, metrics and a log line.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from pgqueuer.queries import Queries

from appliance.diagnostics import jobs as diagnostics
from appliance.resources import Conn, Resources

Handler = Callable[[Resources, bytes], Awaitable[None]]

ENTRYPOINTS: dict[str, Handler] = {
    diagnostics.PING: diagnostics.ping,
}


async def enqueue(
    conn: Conn, entrypoint: str, payload: bytes, *, dedupe_key: str | None = None
) -> int:
    """Enqueue on `conn` (inside the caller's transaction if one is open); returns the job id."""
    if entrypoint not in ENTRYPOINTS:
        raise ValueError(f"unknown job entrypoint {entrypoint!r}")
    ids = await Queries.from_psycopg_connection(conn).enqueue(
        entrypoint, payload, dedupe_key=dedupe_key
    )
    return int(ids[0])
