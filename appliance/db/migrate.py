"""Numbered, forward-only migrations (`NNNN_name.sql`), applied under an advisory lock.

Several containers may start at once: the lock serialises them and the second finds nothing to
do. Each migration runs in its own transaction with its row in `appliance_migrations`, so a crash
leaves either all of a migration or none of it. pgqueuer's schema is installed or upgraded with
pgqueuer's own API under the same lock.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from pgqueuer.queries import Queries

# pg_advisory_lock key: an arbitrary constant owned by the appliance ("appl" "migr" in ASCII).
MIGRATE_LOCK = 0x6170706C6D696772
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

Conn = psycopg.AsyncConnection[Any]


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    """The migrations shipped in the package, in order."""
    found = []
    for entry in resources.files("appliance.db").joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..n without gaps, found {versions}")
    return found


def expected_version() -> int:
    return len(available())


async def _ensure_table(conn: Conn) -> None:
    await conn.execute(
        """
        CREATE TABLE IF NOT EXISTS appliance_migrations (
            version    integer PRIMARY KEY,
            name       text NOT NULL,
            checksum   text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )


async def applied(conn: Conn) -> dict[int, tuple[str, str]]:
    """version → (name, checksum) of what this database has applied; empty if never migrated."""
    cur = await conn.execute("SELECT to_regclass('appliance_migrations') IS NOT NULL")
    row = await cur.fetchone()
    if not row or not row[0]:
        return {}
    cur = await conn.execute("SELECT version, name, checksum FROM appliance_migrations")
    return {version: (name, checksum) for version, name, checksum in await cur.fetchall()}


async def schema_version(conn: Conn) -> int:
    done = await applied(conn)
    return max(done, default=0)


async def migrate(conn: Conn) -> list[Migration]:
    """Apply what is pending and converge pgqueuer's schema; return what this call applied."""
    if not conn.autocommit:
        raise ValueError("migrate needs an autocommit connection")
    await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK,))
    try:
        await _ensure_table(conn)
        done = await applied(conn)
        ran = []
        for migration in available():
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO appliance_migrations (version, name, checksum)"
                    " VALUES (%s, %s, %s)",
                    (migration.version, migration.name, migration.checksum),
                )
            ran.append(migration)
        queries = Queries.from_psycopg_connection(conn)
        if await queries.schema_is_installed():
            await queries.upgrade()
        else:
            await queries.install()
        return ran
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE_LOCK,))


async def drift(conn: Conn) -> list[str]:
    """Every way the database differs from the shipped migrations; empty when in step."""
    problems = []
    done = await applied(conn)
    shipped = {m.version: m for m in available()}
    for version, (name, checksum) in sorted(done.items()):
        migration = shipped.get(version)
        if migration is None:
            problems.append(
                f"migration {version:04d}_{name} is applied but not shipped (newer code?)"
            )
        elif migration.checksum != checksum:
            problems.append(f"migration {version:04d}_{name} was changed after it was applied")
    for version, migration in sorted(shipped.items()):
        if version not in done:
            problems.append(f"migration {version:04d}_{migration.name} is not applied")
    queries = Queries.from_psycopg_connection(conn)
    if not await queries.schema_is_installed():
        problems.append("pgqueuer schema is not installed")
    else:
        plan = await queries.plan_upgrade()
        if plan.statements:
            problems.append(f"pgqueuer schema needs {len(plan.statements)} upgrade statement(s)")
    return problems
