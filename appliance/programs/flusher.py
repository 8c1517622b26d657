"""The flusher program: a thin loop around `segments.flush.Flusher` (the rules live there)."""

from __future__ import annotations

import asyncio

import structlog

from appliance.resources import Resources
from appliance.segments.flush import Flusher

log = structlog.get_logger()


async def run_flusher(res: Resources, stop: asyncio.Event) -> None:
    """Until `stop`, then drain and release the leases. A `[segments] shards` that differs from
    the history's raises ConfigError (the program exits 1 naming `segments.shards`)."""
    flusher = Flusher(res)
    log.info("flusher_ready", shards=res.config.segments.shards, owner=flusher.owner)
    await flusher.run(stop)
