"""`exports.run`: a conversation's full history, as zstd-compressed JSON Lines, to S3.

The run reads every tier through `History.replay` (the Redis tail, flush segments, compacted
history), oldest first, up to the newest seq when it started; each message is one line, the
JSON the HTTP API shows. Memory stays bounded whatever the conversation's size: a page of
messages at a time is compressed (in a thread) and the output goes up as multipart parts
(appliance/multipart.py). Progress is written to the row after each page.

A run always starts over: a worker that crashed mid-export has its job picked up again by
pgqueuer, and the new run aborts the multipart upload the row names before it starts its own.
Each run writes its own object (`object_key(id, attempt)`), recorded in the row with its
upload, and changes the row only while it owns it (`_GUARD`: its attempt, still running). A run
that finds it no longer owns the row (a later run took it over, retention expired it, the
purge deleted it) stops; if its object is already complete it deletes it, and a job that finds
its export expired or gone deletes whatever its runs left (a run that died before it could).
A run that fails marks the row failed with the reason and raises, so the worker retries it.
After MAX_ATTEMPTS runs that did not finish (failed, or died with their worker) the next one
gives up: the job is registered with MAX_ATTEMPTS + 1 attempts, so that this last run always
comes and the row never stays `running`. The row turns ready and `export.ready` is emitted in
one transaction.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import msgspec
import structlog
import zstandard

from appliance.errors import ApplianceError
from appliance.exports.service import PREFIX, Job, object_key
from appliance.messages.blocks import BlockCache
from appliance.messages.history import History
from appliance.multipart import Upload, abort
from appliance.resources import Resources
from appliance.storage import StorageError
from appliance.webhooks import events
from appliance.webhooks import service as webhooks

log = structlog.get_logger()

PAGE = 500  # messages read at once (up to [messages] max_body_bytes each)
MAX_ATTEMPTS = 3
CACHE_BYTES = 8 * 1_048_576  # an export reads each block once: a small cache suffices
ZSTD_LEVEL = 3

# object_key, upload_id stay: they name the upload of the run before, if one crashed (aborted
# below, before this run records its own); error too: what made the run before fail, until this
# one ends.
_CLAIM = """
UPDATE exports SET state = 'running', attempts = attempts + 1, started_at = now(),
       messages = 0, last_seq = 0, head_seq = NULL, finished_at = NULL
 WHERE id = %s AND state IN ('queued', 'running', 'failed')
