"""The S3 side of segments: object names, block and segment reads, streamed uploads.

Flush segments are `segments/flush/<day>/<sha256>.seg`: named by their content, so a replayed
PUT of the same cut overwrites the same object instead of forking it (the day is the flusher's
UTC date at the cut, a hint for sweeping; the index holds the exact key). History objects are
`segments/history/<day>.seg`, one per compacted UTC day. Decoding runs in a worker thread: a
big block takes milliseconds of CPU, which the event loop must not wait on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import date
from types import TracebackType

from appliance.segments.format import (
    Block,
    BlockEntry,
    Record,
    SegmentWriter,
    decode_block,
    decode_segment,
)
from appliance.storage import Storage

FLUSH_PREFIX = "segments/flush/"
HISTORY_PREFIX = "segments/history/"
PART_BYTES = 8 * 1024 * 1024  # multipart part size (S3 needs at least 5 MiB but for the last)


def flush_key(day: date, digest: str) -> str:
    return f"{FLUSH_PREFIX}{day.isoformat()}/{digest}.seg"


def history_key(period: date) -> str:
    return f"{HISTORY_PREFIX}{period.isoformat()}.seg"


async def read_block(storage: Storage, key: str, entry: BlockEntry) -> Block:
    """One block with one ranged GET, checked against the index's description of it."""
    data = await storage.get(key, entry.offset, entry.length)
    return await asyncio.to_thread(decode_block, data, key, entry.offset, entry)


async def read_segment(storage: Storage, key: str) -> list[Block]:
    """Every block of an object, with one GET."""
    data = await storage.get(key)
    return await asyncio.to_thread(decode_segment, data, key)


class StreamedSegment:
    """A segment object written to S3 while it is built: blocks are compressed in a worker
    thread and sent as multipart parts of PART_BYTES, so memory holds about one part and one
    block whatever the object's size. Used as `async with`; leaving it with an exception (or
    without `finish`) aborts the upload, so no partial object is ever visible."""

    def __init__(self, storage: Storage, key: str, part_bytes: int = PART_BYTES) -> None:
        self.storage = storage
        self.key = key
        self.part_bytes = part_bytes
        self.writer = SegmentWriter()
        self._buffer = bytearray()
        self._etags: list[str] = []
        self._upload: str | None = None
        self.finished = False

    async def __aenter__(self) -> StreamedSegment:
        self._upload = await self.storage.start_upload(self.key)
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.finished and self._upload is not None:
            try:
                await self.storage.abort_upload(self.key, self._upload)
            except Exception:
                # The error in flight says more. An upload whose abort failed stays incomplete
                # (invisible, but stored): docs/operations.md asks for a lifecycle rule.
                if kind is None:
                    raise

    async def add_block(self, conversation: str, records: Sequence[Record]) -> BlockEntry:
        data = await asyncio.to_thread(self.writer.add_block, conversation, records)
        self._buffer += data
        if len(self._buffer) >= self.part_bytes:
            await self._send()
        return self.writer.entries[-1]

    async def _send(self) -> None:
        assert self._upload is not None
        body, self._buffer = bytes(self._buffer), bytearray()
        number = len(self._etags) + 1
        self._etags.append(await self.storage.upload_part(self.key, self._upload, number, body))

    async def finish(self) -> list[BlockEntry]:
        """Complete the object; the directory of its blocks."""
        assert self._upload is not None
        self._buffer += self.writer.finish()
        await self._send()
        await self.storage.complete_upload(self.key, self._upload, self._etags)
        self.finished = True
        return self.writer.entries

    @property
    def size(self) -> int:
        return self.writer.size
