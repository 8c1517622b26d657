"""Publishing: validate, rate-limit, then one Lua script per request (see publish.lua).

A message's attachments name verified uploads of its conversation by id (appliance/attachments):
only a publish that carries some asks PostgreSQL, and the message carries each upload's recorded
name, size and content type.

The message JSON is built here except for its seq, which only the script knows: Python encodes
the head (`{"conversation":…,"seq":`) and the rest (`,"id":…}`), the script joins them around the
seq it assigns. `body` stays the client's own bytes (msgspec.Raw): validated, never re-encoded.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated, Any

import msgspec
import psycopg
import redis.asyncio as aioredis
from ulid import ULID

from appliance import metrics
from appliance.attachments import service as attachments
from appliance.auth.principal import Principal
from appliance.config.model import MessagesSection
from appliance.errors import Conflict, Invalid, RateLimited
from appliance.messages.coalesce import ScriptCoalescer
from appliance.messages.ratelimit import RateLimiter
from appliance.redis_keys import Keys
from appliance.segments import index

_IDEMPOTENCY_KEY = frozenset(range(0x21, 0x7F))
AttachmentId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}\Z")]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
Size = Annotated[int, msgspec.Meta(ge=0)]
ContentType = Annotated[
    str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.+-]+/[A-Za-z0-9_.+-]+\Z", max_length=127)
]


class Attachment(msgspec.Struct, forbid_unknown_fields=True):
    """An attachment as a message carries it: a verified upload's id and recorded metadata."""

    id: AttachmentId
    name: Name
    size: Size
    content_type: ContentType


class AttachmentRef(msgspec.Struct, forbid_unknown_fields=True):
    """An attachment as a publish names it: a verified upload of the conversation, by id. The
    other fields may be restated (the shape messages carry); each must then be the upload's."""

    id: AttachmentId
    name: Name | None = None
    size: Size | None = None
    content_type: ContentType | None = None


class MessageIn(msgspec.Struct, forbid_unknown_fields=True):
    type: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9._-]{1,32}\Z")]
    body: msgspec.Raw
    attachments: list[AttachmentRef] = []
    reply_to: Annotated[int, msgspec.Meta(ge=1)] | None = None


class BatchIn(msgspec.Struct, forbid_unknown_fields=True):
    messages: Annotated[list[MessageIn], msgspec.Meta(min_length=1)]


class _Rest(msgspec.Struct, omit_defaults=True):
    """The message after `seq`, in contract order."""

    id: str
    ts: str
    sender: str
    type: str
    body: msgspec.Raw
    attachments: list[Attachment] = []
    reply_to: int | None = None
    idempotency_key: str | None = None


class Message(msgspec.Struct):
    """A message as readers get it (history, WebSocket): the head and `_Rest` joined by the
    script. Never built on the read path (messages are passed through as stored): it documents
    them."""

    conversation: str
    seq: int
    id: str
    ts: str
    sender: str
    type: str
    body: Any
    attachments: list[Attachment] = []
    reply_to: int | None = None
    idempotency_key: str | None = None


class Ack(msgspec.Struct):
    conversation: str
    seq: int
    id: str
    ts: str


@dataclass(frozen=True)
class Published:
    acks: list[Ack]
    replayed: bool  # an Idempotency-Key repeat: the original acknowledgement


def _script(name: str) -> str:
    return resources.files("appliance.messages").joinpath(name).read_text()


def check_idempotency_key(value: str | None) -> str | None:
    if value is not None and not (
        0 < len(value) <= 255 and all(ord(c) in _IDEMPOTENCY_KEY for c in value)
    ):
        raise Invalid("must be 1-255 printable ASCII characters", field="Idempotency-Key")
    return value


def _utf8(raw: msgspec.Raw) -> bool:
    """msgspec checks the UTF-8 of the strings it decodes, not of a Raw value it passes through."""
    try:
        str(memoryview(raw), "utf-8")
    except UnicodeDecodeError:
        return False
    return True


