"""What a schedule is: a name, its config section, a run function, and the `Run` it is given.

A run function takes the program's resources and a `Run`: `dry_run` asks it to count what it
would do and change nothing (`appliance retention run --dry-run`), and `progress(done, total)`
reports how far it is (a progress bar on a terminal; `total` is None while unknown).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from appliance.config import Config
from appliance.config.model import Schedule
from appliance.resources import Resources

Counts = dict[str, int]
Progress = Callable[[int, int | None], None]


def _no_progress(done: int, total: int | None) -> None:
    return None


@dataclass(frozen=True)
class Run:
    dry_run: bool = False
    progress: Progress = _no_progress


@dataclass(frozen=True)
class Entry:
    name: str
    settings: Callable[[Config], Schedule]
    run: Callable[[Resources, Run], Awaitable[Counts]]
    retention: bool = False
