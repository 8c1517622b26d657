"""S3 facade: every boto3 call runs in a worker thread, never on the event loop.

Honours `endpoint_url` (any S3 API), region, path-style addressing, and either static keys or
boto3's default credential chain (IAM roles, env, profiles) when no keys are configured.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from appliance import metrics
from appliance.config.model import S3Section
from appliance.errors import Unavailable

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


# S3's answers that are not failures of S3 (asked for something that is not there, or on a
# condition that no longer holds).
_ANSWERS = frozenset(
    {
        "404",
        "NoSuchKey",
        "NotFound",
        "NoSuchBucket",
        "BucketAlreadyOwnedByYou",
        "PreconditionFailed",
    }
)


@dataclass(frozen=True)
class Head:
    """What HEAD says of an object."""

    size: int
    content_type: str
    etag: str


@dataclass(frozen=True)
class PresignedPost:
    """A browser form upload: POST multipart/form-data to `url` with `fields` first, then the
    file as the last field, named `file`."""

    url: str
    fields: dict[str, str]


class StorageError(Unavailable):
    code = "storage"

    def __init__(self, operation: str, detail: str, s3_code: str = "") -> None:
        super().__init__(f"S3 {operation} failed: {detail}")
        self.operation = operation
        self.s3_code = s3_code


@dataclass
class Storage:
    section: S3Section
    s3: S3Client

    @classmethod
    def create(cls, section: S3Section) -> Storage:
        config = BotoConfig(
            region_name=section.region,
            # Presigned URLs and POST policies too: botocore presigns with SigV2 unless told,
            # which regions opened since 2014 (and R2) refuse.
            signature_version="s3v4",
            connect_timeout=section.timeout,
            read_timeout=section.timeout,
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path" if section.path_style else "auto"},
        )
        kwargs: dict[str, Any] = {"config": config}
        if section.endpoint_url:
            kwargs["endpoint_url"] = section.endpoint_url
        if section.access_key_id and section.secret_access_key is not None:
            kwargs["aws_access_key_id"] = section.access_key_id
            kwargs["aws_secret_access_key"] = section.secret_access_key.get_secret_value()
        # A private session: boto3's default session is shared module state.
        return cls(section, boto3.session.Session().client("s3", **kwargs))

    @property
    def bucket(self) -> str:
        return self.section.bucket

    async def _call(self, operation: str, fn: Any, **kwargs: Any) -> Any:
        """Run one boto3 call in a thread; its errors become StorageError carrying S3's code."""
        try:
            return await asyncio.to_thread(fn, **kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code not in _ANSWERS:
                metrics.S3_ERRORS.labels(operation).inc()
            raise StorageError(operation, code or str(exc), code) from exc
        except BotoCoreError as exc:
            metrics.S3_ERRORS.labels(operation).inc()
            raise StorageError(operation, str(exc)) from exc

    async def bucket_exists(self) -> bool:
        try:
            await self._call("head_bucket", self.s3.head_bucket, Bucket=self.bucket)
        except StorageError as exc:
            if exc.s3_code in {"404", "NoSuchBucket", "NotFound"}:
                return False
            raise
        return True

    async def create_bucket(self) -> None:
        """Create the bucket; another container having just created it counts as success."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.section.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.section.region}
        try:
            await self._call("create_bucket", self.s3.create_bucket, **kwargs)
        except StorageError as exc:
            if exc.s3_code != "BucketAlreadyOwnedByYou":
                raise

    async def put(
        self, key: str, body: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        await self._call(
            "put_object",
            self.s3.put_object,
            Bucket=self.bucket,
            Key=key,
            Body=body,
            ContentType=content_type,
        )

    async def get(self, key: str, start: int | None = None, length: int | None = None) -> bytes:
        """The object, or `length` bytes of it from `start` with one ranged GET."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if start is not None:
            end = "" if length is None else str(start + length - 1)
            kwargs["Range"] = f"bytes={start}-{end}"
        response = await self._call("get_object", self.s3.get_object, **kwargs)
        body: bytes = await asyncio.to_thread(response["Body"].read)
        return body

    async def copy(self, source: str, target: str, if_match: str | None = None) -> None:
        """Copy `source` to `target` inside the bucket, Content-Type and all, with one CopyObject
        (S3 copies at most 5 GiB so). With `if_match`, S3 refuses (StorageError, s3_code
        PreconditionFailed) if the source's ETag is no longer that one."""
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": target,
            "CopySource": {"Bucket": self.bucket, "Key": source},
        }
        if if_match is not None:
            kwargs["CopySourceIfMatch"] = if_match
        await self._call("copy_object", self.s3.copy_object, **kwargs)

    async def delete(self, key: str) -> None:
        await self._call("delete_object", self.s3.delete_object, Bucket=self.bucket, Key=key)

    async def delete_many(self, keys: list[str]) -> int:
        """Delete `keys` with batch deletes (1,000 a request); a missing key counts as deleted.
        The number deleted; a key S3 refused raises StorageError."""
        done = 0
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            response = await self._call(
                "delete_objects",
                self.s3.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True},
            )
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    "delete_objects",
                    f"{len(errors)} keys not deleted, first {first.get('Key')}: "
                    f"{first.get('Code')}",
                    str(first.get("Code", "")),
                )
            done += len(chunk)
        return done

    async def list_keys(self, prefix: str) -> list[tuple[str, int]]:
        """(key, size) of every object under `prefix`."""
        found: list[tuple[str, int]] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        while True:
            response = await self._call("list_objects_v2", self.s3.list_objects_v2, **kwargs)
            found += [(o["Key"], int(o["Size"])) for o in response.get("Contents", [])]
            if not response.get("IsTruncated"):
                return found
            kwargs["ContinuationToken"] = response["NextContinuationToken"]

    async def size(self, key: str) -> int | None:
        """The object's size, or None when there is no such object."""
        head = await self.head(key)
        return None if head is None else head.size

    async def head(self, key: str) -> Head | None:
        """The object's size, content type and ETag, or None when there is no such object."""
        try:
            response = await self._call(
                "head_object", self.s3.head_object, Bucket=self.bucket, Key=key
            )
        except StorageError as exc:
            if exc.s3_code in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise
        return Head(
            int(response["ContentLength"]),
            str(response.get("ContentType", "")),
            str(response.get("ETag", "")),
        )

    async def start_upload(self, key: str) -> str:
        """A multipart upload of `key`; its upload id."""
        response = await self._call(
            "create_multipart_upload",
            self.s3.create_multipart_upload,
            Bucket=self.bucket,
            Key=key,
            ContentType="application/octet-stream",
        )
        return str(response["UploadId"])

    async def upload_part(self, key: str, upload_id: str, number: int, body: bytes) -> str:
        """Part `number` (from 1; all but the last at least 5 MiB); its ETag."""
        response = await self._call(
            "upload_part",
            self.s3.upload_part,
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=body,
        )
        return str(response["ETag"])

    async def complete_upload(self, key: str, upload_id: str, etags: list[str]) -> None:
        parts = [{"PartNumber": i + 1, "ETag": etag} for i, etag in enumerate(etags)]
        await self._call(
            "complete_multipart_upload",
            self.s3.complete_multipart_upload,
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )

    async def abort_upload(self, key: str, upload_id: str) -> None:
        await self._call(
            "abort_multipart_upload",
            self.s3.abort_multipart_upload,
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
        )

    async def presign_get(
        self, key: str, expires: int = 3600, disposition: str | None = None
    ) -> str:
        """A GET link valid `expires` seconds; S3 answers it with `disposition` as the
        Content-Disposition header when given."""
        params = {"Bucket": self.bucket, "Key": key}
        if disposition is not None:
            params["ResponseContentDisposition"] = disposition
        url: str = await self._call(
            "presign",
            self.s3.generate_presigned_url,
            ClientMethod="get_object",
            Params=params,
            ExpiresIn=expires,
        )
        return url

    async def presign_post(
        self, key: str, content_type: str, size: int, expires: int
    ) -> PresignedPost:
        """A form upload of `key` valid `expires` seconds, whose policy makes S3 refuse any
        other key, any Content-Type but `content_type` and any length but exactly `size`."""
        response = await self._call(
            "presign",
            self.s3.generate_presigned_post,
            Bucket=self.bucket,
            Key=key,
            Fields={"Content-Type": content_type},
            Conditions=[{"Content-Type": content_type}, ["content-length-range", size, size]],
            ExpiresIn=expires,
        )
        return PresignedPost(
            str(response["url"]), {k: str(v) for k, v in response["fields"].items()}
        )

    async def check_write(self) -> None:
        """Prove write, read and delete access with a throwaway object."""
        key = f"_appliance/probe/{uuid.uuid4().hex}"
        payload = b"appliance write probe"
        await self.put(key, payload, "text/plain")
        if await self.get(key) != payload:
            raise StorageError("get_object", "probe object read back different bytes")
        await self.delete(key)

    async def init(self) -> bool:
        """`storage init`: create the bucket when allowed and missing; True if it was created."""
        created = False
        if not await self.bucket_exists():
            if not self.section.create_bucket:
                raise StorageError(
                    "head_bucket",
                    f"bucket {self.bucket} does not exist and s3.create_bucket is false",
                )
            await self.create_bucket()
            created = True
        await self.check_write()
        return created
