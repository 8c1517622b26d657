"""`make run`: the appliance on this machine, with the dependencies a developer lacks.

Creates the PostgreSQL database named in postgres.dsn when it is missing, starts a moto S3 server
when s3.endpoint_url points at this machine and nothing listens there, then runs start.sh in the
foreground (Ctrl-C stops everything).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from appliance.checks import describe
from appliance.config import load_config
from appliance.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
LOCAL = {"127.0.0.1", "localhost", "::1"}


def listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def ensure_database(dsn: str, timeout: float) -> str | None:
    """Create the DSN's database when missing; None, or one line saying why it could not."""
    name = str(conninfo_to_dict(dsn).get("dbname") or "")
    try:
        # The same server and credentials, connected to the maintenance database.
        with psycopg.connect(
            dsn, dbname="postgres", autocommit=True, connect_timeout=max(1, int(timeout))
        ) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if not found.fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                print(f"devrun: created database {name}", file=sys.stderr)
    except psycopg.Error as exc:
        return (
            f"devrun: cannot reach PostgreSQL to create database {name!r}: {describe(exc)} "
            "(check postgres.dsn, or APPLIANCE_POSTGRES__DSN)"
        )
    return None


def start_s3(endpoint: str) -> subprocess.Popen[bytes] | None:
    parts = urlsplit(endpoint)
    host, port = parts.hostname or "", parts.port or 80
    if host not in LOCAL or listening(host, port):
        return None
    moto = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(moto), "-H", host, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while not listening(host, port):
        if time.monotonic() > deadline or proc.poll() is not None:
            sys.exit(f"devrun: moto S3 server did not start on {host}:{port}")
        time.sleep(0.1)
    print(f"devrun: moto S3 server on {host}:{port}", file=sys.stderr)
    return proc


def main() -> int:
    try:
        config = load_config()
    except ConfigError as exc:
        print("\n".join(str(p) for p in exc.problems), file=sys.stderr)
        return 2
    problem = ensure_database(
        config.postgres.dsn.get_secret_value(), config.postgres.connect_timeout
    )
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    s3 = start_s3(config.s3.endpoint_url) if config.s3.endpoint_url else None
    child = subprocess.Popen([str(ROOT / "start.sh")], env=os.environ)
    # Both mean "stop", sent as TERM: a start.sh launched from a background job inherits SIGINT
    # ignored, and bash cannot trap a signal ignored at its start.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: child.send_signal(signal.SIGTERM))
    try:
        return child.wait()
    finally:
        if s3 is not None:
            s3.terminate()
            s3.wait()


if __name__ == "__main__":
    sys.exit(main())
