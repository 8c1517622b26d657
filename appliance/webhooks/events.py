"""The events the appliance emits to webhook endpoints: one typed struct, the same on the wire.

An event's `id` is a ULID that stays the same across retries and batches, so a receiver
deduplicates on it; `created` is RFC 3339 in UTC. `data` carries the type's own fields (see
docs/api.md, "Webhooks") as encoded JSON (`msgspec.Raw`): a message event's data is the stored
message's bytes, carried from the ingest stream to the receiver without being decoded.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal, get_args

import msgspec
from ulid import ULID

EventType = Literal[
    "message.created",
    "conversation.created",
    "conversation.updated",
    "conversation.deleted",
    "member.added",
    "member.removed",
    "export.ready",
]
EVENT_TYPES: tuple[EventType, ...] = get_args(EventType)
SIZE_OVERHEAD = 96  # {"id":"","type":"conversation.updated","created":"","conversation":"","data":}


class Event(msgspec.Struct, forbid_unknown_fields=True):
    id: str  # ULID; receivers deduplicate on it
    type: EventType
    created: str  # RFC 3339, UTC, e.g. 2026-12-06T11:22:49.123Z
    conversation: str | None
    data: msgspec.Raw  # a JSON object

    def size(self) -> int:
        """Bytes of this event as JSON, about (the fixed fields' names and punctuation fit in
        `SIZE_OVERHEAD`)."""
        return (
            SIZE_OVERHEAD
            + len(self.id)
            + len(self.created)
            + len(self.conversation or "")
            + len(self.data)
        )


def rfc3339(at: datetime) -> str:
    """`at` in UTC with milliseconds and a Z (the form of `Event.created`)."""
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event(
    type: EventType,
    data: dict[str, Any],
    *,
    conversation: str | None = None,
    at: datetime | None = None,
) -> Event:
    """A new event with a fresh ULID, created `at` (default now)."""
    when = at or datetime.now(UTC)
    return Event(
        id=str(ULID.from_datetime(when)),
        type=type,
        created=rfc3339(when),
        conversation=conversation,
        data=msgspec.Raw(msgspec.json.encode(data)),
    )
