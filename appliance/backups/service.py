"""Backups: `pg_dump --format=custom` of the appliance's database, streamed to S3 as it runs,
then all but the newest `keep` backups deleted.

The dump goes up as a multipart upload of `backups/<UTC time to the millisecond>-<4 random hex
digits>.dump` while pg_dump writes it (memory holds about one part): two backups started in the
same millisecond still get two objects, and the names sort by time. A dump that fails (pg_dump
exits non-zero, S3 refuses a part) aborts the upload, so no partial object is ever left, and
older backups are deleted only after a new one is complete.

No secret reaches pg_dump's command line (which `ps` shows): the password goes in PGPASSWORD,
and the rest of the DSN as a conninfo string. A DSN with `sslpassword` (the client key's
passphrase, which libpq reads from no environment variable) is refused: name a libpq service in
the DSN instead (`service=...`, its service file holding the passphrase). pg_dump must be at
least as new as the server (it refuses a newer one).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from appliance import metrics
from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.multipart import Upload
from appliance.storage import Storage

log = structlog.get_logger()

PREFIX = "backups/"
# Backups this code made: backups/20261206T033000.123Z-9f3a.dump (and, before milliseconds,
# backups/20261206T033000Z.dump). Anything else under the prefix is left.
_NAME = re.compile(r"backups/(\d{8}T\d{6})(?:\.(\d{3}))?Z(?:-[0-9a-f]{4})?\.dump\Z")
CHUNK = 1_048_576  # bytes read from pg_dump at once
STDERR_LINES = 20  # pg_dump's last lines kept for the error


class BackupFailed(ApplianceError):
    code = "backup_failed"


@dataclass(frozen=True)
class Backup:
    key: str
    size: int
    deleted: list[str]  # older backups deleted after this one was complete


def backup_key(at: datetime) -> str:
    at = at.astimezone(UTC)
    return f"{PREFIX}{at:%Y%m%dT%H%M%S}.{at.microsecond // 1000:03d}Z-{secrets.token_hex(2)}.dump"


def dump_command(config: Config) -> tuple[list[str], dict[str, str]]:
    """pg_dump's argv and environment for the configured database: the password (if the DSN
    has one) in PGPASSWORD, never in argv; a DSN with sslpassword is refused."""
    params = conninfo_to_dict(config.postgres.dsn.get_secret_value())
    if "sslpassword" in params:
        raise BackupFailed(
            "postgres.dsn holds sslpassword, which pg_dump would show on its command line:"
            " name a libpq service (service=...) whose service file holds it",
            field="postgres.dsn",
        )
    password = params.pop("password", None)
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = str(password)
    params.setdefault("connect_timeout", str(max(1, round(config.postgres.connect_timeout))))
    binary = shutil.which("pg_dump", path=env.get("PATH")) or "pg_dump"
    argv = [binary, "--format=custom", "--no-password", f"--dbname={make_conninfo('', **params)}"]
    return argv, env


async def take(config: Config, storage: Storage, keep: int, at: datetime | None = None) -> Backup:
    """One backup now, then all but the newest `keep` deleted."""
    key = backup_key(at or datetime.now(UTC))
    argv, env = dump_command(config)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
    except OSError as exc:
        raise BackupFailed(f"cannot run pg_dump: {exc.strerror or exc}") from None
    assert proc.stdout is not None and proc.stderr is not None
    errors: deque[str] = deque(maxlen=STDERR_LINES)
    reading = asyncio.create_task(_lines(proc.stderr, errors))
    upload: Upload | None = None
    try:
        upload = await Upload.start(storage, key)
        while chunk := await proc.stdout.read(CHUNK):
            await upload.write(chunk)
        code = await proc.wait()
        await reading
        if code != 0:
            detail = "; ".join(errors) or "no message"
            raise BackupFailed(f"pg_dump exited with status {code}: {detail}")
        await upload.complete()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        reading.cancel()
        if upload is not None:
            await asyncio.shield(upload.abort())
        raise
    size = upload.size
    deleted = await prune(storage, keep)
    metrics.RETENTION_DELETED.labels("backups").inc(len(deleted))
    log.info("backup_done", key=key, bytes=size, deleted=len(deleted), kept=keep)
    return Backup(key, size, deleted)


async def backups(storage: Storage) -> list[tuple[str, int]]:
    """(key, size) of every backup, oldest first: by the time in its name (a name without
    milliseconds counts as .000), then by name."""
    found = []
    for key, size in await storage.list_keys(PREFIX):
        if named := _NAME.match(key):
            found.append(((named[1], named[2] or "000", key), key, size))
    return [(key, size) for _, key, size in sorted(found)]


def surplus(found: list[tuple[str, int]], keep: int) -> list[str]:
    """The keys to delete so that the newest `keep` remain."""
    return [k for k, _ in found[: max(0, len(found) - keep)]]


async def prune(storage: Storage, keep: int) -> list[str]:
    """Delete all but the newest `keep` backups; the keys deleted."""
    doomed = surplus(await backups(storage), keep)
    await storage.delete_many(doomed)
    return doomed


async def _lines(stream: asyncio.StreamReader, into: deque[str]) -> None:
    while line := await stream.readline():
        text = line.decode(errors="replace").strip()
        if text:
            into.append(text)
