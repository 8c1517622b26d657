"""What every long-running program shares: signals, resources, heartbeat, bounded drain.

SIGTERM or SIGINT sets the stop event; the program's body then has `[appliance] stop_timeout`
seconds to finish in-flight work before it is cancelled, so supervisord's `stopwaitsecs` (set
above that) never has to SIGKILL a healthy program.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from appliance import metrics
from appliance.config import Config, Program
from appliance.heartbeat import start_heartbeat
from appliance.resources import Resources, open_resources

log = structlog.get_logger()

Body = Callable[[Resources, asyncio.Event], Coroutine[Any, Any, None]]


async def supervise(program: Program, config: Config, body: Body) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("program_starting", program=program, instance=config.appliance.instance)
    try:
        async with open_resources(config, program) as res:
            beats = await start_heartbeat(
                res.redis,
                res.keys,
                program,
                config.appliance.instance,
                config.appliance.heartbeat_interval,
                stop,
            )
            work = asyncio.create_task(body(res, stop))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({work, stopper}, return_when="FIRST_COMPLETED")
            stop.set()
            started = loop.time()
            try:
                await asyncio.wait_for(work, timeout=config.appliance.stop_timeout)
            except TimeoutError:
                log.error("drain_timeout", program=program, seconds=config.appliance.stop_timeout)
            finally:
                await beats
            log.info(
                "program_stopped", program=program, drain_seconds=round(loop.time() - started, 3)
            )
    finally:
        metrics.process_exited()
