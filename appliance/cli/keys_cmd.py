"""`appliance keys create|list|rotate|revoke`: the same functions as `/v1/keys`.

`create … --json` prints `{"id", "key", …}` so a script can bootstrap the first admin key:
    KEY=$(appliance keys create --name bootstrap --scope admin --json | jq -r .key)
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import click
import msgspec

from appliance.auth import keys
from appliance.auth.principal import SCOPES
from appliance.cli.common import cli_config, run_async
from appliance.config import Config
from appliance.invalidation import Invalidation, announce
from appliance.redis_keys import client
from appliance.resources import direct_connection, keys_for

T = TypeVar("T")

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)\Z", re.ASCII)  # int() reads other digits too
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(text: str, option: str) -> float:
    match = _DURATION.match(text.strip())
    if match is None:
        raise click.BadParameter(
            "expected a number with an optional unit s, m, h or d", param_hint=option
        )
    return float(match[1]) * _UNIT[match[2]]


def _validated(fields: dict[str, Any], kind: type[T]) -> T:
    """`fields` checked by the same struct (and rules) as the HTTP API's body."""
    try:
        return msgspec.convert(fields, kind)
    except msgspec.ValidationError as exc:
        raise click.UsageError(str(exc)) from None


def _print(info: keys.KeyInfo, as_json: bool) -> None:
    if as_json:
        click.echo(msgspec.json.encode(info))
        return
    fields = msgspec.structs.asdict(info)
    for name, value in fields.items():
        if value is not None:
            click.echo(f"{name:20} {', '.join(value) if isinstance(value, list) else value}")


async def _announce(config: Config, key_id: str) -> None:
    """Tell the api processes; the change is committed either way (appliance/invalidation.py)."""
    redis = client(config.redis, "cli")
    try:
        told = await announce(redis, keys_for(config), Invalidation("key", key_id))
    finally:
        await redis.aclose()
    if not told:
        click.echo(
            f"warning: Redis did not answer; api processes apply this within "
            f"[auth] key_cache_ttl ({config.auth.key_cache_ttl:g} s)",
            err=True,
        )


@click.group("keys")
def keys_group() -> None:
    """API keys: create (shown once), list, rotate with a grace period, revoke."""


@keys_group.command("create")
@click.option("--name", required=True, help="Unique name; the key acts as key:<name>.")
@click.option(
    "--scope", "scopes", multiple=True, type=click.Choice(SCOPES),
    help="Repeat for several scopes; none makes a key that acts only as a conversation member.",
)  # fmt: skip
@click.option("--prefix", default=None, help="Only conversations whose id starts with this.")
@click.option("--expires-in", default=None, help="Lifetime: 3600, 90m, 12h, 30d.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with the key) for scripts.")
def create(
    name: str, scopes: tuple[str, ...], prefix: str | None, expires_in: str | None, as_json: bool
) -> None:
    """Create a key. The full key is printed once and cannot be shown again."""
    config = cli_config()
    expires_at = None
    if expires_in is not None:
        expires_at = datetime.now(UTC) + timedelta(seconds=seconds(expires_in, "--expires-in"))
    spec = _validated(
        {"name": name, "scopes": list(scopes), "conversation_prefix": prefix,
         "expires_at": expires_at},
        keys.KeyCreate,
    )  # fmt: skip

    async def run() -> keys.IssuedKey:
        async with direct_connection(config, "cli")() as conn:
            return await keys.create(conn, spec)

    issued = run_async(run())
    _print(issued, as_json)
    if not as_json:
        click.echo("Store the key now: it is not shown again.", err=True)
        if not scopes:
            click.echo(
                f"No scope: key:{name} acts only in conversations it is a member of.", err=True
            )


@keys_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array.")
def list_cmd(as_json: bool) -> None:
    """List keys (never their secrets)."""
    config = cli_config()

    async def run() -> list[keys.KeyInfo]:
        async with direct_connection(config, "cli")() as conn:
            return await keys.list_keys(conn)

    found = run_async(run())
    if as_json:
        click.echo(msgspec.json.encode(found))
        return
    for info in found:
        state = "revoked" if info.revoked_at else "active"
        if info.expires_at and info.expires_at <= datetime.now(UTC):
            state = "expired"
        click.echo(
            f"{info.id}  {info.name:24} {state:8} {','.join(info.scopes):30} "
            f"{info.conversation_prefix or '*':16} last used {info.last_used_at or 'never'}"
        )


@keys_group.command("rotate")
@click.argument("key_id")
@click.option("--grace", default=None, help="How long the old secret keeps working (24h).")
@click.option("--json", "as_json", is_flag=True)
def rotate(key_id: str, grace: str | None, as_json: bool) -> None:
    """Issue a new secret for KEY_ID; the old one works for the grace period."""
    config = cli_config()
    grace_s = config.auth.rotate_grace if grace is None else seconds(grace, "--grace")
    _validated({"grace": grace_s}, keys.KeyRotate)  # the HTTP API's bounds

    async def run() -> keys.IssuedKey:
        async with direct_connection(config, "cli")() as conn:
            issued = await keys.rotate(conn, key_id, grace_s)
        await _announce(config, key_id)
        return issued

    _print(run_async(run()), as_json)


@keys_group.command("revoke")
@click.argument("key_id")
@click.option("--json", "as_json", is_flag=True)
def revoke(key_id: str, as_json: bool) -> None:
    """Revoke KEY_ID at once on every api process."""
    config = cli_config()

    async def run() -> keys.KeyInfo:
        async with direct_connection(config, "cli")() as conn:
            info = await keys.revoke(conn, key_id)
        await _announce(config, key_id)
        return info

    _print(run_async(run()), as_json)
