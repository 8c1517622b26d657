"""The api program: granian serving `create_app`, its flags built from the TOML alone."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from appliance import logs
from appliance.config import Config


def granian_argv(config: Config, log_config: Path) -> list[str]:
    api = config.api
    return [
        sys.executable, "-m", "granian",
        "--interface", "asgi",
        "--factory", "appliance.api.app:create_app",
        "--host", api.bind,
        "--port", str(api.port),
        "--workers", str(api.workers),
        "--workers-kill-timeout", str(int(config.appliance.stop_timeout)),
        "--respawn-failed-workers",
        "--no-access-log",  # the app logs each request itself, with route and request id
        "--log-level", config.appliance.log_level,
        "--log-config", str(log_config),
    ]  # fmt: skip


def granian_env(environ: dict[str, str]) -> dict[str, str]:
    """granian also reads GRANIAN_* variables; drop them so the TOML stays the one source."""
    return {k: v for k, v in environ.items() if not k.startswith("GRANIAN_")}


def exec_api(config: Config) -> None:
    """Replace this process with granian (so supervisord signals granian directly)."""
    run_dir = Path(config.appliance.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_config = run_dir / "granian-logging.json"
    log_config.write_text(
        json.dumps(
            logs.stdlib_config("api", config.appliance.log_level, config.appliance.log_format)
        )
    )
    argv = granian_argv(config, log_config)
    os.execve(sys.executable, argv, granian_env(dict(os.environ)))
