"""A multipart upload fed as output is produced: parts of `part_bytes` go up as the buffer
fills, so memory holds about one part whatever the object's size (exports, backups).

S3 wants at least 5 MiB in every part but the last. An upload that is neither completed nor
aborted leaves no object, only parts S3 keeps (and bills) until a lifecycle rule removes them:
callers abort on failure, and a run after a crash aborts the one it finds recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.storage import Storage, StorageError

PART_BYTES = 8 * 1_048_576  # the one part size: every caller takes it from here


@dataclass
class Upload:
    storage: Storage
    key: str
    upload_id: str
    part_bytes: int
    pending: bytearray = field(default_factory=bytearray)
    etags: list[str] = field(default_factory=list)
    size: int = 0  # bytes written so far

    @classmethod
    async def start(cls, storage: Storage, key: str) -> Upload:
        return cls(storage, key, await storage.start_upload(key), PART_BYTES)

    async def write(self, data: bytes) -> None:
        self.pending += data
        self.size += len(data)
        while len(self.pending) >= self.part_bytes:
            await self._part(bytes(self.pending[: self.part_bytes]))
            del self.pending[: self.part_bytes]

    async def complete(self) -> None:
        """Send what is pending as the last part (an empty object is one empty part) and make
        the object."""
        if self.pending or not self.etags:
            await self._part(bytes(self.pending))
            self.pending.clear()
        await self.storage.complete_upload(self.key, self.upload_id, self.etags)

    async def abort(self) -> None:
        await abort(self.storage, self.key, self.upload_id)

    async def _part(self, body: bytes) -> None:
        number = len(self.etags) + 1
        self.etags.append(await self.storage.upload_part(self.key, self.upload_id, number, body))


async def abort(storage: Storage, key: str, upload_id: str) -> None:
    """Abort an upload; one already gone (completed or aborted) is fine."""
    try:
        await storage.abort_upload(key, upload_id)
    except StorageError as exc:
        if exc.s3_code != "NoSuchUpload":
            raise
