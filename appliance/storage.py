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

from appliance.config.model import S3Section
from appliance.errors import Unavailable

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


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
            raise StorageError(operation, code or str(exc), code) from exc
        except BotoCoreError as exc:
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

    async def delete(self, key: str) -> None:
        await self._call("delete_object", self.s3.delete_object, Bucket=self.bucket, Key=key)

    async def presign_get(self, key: str, expires: int = 3600) -> str:
        url: str = await self._call(
            "presign",
            self.s3.generate_presigned_url,
            ClientMethod="get_object",
            Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=expires,
        )
        return url

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