RETURNING conversation, attempts, object_key, upload_id, error
"""
# The run's own attempt only: a later run (after a crash) owns the row from then on.
_GUARD = " WHERE id = %s AND attempts = %s AND state = 'running'"


async def run(res: Resources, payload: bytes) -> None:
    export_id = msgspec.json.decode(payload, type=Job).export
    async with res.connection() as conn:
        cur = await conn.execute(_CLAIM, (export_id,))
        claimed = await cur.fetchone()
    if claimed is None:
        await _leftovers(res, export_id)
        return
    conversation, attempt, stale_key, stale_upload, last_error = claimed
    key = object_key(export_id, attempt)
    upload: Upload | None = None
    try:
        if stale_upload is not None:
            await abort(res.storage, stale_key, stale_upload)
        if attempt > MAX_ATTEMPTS:
            last = last_error or "its worker stopped"
            reason = f"gave up after {MAX_ATTEMPTS} runs that did not finish; the last: {last}"
            await _fail(res, export_id, attempt, reason)
            return
        if not await _live(res, conversation):
            await _fail(res, export_id, attempt, "the conversation was deleted")
            return
        upload = await Upload.start(res.storage, key)
        async with res.connection() as conn:
            cur = await conn.execute(
                "UPDATE exports SET object_key = %s, upload_id = %s" + _GUARD,
                (key, upload.upload_id, export_id, attempt),
            )
        if cur.rowcount == 0:  # superseded (or expired) before it wrote anything
            await upload.abort()
            log.warning("export_superseded", export=export_id, attempt=attempt)
            return
        messages = await _write(res, export_id, attempt, conversation, upload)
        await upload.complete()
    except Exception as exc:
        # An upload that may not be aborted yet (the run before's, or this run's if S3 refused):
        # the row keeps it with its key, for the retry to abort.
        left = None if stale_upload is None else (stale_key, stale_upload)
        if upload is not None:
            left = None
            try:
                await upload.abort()
            except StorageError as failed:
                left = (key, upload.upload_id)
                log.warning("export_abort_failed", export=export_id, error=failed.message)
        reason = exc.message if isinstance(exc, ApplianceError) else "internal error"
        await _fail(res, export_id, attempt, reason, left)
        raise
    if not await _ready(res, export_id, attempt, conversation, messages, upload.size):
        log.warning("export_superseded", export=export_id, attempt=attempt)
        await _discard(res, export_id, key)
        return
    log.info("export_ready", export=export_id, messages=messages, size=upload.size)


async def _discard(res: Resources, export_id: str, key: str) -> None:
    """Delete the object of a run that lost its row after completing it: nobody will show it.
    If S3 refuses and the row is expired or gone, raise: the job's retry deletes it
    (`_leftovers`). A row a later run owns is still retention's, which deletes every run's
    object with it."""
    try:
        await res.storage.delete(key)
    except StorageError as exc:
        if await _state(res, export_id) in (None, "expired"):
            raise
        log.warning("export_discard_failed", export=export_id, key=key, error=exc.message)


async def _leftovers(res: Resources, export_id: str) -> None:
    """A job for an export no run may take: done (ready, failed for good), expired, or gone.
    An expired or gone one may still have an object that a run completed after retention's
    pass, then died or could not delete: every object of it goes."""
    deleted = 0
    if await _state(res, export_id) in (None, "expired"):
        found = await res.storage.list_keys(f"{PREFIX}{export_id}.")
        deleted = await res.storage.delete_many([k for k, _ in found])
    log.info("export_skipped", export=export_id, reason="done, expired or gone", deleted=deleted)


async def _state(res: Resources, export_id: str) -> str | None:
    async with res.connection() as conn:
        cur = await conn.execute("SELECT state FROM exports WHERE id = %s", (export_id,))
        row = await cur.fetchone()
    return None if row is None else str(row[0])


async def _write(
    res: Resources, export_id: str, attempt: int, conversation: str, upload: Upload
) -> int:
    """Every message up to the head, through the compressor into `upload`; the count."""
    history = History(
        res.redis,
        res.keys,
        res.connection,
        BlockCache(res.storage, min(CACHE_BYTES, res.config.segments.cache_bytes)),
    )
    head = await history.head(conversation)
    async with res.connection() as conn:
        await conn.execute("UPDATE exports SET head_seq = %s" + _GUARD, (head, export_id, attempt))
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compressobj()
    after = written = 0
    while after < head:
        page = [m for m in await history.replay(conversation, after, PAGE) if m[0] <= head]
        if not page:
            break  # seqs past the last one held are gone (past retention, or lost)
        lines = b"".join(message + b"\n" for _, message in page)
        await upload.write(await asyncio.to_thread(compressor.compress, lines))
        written += len(page)
        after = page[-1][0]
        async with res.connection() as conn:
            await conn.execute(
                "UPDATE exports SET messages = %s, last_seq = %s" + _GUARD,
                (written, after, export_id, attempt),
            )
    await upload.write(await asyncio.to_thread(compressor.flush))
    return written


async def _live(res: Resources, conversation: str) -> bool:
    async with res.connection() as conn:
        cur = await conn.execute(
            "SELECT 1 FROM conversations WHERE id = %s AND deleted_at IS NULL", (conversation,)
        )
        return await cur.fetchone() is not None


async def _ready(
    res: Resources, export_id: str, attempt: int, conversation: str, messages: int, size: int
) -> bool:
    """The row ready and `export.ready` emitted, in one transaction; False if this run no
    longer owns the row (a later run took it over, or retention expired it)."""
    async with res.connection() as conn, conn.transaction():
        cur = await conn.execute(
            "UPDATE exports SET state = 'ready', upload_id = NULL, size = %s, messages = %s,"
            " error = NULL, finished_at = now()" + _GUARD + " RETURNING last_seq",
            (size, messages, export_id, attempt),
        )
        row = await cur.fetchone()
        if row is None:
            return False
        data = {"export": export_id, "messages": messages, "last_seq": row[0], "size": size}
        ready = events.event("export.ready", data, conversation=conversation, at=datetime.now(UTC))
        await webhooks.emit(conn, [ready], batch_max=res.config.webhooks.batch_max)
    return True


async def _fail(
    res: Resources,
    export_id: str,
    attempt: int,
    reason: str,
    left: tuple[str, str] | None = None,
) -> None:
    """The row failed; `left`: (key, upload id) of an upload not aborted, for the retry."""
    log.error("export_failed", export=export_id, attempt=attempt, reason=reason)
    key, upload_id = left or (None, None)
    async with res.connection() as conn:
        await conn.execute(
            "UPDATE exports SET state = 'failed', object_key = coalesce(%s, object_key),"
            " upload_id = %s, error = %s, finished_at = now()" + _GUARD,
            (key, upload_id, reason, export_id, attempt),
        )
