"""The S3 facade against a real S3 API (moto server): init, objects, ranges, errors."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import pytest

from appliance.config.model import S3Section
from appliance.storage import Storage, StorageError
from tests.support import free_port


def section(settings: dict[str, Any], **overrides: Any) -> S3Section:
    return S3Section.model_validate({**settings["s3"], **overrides})


async def test_init_creates_bucket_then_finds_it(settings: dict[str, Any]) -> None:
    storage = Storage.create(section(settings, bucket=f"init-{uuid.uuid4().hex[:12]}"))
    assert await storage.bucket_exists() is False
    assert await storage.init() is True
    assert await storage.bucket_exists() is True
    assert await storage.init() is False


async def test_init_refuses_to_create_when_not_allowed(settings: dict[str, Any]) -> None:
    storage = Storage.create(
        section(settings, bucket=f"nocreate-{uuid.uuid4().hex[:12]}", create_bucket=False)
    )
    with pytest.raises(StorageError, match="create_bucket is false"):
        await storage.init()


async def test_put_get_range_delete(settings: dict[str, Any]) -> None:
    storage = Storage.create(section(settings))
    await storage.init()
    body = bytes(range(256)) * 4
    await storage.put("seg/one", body)
    assert await storage.get("seg/one") == body
    assert await storage.get("seg/one", start=10, length=5) == body[10:15]
    assert await storage.get("seg/one", start=1000) == body[1000:]
    url = await storage.presign_get("seg/one", expires=60)
    assert url.startswith(settings["s3"]["endpoint_url"])
    assert "Signature" in url
    await storage.delete("seg/one")
    with pytest.raises(StorageError) as info:
        await storage.get("seg/one")
    assert info.value.operation == "get_object"
    assert "NoSuchKey" in info.value.message


async def test_path_style_addressing_puts_bucket_in_path(settings: dict[str, Any]) -> None:
    storage = Storage.create(section(settings))
    url = await storage.presign_get("k")
    assert f"/{settings['s3']['bucket']}/k" in url


async def test_calls_do_not_block_the_event_loop(settings: dict[str, Any]) -> None:
    """While boto3 waits on a slow server, other coroutines keep running."""
    import socket

    port = free_port()
    listener = socket.socket()
    listener.bind(("127.0.0.1", port))
    listener.listen()
    accepted: list[socket.socket] = []

    def accept() -> None:
        # Accept and say nothing: boto3 waits for its read timeout.
        try:
            conn, _ = listener.accept()
            accepted.append(conn)
        except OSError:
            return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    storage = Storage.create(
        section(settings, endpoint_url=f"http://127.0.0.1:{port}", timeout=1.0)
    )
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.05)

    task = asyncio.create_task(ticker())
    started = time.monotonic()
    try:
        with pytest.raises(StorageError):
            await storage.bucket_exists()
    finally:
        task.cancel()
        listener.close()
        for conn in accepted:
            conn.close()
        thread.join(5)
    elapsed = time.monotonic() - started
    assert elapsed >= 0.9
    assert ticks >= 5, "the event loop was blocked during the S3 call"


async def test_unreachable_endpoint_raises_storage_error(settings: dict[str, Any]) -> None:
    storage = Storage.create(
        section(settings, endpoint_url=f"http://127.0.0.1:{free_port()}", timeout=1.0)
    )
    with pytest.raises(StorageError) as info:
        await storage.init()
    assert info.value.operation == "head_bucket"


async def test_concurrent_init_from_two_containers_both_succeed(settings: dict[str, Any]) -> None:
    """Outside us-east-1, the slower CreateBucket gets BucketAlreadyOwnedByYou: still fine."""
    bucket = f"race-{uuid.uuid4().hex[:12]}"
    first, second = (
        Storage.create(section(settings, bucket=bucket, region="eu-west-1")) for _ in range(2)
    )
    await first.create_bucket()
    await second.create_bucket()  # what the container that lost the race does
    results = await asyncio.gather(first.init(), second.init())
    assert results == [False, False]
