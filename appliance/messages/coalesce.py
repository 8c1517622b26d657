"""One Lua script run for many concurrent callers in one pipelined Redis round trip.

While a pipeline is out, the calls that arrive queue up and leave together in the next one, so
under load the round trip (and most of redis-py's per-command work) is paid once per batch, while
a call on an idle process leaves at once, from its own task. Redis runs each script atomically
and in the order sent, so a batch does exactly what the same scripts sent one by one would.

Nothing is resent after an error: a script whose reply was lost may have run. Each caller gets the
error (the api answers 503) and decides. Only NOSCRIPT (the server's script cache was emptied,
e.g. by a restart) is retried, after loading the script: a NOSCRIPT reply means it did not run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

_Call = tuple[Sequence[Any], Sequence[Any], "asyncio.Future[Any]"]


class ScriptCoalescer:
    def __init__(self, redis: aioredis.Redis, script: str) -> None:
        self._redis = redis
        self._script = redis.register_script(script)  # its sha, and its text for SCRIPT LOAD
        self._queue: list[_Call] = []  # calls waiting for the pipeline that is out
        self._busy = False  # a pipeline is out
        self._sender: asyncio.Task[None] | None = None  # sends what queued meanwhile

    async def __call__(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """The script's reply for these keys and args, or the error that its pipeline met."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        call = (keys, args, future)
        if self._busy:
            self._queue.append(call)
            return await future
        self._busy = True
        try:
            await self._send([call])
        finally:
            self._then()
        return future.result()

    def _then(self) -> None:
        """After a pipeline: what queued meanwhile leaves as the next one, from a task."""
        if self._queue:
            self._sender = asyncio.create_task(self._send_queued(), name="publish-pipeline")
        else:
            self._busy = False

    async def _send_queued(self) -> None:
        try:
            while self._queue:
                # A caller that stopped waiting before its batch left is not sent at all.
                batch = [call for call in self._queue if not call[2].done()]
                self._queue = []
                if batch:
                    try:
                        await self._send(batch)
                    except BaseException:
                        _fail(batch, RedisConnectionError("the api is shutting down"))
                        raise
        finally:
            self._busy = False
            self._sender = None
            # Only a cancelled sender leaves calls behind (the event loop is shutting down).
            batch, self._queue = self._queue, []
            _fail(batch, RedisConnectionError("the api is shutting down"))

    async def _send(self, batch: list[_Call]) -> None:
        replies = await self._replies(batch)
        for (_, _, future), reply in zip(batch, replies, strict=True):
            if future.done():  # the caller stopped waiting while its script was out: it ran
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _replies(self, batch: list[_Call]) -> list[Any]:
        """One reply per call: the script's, its error reply, or the error its pipeline met."""
        replies = await self._attempt(batch)
        unsent = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if unsent:
            try:
                await self._redis.script_load(self._script.script)
            except Exception as exc:
                resent: list[Any] = [exc] * len(unsent)
            else:
                resent = await self._attempt([batch[i] for i in unsent])
            for i, reply in zip(unsent, resent, strict=True):
                replies[i] = reply
        return replies

    async def _attempt(self, batch: list[_Call]) -> list[Any]:
        """One pipeline. A connection lost on the way is every call's error: which scripts ran
        is unknown, as for calls on separate connections when Redis goes away."""
        pipe = self._redis.pipeline(transaction=False)
        for keys, args, _ in batch:
            pipe.evalsha(self._script.sha, len(keys), *keys, *args)
        try:
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            return [exc] * len(batch)
        return replies


def _fail(batch: list[_Call], exc: BaseException) -> None:
    for _, _, future in batch:
        if not future.done():
            future.set_exception(exc)
