"""Job attempts and parked jobs (table `job_attempts`, migration 0005): what pgqueuer does not keep.

- An attempt is counted before its handler runs (`begin`, committed before the handler starts),
  so an attempt that kills its worker is counted too. pgqueuer re-picks such a job with its own
  count unchanged; `begin` then finds the attempt still marked running ("lost") and changes
  nothing: the worker decides. If the worker that began it demonstrably still runs (a stalled
  event loop or a lost connection let the job's heartbeat lapse), the job waits, uncounted;
  else the worker records it as a failed attempt: parked if it was the last, else run again (at
  once for a first attempt, after a back-off for a later one), never run again uncounted.
- An `Attempt` is (job, number, worker). `succeeded` and `failed` change the row only while it
  is still that attempt's: a worker whose attempt another worker has since counted as lost, or
  replaced with a newer one, changes nothing of the newer attempt's row.
- A job that has used its attempts is parked: its row keeps entrypoint, payload, attempts, the
  last error, the first and last attempt times. `requeue` enqueues the payload again as a new job
  and forgets the parked row, in one transaction; `discard` forgets it.
- Back-off before attempt n+1 (`backoff`, also used by webhook deliveries): `first * 2^(n-1)`,
  capped, times a random factor of 0.5-1 (jobs that failed together, say in an outage, do not
  retry together).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pgqueuer.domain.settings import db_settings
from psycopg import sql

from appliance import queue
from appliance.config import scrub as scrub_secrets
from appliance.resources import Conn

# A FROM item that makes the statement's own (autocommit) transaction commit asynchronously:
# set_config(..., true) is SET LOCAL, and synchronous_commit is read at commit.
_ASYNC_COMMIT = "(SELECT set_config('synchronous_commit', 'off', true))"
ERROR_MAX = 2000  # characters of an error kept; a traceback's last line is what an operator needs


def _queue() -> sql.Identifier:
    return sql.Identifier(db_settings().queue_table)


def error_text(exc: BaseException) -> str:
    """`Type: message`, without secrets (URLs with passwords), bounded."""
    message = str(exc)
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return scrub_secrets(text)[:ERROR_MAX]


def backoff(
    attempt: int, first: float, ceiling: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based) before the next: `first`
    doubled per attempt, at most `ceiling`, times a random 0.5-1."""
    full = min(ceiling, first * 2.0 ** min(attempt - 1, 32))
    return float(full * (0.5 + rand() / 2))


@dataclass(frozen=True)
class Attempt:
    """Attempt `number` of job `job_id`, begun by `worker` ("<instance> pid <pid>")."""

    job_id: int
    number: int
    worker: str


@dataclass(frozen=True)
class Start:
    """What `begin` found. run: `attempt` starts now. lost: `attempt` is still marked running
    (since `started`), though pgqueuer gave its job out again (`error` says why, for the
    record); the handler must not run now. parked: the job was parked already (its worker died
    before pgqueuer forgot it); nothing to do."""

    action: Literal["run", "lost", "parked"]
    attempt: Attempt
    started: datetime | None = None
    error: str | None = None


async def begin(conn: Conn, job_id: int, entrypoint: str, worker: str) -> Start:
    """Start the next attempt of `job_id` for `worker`, unless the last one is still marked
    running (lost: nothing is written) or the job is parked. `conn` is autocommit."""
    # Nearly every attempt is a job's first: one statement, which finds a row only for a job
    # that was tried before, and then the transaction below reads it. Committed without waiting
    # for the WAL flush (_ASYNC_COMMIT): PostgreSQL crashing within its next 200 ms may forget
    # the count, and the job then gets one attempt more, which at-least-once allows.
    cur = await conn.execute(
        "INSERT INTO job_attempts (job_id, entrypoint, attempts, running, worker)"
        " SELECT %s, %s, 1, true, %s FROM " + _ASYNC_COMMIT + " AS a"
        " ON CONFLICT (job_id) DO NOTHING RETURNING 1",
        (job_id, entrypoint, worker),
    )
    if await cur.fetchone() is not None:
        return Start("run", Attempt(job_id, 1, worker))
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT attempts, running, parked_at IS NOT NULL, worker, last_attempt_at"
            " FROM job_attempts WHERE job_id = %s FOR UPDATE",
            (job_id,),
        )
        row = await cur.fetchone()
        if row is None:
            await conn.execute(
                "INSERT INTO job_attempts (job_id, entrypoint, attempts, running, worker)"
                " VALUES (%s, %s, 1, true, %s)",
                (job_id, entrypoint, worker),
            )
            return Start("run", Attempt(job_id, 1, worker))
        attempts, running, parked, last_worker, last_attempt_at = row
        if parked:
            return Start("parked", Attempt(job_id, attempts, last_worker))
        if running:
            error = f"the worker running it ({last_worker}) died or lost its heartbeat"
            return Start("lost", Attempt(job_id, attempts, last_worker), last_attempt_at, error)
        await conn.execute(
            "UPDATE job_attempts SET attempts = attempts + 1, running = true, worker = %s,"
            " last_attempt_at = now() WHERE job_id = %s",
            (worker, job_id),
        )
        return Start("run", Attempt(job_id, attempts + 1, worker))


