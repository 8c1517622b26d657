"""JSON responses encoded with msgspec (bytes pass straight through)."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Response


def json_response(content: Any, status: int = 200) -> Response[bytes]:
    body = content if isinstance(content, bytes) else msgspec.json.encode(content)
    return Response(body, status_code=status, media_type="application/json")
