"""A real worker process (as `appliance run worker` runs it) that also serves test entrypoints.

    APPLIANCE_CONFIG=c.toml python -m tests.job_worker

Each test handler first appends `"<pid> <time.time()>"` to the Redis list named in its payload,
so a test sees which process started which attempt and when:
- `test.hang` then sleeps (the test kills its worker with SIGKILL);
- `test.die` then kills its own worker at once (`os._exit`), as a crashing native library would;
  it gets 2 attempts.
"""

from __future__ import annotations

import asyncio
import os
import time

from appliance import jobs, logs, queue
from appliance.config import load_config
from appliance.programs.runner import supervise
from appliance.programs.worker import run_worker
from appliance.resources import Resources

DIE_ATTEMPTS = 2


async def _record(res: Resources, payload: bytes) -> None:
    await res.redis.rpush(payload.decode(), f"{os.getpid()} {time.time()!r}")


async def hang(res: Resources, payload: bytes) -> None:
    await _record(res, payload)
    await asyncio.sleep(3600)


async def die(res: Resources, payload: bytes) -> None:
    await _record(res, payload)
    os._exit(3)


def main() -> None:
    jobs.ENTRYPOINTS["test.hang"] = hang
    jobs.ENTRYPOINTS["test.die"] = jobs.Entrypoint(die, max_attempts=DIE_ATTEMPTS)
    queue.NAMES = (*queue.NAMES, "test.hang", "test.die")  # a job cut off at drain is re-queued
    config = load_config()
    logs.configure("worker", config.appliance.log_level, config.appliance.log_format)
    asyncio.run(supervise("worker", config, run_worker))


if __name__ == "__main__":
    main()