# Both match the attempt, not only the job: see the module docstring.
_ATTEMPT = " WHERE job_id = %s AND attempts = %s AND worker = %s"


async def succeeded(conn: Conn, attempts: Sequence[Attempt]) -> list[Attempt]:
    """Forget the jobs' counts after `attempts` succeeded, in one statement (the worker gathers
    the successes of a few milliseconds). Each succeeded even if another worker counted it as
    lost meanwhile (and parked the job, or queued a retry, which pgqueuer drops with this
    success); but a newer attempt's row is left alone. Returns the attempts that matched no
    row."""
    if not attempts:
        return []
    # Committed without waiting for the WAL flush (_ASYNC_COMMIT): a delete that PostgreSQL
    # forgets in a crash leaves rows that the sweep forgets.
    cur = await conn.execute(
        "DELETE FROM job_attempts a USING unnest(%s::bigint[], %s::int[], %s::text[])"
        " AS d(job_id, attempts, worker), " + _ASYNC_COMMIT + " AS s WHERE a.job_id = d.job_id"
        " AND a.attempts = d.attempts AND a.worker = d.worker RETURNING a.job_id, a.attempts",
        (
            [a.job_id for a in attempts],
            [a.number for a in attempts],
            [a.worker for a in attempts],
        ),
    )
    matched = {(job_id, number) for job_id, number in await cur.fetchall()}
    return [a for a in attempts if (a.job_id, a.number) not in matched]


async def failed(conn: Conn, attempt: Attempt, error: str, *, park: bool, payload: bytes) -> bool:
    """Record that `attempt` failed; `park`: the job is out of attempts, keep it as failed.
    False: `attempt` is no longer the job's running attempt (another worker counted it as lost,
    and its record stands); nothing was written."""
    cur = await conn.execute(
        "UPDATE job_attempts SET running = false, last_error = %s,"
        " parked_at = CASE WHEN %s THEN now() END, payload = CASE WHEN %s THEN %s::bytea END"
        + _ATTEMPT
        + " AND running",
        (error, park, park, payload, attempt.job_id, attempt.number, attempt.worker),
    )
    return cur.rowcount == 1


async def carry_over(conn: Conn, old_id: int, new_id: int) -> None:
    """A job cut off by the drain deadline was enqueued again as `new_id`: the copy keeps the
    count of attempts, less the one that was cut off (not the job's fault)."""
    await conn.execute(
        "UPDATE job_attempts SET job_id = %s, running = false,"
        " attempts = greatest(attempts - 1, 0) WHERE job_id = %s",
        (new_id, old_id),
    )


async def sweep(conn: Conn, older_than_s: float) -> int:
    """Forget counts of jobs that pgqueuer no longer holds (the delete after a success failed,
    or the job was deleted outside the worker), once untouched for `older_than_s` seconds."""
    cur = await conn.execute(
        sql.SQL(
            "DELETE FROM job_attempts a WHERE parked_at IS NULL"
            " AND last_attempt_at < now() - make_interval(secs => %s)"
            " AND NOT EXISTS (SELECT FROM {} q WHERE q.id = a.job_id)"
        ).format(_queue()),
        (older_than_s,),
    )
    return cur.rowcount


