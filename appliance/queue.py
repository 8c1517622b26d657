"""Enqueueing jobs: the one way any module puts a job on the queue.

A leaf: it imports no feature, so that features enqueue from module level while the registry
(appliance/jobs.py) imports their handlers. `NAMES` lists every entrypoint the worker serves;
enqueueing another name is an error here and then, not a job that waits forever for a worker that
never takes it. tests/test_jobs.py checks that `NAMES` and the registry agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from pgqueuer.queries import Queries

from appliance.resources import Conn

NAMES: tuple[str, ...] = (
    "attachments.verify",
    "backups.run",
    "diagnostics.noop",
    "diagnostics.ping",
    "exports.run",
    "webhooks.deliver",
)


async def enqueue(
    conn: Conn,
    entrypoint: str,
    payload: bytes,
    *,
    dedupe_key: str | None = None,
    execute_after: timedelta | None = None,
) -> int:
    """Enqueue on `conn` (inside the caller's transaction if one is open: a rollback leaves no
    job); returns the job id. `execute_after` delays the first run."""
    if entrypoint not in NAMES:
        raise ValueError(f"unknown job entrypoint {entrypoint!r}")
    ids = await Queries.from_psycopg_connection(conn).enqueue(
        entrypoint, payload, dedupe_key=dedupe_key, execute_after=execute_after
    )
    return int(ids[0])


async def enqueue_many(conn: Conn, entrypoint: str, payloads: Sequence[bytes]) -> list[int]:
    """Enqueue one job per payload in one statement (one round trip, however many), on `conn`
    as `enqueue` does; returns the job ids in the payloads' order."""
    if entrypoint not in NAMES:
        raise ValueError(f"unknown job entrypoint {entrypoint!r}")
    if not payloads:
        return []
    ids = await Queries.from_psycopg_connection(conn).enqueue(
        [entrypoint] * len(payloads), list(payloads), [0] * len(payloads)
    )
    return [int(i) for i in ids if i is not None]
