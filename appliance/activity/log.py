"""The API activity log: records buffered in memory, written in batches by a background task.

`record()` runs on the request path, so it only appends to a bounded list. Every
`flush_interval` the task writes the whole buffer with one COPY; if PostgreSQL is unavailable
the records stay buffered (oldest dropped beyond `queue_max`) and the next tick retries.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import psycopg
import structlog
from psycopg import errors
from psycopg_pool import AsyncConnectionPool

from appliance import metrics
from appliance.config.model import ActivitySection

log = structlog.get_logger()

_COPY = (
    "COPY api_activity (at, principal, via, method, route, status, duration_ms, ip, request_id)"
    " FROM STDIN"
)
_ENSURE = "SELECT appliance_ensure_month_partition('api_activity', %s)"
# Retrying these cannot succeed: bad values in the batch (or, for partitions, one already there).
_PERMANENT = (psycopg.DataError, psycopg.IntegrityError)


@dataclass(frozen=True, slots=True)
class ActivityRecord:
    at: datetime  # tz-aware UTC
    principal: str
    via: str | None  # the key acting for `principal` (X-On-Behalf-Of), else None
    method: str
    route: str  # the route template, not the path
    status: int
    duration_ms: float
    ip: str | None  # anything but a valid address is stored as NULL
    request_id: str


def _month(at: datetime) -> date:
    return at.astimezone(UTC).date().replace(day=1)


def _next_month(month: date) -> date:
    return (month.replace(day=28) + timedelta(days=4)).replace(day=1)


def _inet(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    # PostgreSQL's inet has no IPv6 zone ("fe80::1%eth0").
    return str(address).partition("%")[0]


def _reason(exc: BaseException) -> str:
    # psycopg messages name host, port and user, never the password; keep the first line only.
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]


class ActivityLog:
    def __init__(
        self, section: ActivitySection, pool: AsyncConnectionPool, *, close_timeout: float = 5.0
    ) -> None:
        self._enabled = section.enabled
        self._interval = section.flush_interval
        self._max = section.queue_max
        self._pool = pool
        self._close_timeout = close_timeout
        self._buffer: list[ActivityRecord] = []
        self._months: set[date] = set()  # months whose partition was ensured
        self._dropped_unlogged = 0
        self._closed = False
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._written = metrics.ACTIVITY_RECORDS.labels("written")
        self._dropped = metrics.ACTIVITY_RECORDS.labels("dropped")
        self._failed = metrics.ACTIVITY_RECORDS.labels("failed")

    @property
    def pending(self) -> int:
        """Records buffered and not yet written."""
        return len(self._buffer)

    def record(self, rec: ActivityRecord) -> None:
        """Buffer one record; when the buffer is full (or the log closed), drop it and count."""
        if not self._enabled:
            return
        if self._closed or len(self._buffer) >= self._max:
            self._dropped.inc()
            self._dropped_unlogged += 1
            return
        self._buffer.append(rec)

    async def start(self) -> None:
        """Ensure this and next month's partitions (best effort), then start the flush task."""
        if not self._enabled or self._task is not None:
            return
        try:
            async with self._pool.connection() as conn:
                await self._ensure(conn, _month(datetime.now(UTC)))
        except psycopg.Error as exc:
            # The first batch ensures the partition again before writing.
            log.warning("activity_partition_failed", error=_reason(exc))
        self._task = asyncio.create_task(self._run(), name="activity-log")

    async def aclose(self) -> None:
        """Stop the task and write what is buffered; what is left after the timeout is dropped."""
        self._stopping.set()
        try:
            async with asyncio.timeout(self._close_timeout):
                if self._task is not None:
                    await self._task
                if self._enabled:
                    await self._flush()
        except TimeoutError:
            log.warning("activity_close_timeout", seconds=self._close_timeout)
        self._closed = True
        if self._buffer:
            log.warning("activity_records_lost", count=len(self._buffer))
            self._dropped.inc(len(self._buffer))
            self._buffer = []

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._stopping.wait(), self._interval)
                return
            except TimeoutError:
                await self._flush()

    async def _flush(self) -> None:
        if self._dropped_unlogged:
            log.warning("activity_records_dropped", count=self._dropped_unlogged, max=self._max)
            self._dropped_unlogged = 0
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        try:
            await self._write(batch)
        except _PERMANENT as exc:
            log.warning("activity_batch_rejected", count=len(batch), error=_reason(exc))
            self._failed.inc(len(batch))
        except psycopg.Error as exc:
            log.warning("activity_write_failed", count=len(batch), error=_reason(exc))
            self._requeue(batch)
        except asyncio.CancelledError:
            self._requeue(batch)
            raise
        except Exception:
            # A bug, not PostgreSQL: count and log it, but keep the task (and the API) running.
            log.exception("activity_batch_rejected", count=len(batch))
            self._failed.inc(len(batch))
        else:
            self._written.inc(len(batch))

    def _requeue(self, batch: list[ActivityRecord]) -> None:
        """Put a failed batch back in front of newer records, dropping the oldest beyond max."""
        merged = batch + self._buffer
        excess = len(merged) - self._max
        if excess > 0:
            self._dropped.inc(excess)
            self._dropped_unlogged += excess
            merged = merged[excess:]
        self._buffer = merged

    async def _write(self, batch: list[ActivityRecord]) -> None:
        async with self._pool.connection() as conn:
            await self._ensure(conn, _month(batch[0].at))
            async with conn.transaction(), conn.cursor() as cur, cur.copy(_COPY) as copy:
                for i, r in enumerate(batch, 1):
                    row = (r.at, r.principal, r.via, r.method, r.route, r.status, r.duration_ms)
                    await copy.write_row((*row, _inet(r.ip), r.request_id))
                    if i % 200 == 0:  # write_row rarely yields: let requests run meanwhile
                        await asyncio.sleep(0)

    async def _ensure(self, conn: psycopg.AsyncConnection[object], month: date) -> None:
        """Create `month`'s and the next month's partitions unless known to exist."""
        for m in (month, _next_month(month)):
            if m in self._months:
                continue
            try:
                await conn.execute(_ENSURE, (m,))
            except (*_PERMANENT, errors.DuplicateTable) as exc:
                # DEFAULT already holds rows of that month (they stay there), or another process
                # created the partition at the same moment: either way, do not try again.
                log.warning("activity_partition_failed", month=m.isoformat(), error=_reason(exc))
            self._months.add(m)