class Publisher:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        section: MessagesSection,
        connection: Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]],
    ) -> None:
        self._redis = redis
        self._connection = connection
        self._keys = keys
        self._section = section
        self._publish = ScriptCoalescer(redis, _script("publish.lua"))
        self._limiter = RateLimiter(redis, keys, section)

    def validate(self, messages: list[MessageIn], batch: bool) -> None:
        limit = self._section
        if len(messages) > limit.max_batch:
            raise Invalid(f"at most {limit.max_batch} messages per batch", field="messages")
        for i, message in enumerate(messages):
            where = f"messages[{i}]." if batch else ""
            if len(message.body) > limit.max_body_bytes:
                raise Invalid(
                    f"encoded body exceeds {limit.max_body_bytes} bytes", field=f"{where}body"
                )
            if not _utf8(message.body):
                raise Invalid("is not valid UTF-8 (JSON text must be)", field=f"{where}body")
            if len(message.attachments) > limit.max_attachments:
                raise Invalid(
                    f"at most {limit.max_attachments} attachments", field=f"{where}attachments"
                )

    async def rate_limit(self, principal: Principal, cost: int, route: str) -> None:
        wait = await self._limiter.acquire(principal.id, cost)
        if wait:
            metrics.RATE_LIMITED.labels(route).inc()
            raise RateLimited(
                f"rate limit of {self._section.rate_per_second:g} messages/s exceeded",
                retry_after=wait,
            )

    async def publish(
        self,
        conversation: str,
        principal: Principal,
        messages: list[MessageIn],
        idempotency_key: str | None,
        raw_body: bytes,
        batch: bool,
    ) -> Published:
        now = time.time()
        ts = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
        head = b'{"conversation":' + msgspec.json.encode(conversation) + b',"seq":'
        ids = [str(ULID.from_timestamp(now)) for _ in messages]
        attached = (
            await self._attachments(conversation, messages, batch)
            if any(message.attachments for message in messages)
            else [[] for _ in messages]
        )
        args: list[Any] = []
        for message, message_id, its in zip(messages, ids, attached, strict=True):
            rest = _Rest(
                message_id,
                ts,
                principal.id,
                message.type,
                message.body,
                its,
                message.reply_to,
                idempotency_key,
            )
            args += [head, b"," + msgspec.json.encode(rest)[1:], message.reply_to or 0]
        keys = self._keys
        idem_hash = hashlib.sha256(raw_body).hexdigest() if idempotency_key else ""
        idem_key = (
            keys.idempotency(conversation, principal.id, idempotency_key)
            if idempotency_key
            else keys.seq(conversation)  # unused, but keeps every key in the same slot
        )
        meta = msgspec.json.encode([ts, ids])
        script_keys = [
            keys.seq(conversation),
            keys.tail(conversation),
            keys.ingest_of(conversation),
            idem_key,
        ]
        fixed: list[Any] = [
            conversation,
            keys.channel(conversation),
            len(messages),
            idem_hash,
            int(self._section.idempotency_window * 1000),
            meta,
        ]
        result = await self._publish(keys=script_keys, args=[*fixed, -1, *args])
        if result[0] == b"seed":
            # Neither counter nor tail: a new conversation, or Redis lost its data. Seqs go on
            # after what PostgreSQL has indexed (an outage there is a 503: no guessing).
            async with self._connection() as conn:
                durable = await index.durable_head(conn, conversation)
            result = await self._publish(keys=script_keys, args=[*fixed, durable, *args])
        outcome = result[0].decode()
        if outcome == "ok":
            first = int(result[1])
            return Published(_acks(conversation, first, ts, ids), replayed=False)
        if outcome == "dup":
            stored = result[1][64:]
            first_text, _, stored_meta = stored.partition(b"\n")
            ts, ids = msgspec.json.decode(stored_meta, type=tuple[str, list[str]])
            return Published(_acks(conversation, int(first_text), ts, ids), replayed=True)
        if outcome == "conflict":
            raise Conflict(
                "this Idempotency-Key was used with a different body", field="Idempotency-Key"
            )
        at, current = int(result[1]) - 1, int(result[2])
        raise Invalid(
            f"must be an existing seq of this conversation (at most {current})",
            field=f"messages[{at}].reply_to" if batch else "reply_to",
        )

    async def _attachments(
        self, conversation: str, messages: list[MessageIn], batch: bool
    ) -> list[list[Attachment]]:
        """Each message's attachments as stored uploads: 400 naming the reference for an id
        that is no upload of this conversation (another's included: ids reveal nothing), 409
        for one not verified (pending or rejected). PostgreSQL down: 503."""
        ids = sorted({ref.id for message in messages for ref in message.attachments})
        async with self._connection() as conn:
            found = await attachments.of_conversation(conn, conversation, ids)
        resolved: list[list[Attachment]] = []
        for i, message in enumerate(messages):
            where = f"messages[{i}].attachments" if batch else "attachments"
            these: list[Attachment] = []
            for j, ref in enumerate(message.attachments):
                field = f"{where}[{j}]"
                row = found.get(ref.id)
                if row is None:
                    raise Invalid(f"no attachment {ref.id} in this conversation", field=field)
                if any(a.id == ref.id for a in these):
                    raise Invalid(f"attachment {ref.id} is already in this message", field=field)
                attachments.require_verified(row, field)
                stored = Attachment(row.id, row.filename, row.size, row.content_type)
                these.append(_restated(stored, ref, field))
            resolved.append(these)
        return resolved


def _restated(stored: Attachment, ref: AttachmentRef, field: str) -> Attachment:
    """`stored`, unless `ref` restates a field differently: Invalid naming it."""
    for name in ("name", "size", "content_type"):
        given, actual = getattr(ref, name), getattr(stored, name)
        if name == "content_type" and given is not None:
            given = given.lower()  # stored lower case; types are case-insensitive
        if given is not None and given != actual:
            raise Invalid(
                f"must be the upload's own, {actual!r}, or left out", field=f"{field}.{name}"
            )
    return stored


def _acks(conversation: str, first: int, ts: str, ids: list[str]) -> list[Ack]:
    return [Ack(conversation, first + i, message_id, ts) for i, message_id in enumerate(ids)]
