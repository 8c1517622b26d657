"""API keys: `ak_<id>_<secret>`, shown once; PostgreSQL keeps the SHA-256 of the secret.

Rotation issues a new secret and keeps the previous one valid for a grace period; revocation is
immediate. Every change is announced on the invalidation channel, so each api process drops its
cached copy within a second. The HTTP routes and the CLI both call these functions.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import msgspec
import psycopg
from psycopg.rows import dict_row

from appliance.auth.principal import Scope
from appliance.errors import Conflict, Invalid, NotFound

Conn = psycopg.AsyncConnection[Any]
_ID = r"[a-z0-9]{12}"
KEY = re.compile(rf"^ak_(?P<id>{_ID})_(?P<secret>[A-Za-z0-9_-]{{43}})\Z")
KEY_ID = re.compile(rf"^{_ID}\Z")
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"

KeyName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._-]{1,64}\Z")]
Prefix = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:-]{1,128}\Z")]
# RFC 3339 with a time zone (msgspec's own schema of datetime leaves the format out).
Timestamp = Annotated[datetime, msgspec.Meta(extra_json_schema={"format": "date-time"})]


class KeyCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: KeyName
    # No scope is a pure member: `key:<name>` acts only through its conversation memberships.
    scopes: Annotated[list[Scope], msgspec.Meta(max_length=6)]
    conversation_prefix: Prefix | None = None
    expires_at: Timestamp | None = None


class KeyRotate(msgspec.Struct, forbid_unknown_fields=True):
    # Seconds the previous secret keeps working; default `[auth] rotate_grace`.
    grace: Annotated[float, msgspec.Meta(ge=0, le=90 * 86400)] | None = None


class KeyInfo(msgspec.Struct):
    id: str
    name: str
    principal: str
    scopes: list[str]
    conversation_prefix: str | None
    expires_at: datetime | None
    created_at: datetime
    rotated_at: datetime | None
    previous_expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class IssuedKey(KeyInfo):
    key: str  # the full key, shown only in this response


class KeyRecord(msgspec.Struct, frozen=True):
    """What authentication needs of a key (cached per api process)."""

    id: str
    name: str
    secret_hash: bytes
    previous_hash: bytes | None
    previous_expires_at: datetime | None
    scopes: frozenset[str]
    conversation_prefix: str | None
    expires_at: datetime | None
    revoked: bool

    def matches(self, secret: str, now: datetime) -> Literal["current", "previous"] | None:
        """Which secret this is: the current one, the previous one within its grace, or none."""
        digest = hash_secret(secret)
        if hmac.compare_digest(digest, self.secret_hash):
            return "current"
        if (
            self.previous_hash is not None
            and self.previous_expires_at is not None
            and self.previous_expires_at > now
            and hmac.compare_digest(digest, self.previous_hash)
        ):
            return "previous"
        return None


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _new_secret() -> tuple[str, str]:
    key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))
    return key_id, secrets.token_urlsafe(32)


_COLUMNS = (
    "id, name, scopes, conversation_prefix, expires_at, created_at, rotated_at,"
    " previous_expires_at, revoked_at, last_used_at"
)


def _info(row: dict[str, Any]) -> KeyInfo:
    return KeyInfo(principal=f"key:{row['name']}", **row)


async def create(conn: Conn, spec: KeyCreate, now: datetime | None = None) -> IssuedKey:
    now = now or datetime.now(UTC)
    if "admin" in spec.scopes and spec.conversation_prefix is not None:
        # An admin key manages every key, so a prefix would not hold: it could mint unlimited ones.
        raise Invalid("cannot be combined with the admin scope", field="conversation_prefix")
    if spec.expires_at is not None:
        if spec.expires_at.tzinfo is None:
            raise Invalid("must carry a time zone (e.g. Z)", field="expires_at")
        if spec.expires_at <= now:
            raise Invalid("must be in the future", field="expires_at")
    key_id, secret = _new_secret()
    async with conn.cursor(row_factory=dict_row) as cur:
        try:
            await cur.execute(
                f"""INSERT INTO api_keys (id, name, secret_hash, scopes, conversation_prefix,
                                          expires_at)
                    VALUES (%s, %s, %s, %s, %s, %s) RETURNING {_COLUMNS}""",
                (
                    key_id,
                    spec.name,
                    hash_secret(secret),
                    sorted(set(spec.scopes)),
                    spec.conversation_prefix,
                    spec.expires_at,
                ),
            )
        except psycopg.errors.UniqueViolation:
            raise Conflict(f"a key named {spec.name!r} exists", field="name") from None
        row = await cur.fetchone()
    assert row is not None
    return IssuedKey(key=f"ak_{key_id}_{secret}", principal=f"key:{row['name']}", **row)


async def list_keys(conn: Conn) -> list[KeyInfo]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, id")
        return [_info(row) for row in await cur.fetchall()]


def check_id(key_id: str) -> str:
    if not KEY_ID.match(key_id):
        raise Invalid("must be the key's id: 12 characters a-z 0-9", field="id")
    return key_id


async def rotate(conn: Conn, key_id: str, grace: float) -> IssuedKey:
    """A new secret; the current one stays valid for `grace` seconds."""
    check_id(key_id)
    _, secret = _new_secret()
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"""UPDATE api_keys
                   SET previous_hash = secret_hash,
                       previous_expires_at = now() + %s,
                       secret_hash = %s,
                       rotated_at = now()
                 WHERE id = %s AND revoked_at IS NULL
             RETURNING {_COLUMNS}""",
            (timedelta(seconds=grace), hash_secret(secret), key_id),
        )
        row = await cur.fetchone()
    if row is None:
        raise NotFound(f"no active key {key_id!r}", field="id")
    return IssuedKey(key=f"ak_{key_id}_{secret}", principal=f"key:{row['name']}", **row)


async def revoke(conn: Conn, key_id: str) -> KeyInfo:
    check_id(key_id)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"""UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
                 WHERE id = %s RETURNING {_COLUMNS}""",
            (key_id,),
        )
        row = await cur.fetchone()
    if row is None:
        raise NotFound(f"no key {key_id!r}", field="id")
    return _info(row)


async def fetch(conn: Conn, key_id: str) -> KeyRecord | None:
    cur = await conn.execute(
        """SELECT id, name, secret_hash, previous_hash, previous_expires_at, scopes,
                  conversation_prefix, expires_at, revoked_at IS NOT NULL
             FROM api_keys WHERE id = %s""",
        (key_id,),
    )
    row = await cur.fetchone()
    if row is None:
        return None
    return KeyRecord(
        id=row[0],
        name=row[1],
        secret_hash=bytes(row[2]),
        previous_hash=bytes(row[3]) if row[3] is not None else None,
        previous_expires_at=row[4],
        scopes=frozenset(row[5]),
        conversation_prefix=row[6],
        expires_at=row[7],
        revoked=row[8],
    )


async def record_use(conn: Conn, used: dict[str, datetime]) -> None:
    """One UPDATE for every key used since the last batch."""
    if not used:
        return
    await conn.execute(
        """UPDATE api_keys AS k SET last_used_at = greatest(k.last_used_at, u.at)
             FROM unnest(%s::text[], %s::timestamptz[]) AS u(id, at)
            WHERE k.id = u.id""",
        (list(used), list(used.values())),
    )
