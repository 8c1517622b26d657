"""The entrypoint registry the worker serves (enqueueing is appliance/queue.py, a leaf).

Feature modules own their handlers (`appliance/<feature>/jobs.py`) and are listed in `ENTRYPOINTS`,
either as a bare handler (which gets `[worker] max_attempts`) or as an `Entrypoint` carrying its
own attempt limit; the worker wraps each with a timeout, attempt counting, metrics and log context.
Only the worker (and tools that list entrypoints) import this module: it imports every feature.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from appliance.attachments import jobs as attachments
from appliance.backups import jobs as backups
from appliance.config import Config
from appliance.diagnostics import jobs as diagnostics
from appliance.exports import jobs as export_jobs
from appliance.exports import service as exports
from appliance.resources import Resources
from appliance.webhooks import jobs as webhooks

Handler = Callable[[Resources, bytes], Awaitable[None]]


@dataclass(frozen=True)
class Entrypoint:
    """A handler and how many attempts it gets before its job is parked as failed: a number, a
    function of the config (e.g. `lambda c: c.webhooks.max_attempts`), or None for the
    `[worker] max_attempts` default."""

    handler: Handler
    max_attempts: int | Callable[[Config], int] | None = None

    def attempts_allowed(self, config: Config) -> int:
        limit = self.max_attempts
        if limit is None:
            return config.worker.max_attempts
        return max(1, limit(config) if callable(limit) else limit)


ENTRYPOINTS: dict[str, Handler | Entrypoint] = {
    diagnostics.PING: Entrypoint(diagnostics.ping, max_attempts=1),
    diagnostics.NOOP: diagnostics.noop,
    attachments.VERIFY: attachments.verify,
    backups.RUN: backups.run,
    exports.RUN: Entrypoint(export_jobs.run, max_attempts=export_jobs.MAX_ATTEMPTS + 1),
    webhooks.DELIVER: webhooks.deliver,  # keeps its own attempts ([webhooks] max_attempts)
}


def entrypoint(name: str) -> Entrypoint:
    """The registry entry for `name` as an `Entrypoint` (a bare handler gets the default limit)."""
    entry = ENTRYPOINTS[name]
    return entry if isinstance(entry, Entrypoint) else Entrypoint(entry)
