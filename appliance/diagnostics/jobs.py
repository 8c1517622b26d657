"""`diagnostics.ping`: the worker answers a token through Redis, proving the job round trip."""

from __future__ import annotations

import json
import os

from appliance.resources import Resources

PING = "diagnostics.ping"
RESULT_TTL = 300


async def ping(res: Resources, payload: bytes) -> None:
    token = json.loads(payload)["token"]
    answer = json.dumps({"pid": os.getpid(), "instance": res.config.appliance.instance})
    await res.redis.set(res.keys.ping_result(token), answer, ex=RESULT_TTL)