async def depth(conn: Conn) -> list[tuple[str, str, int]]:
    """(entrypoint, status, jobs): queued and running jobs from pgqueuer's table, parked from
    ours. `queued` includes retries waiting out their back-off."""
    cur = await conn.execute(
        sql.SQL(
            "SELECT entrypoint, CASE status WHEN 'picked' THEN 'running' ELSE status::text END,"
            " count(*) FROM {} WHERE status IN ('queued', 'picked') GROUP BY 1, 2"
            " UNION ALL SELECT entrypoint, 'parked', count(*) FROM job_attempts"
            " WHERE parked_at IS NOT NULL GROUP BY 1"
        ).format(_queue())
    )
    return [(e, s, int(n)) for e, s, n in await cur.fetchall()]


@dataclass(frozen=True)
class Active:
    id: int
    entrypoint: str
    status: Literal["queued", "running"]
    attempts: int  # started so far (0: never started)
    created: datetime
    execute_after: datetime
    last_error: str | None


async def active(conn: Conn, limit: int) -> list[Active]:
    """Queued and running jobs, oldest first, with their attempts so far."""
    cur = await conn.execute(
        sql.SQL(
            "SELECT q.id, q.entrypoint,"
            " CASE q.status WHEN 'picked' THEN 'running' ELSE 'queued' END,"
            " coalesce(a.attempts, 0), q.created, q.execute_after, a.last_error"
            " FROM {} q LEFT JOIN job_attempts a ON a.job_id = q.id"
            " WHERE q.status IN ('queued', 'picked') ORDER BY q.id LIMIT %s"
        ).format(_queue()),
        (limit,),
    )
    return [Active(*row) for row in await cur.fetchall()]


@dataclass(frozen=True)
class Parked:
    id: int  # the job id it had when it failed; `appliance jobs retry ID` takes it
    entrypoint: str
    attempts: int
    last_error: str | None
    first_attempt_at: datetime
    last_attempt_at: datetime
    parked_at: datetime
    payload_bytes: int


async def parked(conn: Conn, limit: int) -> list[Parked]:
    cur = await conn.execute(
        "SELECT job_id, entrypoint, attempts, last_error, first_attempt_at, last_attempt_at,"
        " parked_at, length(payload) FROM job_attempts WHERE parked_at IS NOT NULL"
        " ORDER BY parked_at, job_id LIMIT %s",
        (limit,),
    )
    return [Parked(*row) for row in await cur.fetchall()]


async def parked_count(conn: Conn) -> int:
    cur = await conn.execute("SELECT count(*) FROM job_attempts WHERE parked_at IS NOT NULL")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


@dataclass(frozen=True)
class Requeued:
    id: int  # the parked job
    new_id: int | None  # the job enqueued for it; None: skipped (see `skipped`)
    entrypoint: str
    skipped: str | None = None


async def requeue(conn: Conn, job_id: int | None) -> list[Requeued]:
    """Enqueue parked job `job_id` (None: every parked job) again with its payload, as a new job
    with a fresh count, and forget the parked row; one transaction. A job whose entrypoint this
    version no longer serves stays parked and is reported as skipped."""
    out = []
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT job_id, entrypoint, payload FROM job_attempts WHERE parked_at IS NOT NULL"
            " AND (%s::bigint IS NULL OR job_id = %s) ORDER BY job_id FOR UPDATE SKIP LOCKED",
            (job_id, job_id),
        )
        for old_id, entrypoint, payload in await cur.fetchall():
            if entrypoint not in queue.NAMES:
                out.append(Requeued(old_id, None, entrypoint, "unknown entrypoint"))
                continue
            new_id = await queue.enqueue(conn, entrypoint, bytes(payload))
            await conn.execute("DELETE FROM job_attempts WHERE job_id = %s", (old_id,))
            out.append(Requeued(old_id, new_id, entrypoint))
    return out


async def discard(conn: Conn, job_id: int | None) -> list[int]:
    """Forget parked job `job_id` (None: every parked job) for good; the ids forgotten."""
    cur = await conn.execute(
        "DELETE FROM job_attempts WHERE parked_at IS NOT NULL"
        " AND (%s::bigint IS NULL OR job_id = %s) RETURNING job_id",
        (job_id, job_id),
    )
    return sorted(int(row[0]) for row in await cur.fetchall())
