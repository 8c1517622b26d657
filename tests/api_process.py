"""A real api process (`appliance run api`, i.e. granian with the app) for socket-level tests.

Each process gets its own TOML, port, run_dir (so its metrics files are its own) and instance,
and runs in a session of its own: SIGTERM to its process group stops granian and its workers,
SIGKILL follows if they linger.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from appliance.auth import keys
from appliance.config import Config
from appliance.resources import open_resources
from tests.support import free_port, write_toml

ROOT = Path(__file__).resolve().parent.parent
APPLIANCE = ROOT / ".venv" / "bin" / "appliance"
if not APPLIANCE.exists():  # a venv elsewhere: the one running the tests
    APPLIANCE = Path(sys.executable).parent / "appliance"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


def api_settings(
    base: dict[str, Any], directory: Path, **sections: dict[str, Any]
) -> dict[str, Any]:
    """`base` (a copy the caller owns) made into an api-only process config in `directory`.

    Rate limits are lifted so tests can publish as fast as they like; `sections` are merged in.
    """
    appliance = base.setdefault("appliance", {})
    appliance["roles"] = ["api"]
    appliance["run_dir"] = str(directory / "run")
    appliance["instance"] = f"stream-{uuid.uuid4().hex[:8]}"
    base["api"] = {"port": free_port(), "bind": "127.0.0.1", **base.get("api", {})}
    base["messages"] = {"rate_per_second": 1_000_000.0, "rate_burst": 1_000_000}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return base


def process_env(config_path: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("APPLIANCE_", "GRANIAN_")) and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env["APPLIANCE_CONFIG"] = str(config_path)
    return env


class ApiProcess:
    """`appliance run api` with `settings`; `start()` returns once `/livez` answers."""

    def __init__(self, directory: Path, settings: dict[str, Any]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.port: int = settings["api"]["port"]
        self.config_path = write_toml(directory / "config.toml", settings)
        self.log_path = directory / "api.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    def log(self, lines: int = 80) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> ApiProcess:
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(APPLIANCE), "run", "api"],
                cwd=ROOT,
                env=process_env(self.config_path),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._live():
            if self.proc.poll() is not None:
                raise AssertionError(f"api exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"api not live after {START_TIMEOUT}s:\n{self.log()}")
            time.sleep(0.1)
        return self

    @contextlib.contextmanager
    def running(self) -> Iterator[ApiProcess]:
        """Started for the block and stopped after it; its log is printed then (pytest shows
        it for a failed test)."""
        self.start()
        try:
            yield self
        finally:
            self.stop()
            print(self.log())

    def _live(self) -> bool:
        try:
            return httpx.get(f"{self.url}/livez", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """SIGTERM the process group (granian and its workers), SIGKILL it if it lingers."""
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        # Workers that outlived granian's main process share its process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def admin_key(settings: dict[str, Any]) -> str:
    """A fresh admin key in the database of `settings`, made without any api process."""

    async def make() -> str:
        config = Config.model_validate(settings)
        async with open_resources(config, "test") as res, res.connection() as conn:
            issued = await keys.create(
                conn, keys.KeyCreate(name=f"admin-{uuid.uuid4().hex[:8]}", scopes=["admin"])
            )
        return issued.key

    return asyncio.run(make())
