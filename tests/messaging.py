"""Helpers for the messaging tests: keys issued straight through the keys module, auth headers,
and an in-process client on the full app (real PostgreSQL, Redis and S3 underneath)."""

from __future__ import annotations

import uuid
from typing import Any

from appliance.auth import keys
from appliance.resources import Resources


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def issue_key(
    res: Resources, scopes: list[str], prefix: str | None = None, name: str | None = None
) -> str:
    async with res.connection() as conn:
        issued = await keys.create(
            conn,
            keys.KeyCreate(
                name=name or unique("key"),
                scopes=scopes,
                conversation_prefix=prefix,  # type: ignore[arg-type]
            ),
        )
    return issued.key


def bearer(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


def body(**fields: Any) -> dict[str, Any]:
    return {"type": "text", "body": {"text": "hi"}, **fields}
