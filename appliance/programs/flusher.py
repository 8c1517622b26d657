"""The flusher: connected and heartbeating; segment flushing arrives with the history issue."""

from __future__ import annotations

import asyncio

import structlog

from appliance.resources import Resources

log = structlog.get_logger()


async def run_flusher(res: Resources, stop: asyncio.Event) -> None:
    shards = res.config.segments.shards
    log.info("flusher_ready", shards=shards)
    await stop.wait()
