"""Test helpers: TOML writing for generated configs, free ports, waiting on conditions."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_text(tree: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for config files: tables of scalars and lists, nested tables."""
    lines = []
    scalars = {k: v for k, v in tree.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in tree.items() if isinstance(v, dict)}
    if prefix and scalars:
        lines.append(f"[{prefix}]")
    lines += [f"{k} = {_value(v)}" for k, v in scalars.items()]
    for key, sub in tables.items():
        lines.append(toml_text(sub, f"{prefix}.{key}" if prefix else key))
    return "\n".join(lines) + "\n"


def write_toml(path: Path, tree: dict[str, Any]) -> Path:
    path.write_text(toml_text(tree))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll until `condition()` is truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


async def migrated_db(dsn: str) -> None:
    """Apply every migration to the (fresh) database at `dsn`."""
    from appliance.db.migrate import migrate

    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    try:
        await migrate(conn)
    finally:
        await conn.close()


async def eventually(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 30.0) -> Any:
    """Poll `check()` until it returns something true, and return that; fail naming `what`
    after `timeout` seconds (which only keeps a hang from lasting: tests never fail on time)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
